#include "quant/params.h"

#include <cerrno>
#include <cstdlib>

#include "core/error.h"

namespace kvdrift {

ParamReader::ParamReader(std::string method, ParamMap params) : method_(std::move(method)), params_(std::move(params)) {}

const std::string* ParamReader::lookup(const std::string& key) {
  known_.insert(key);
  auto it = params_.find(key);
  return it == params_.end() ? nullptr : &it->second;
}

int64_t ParamReader::integer(const std::string& key, int64_t fallback, int64_t min, int64_t max) {
  const std::string* text = lookup(key);
  if (!text) return fallback;
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text->c_str(), &end, 10);
  if (text->empty() || *end != '\0' || errno != 0)
    fail("quantizer '{}': parameter {} = '{}' is not an integer", method_, key, *text);
  if (value < min || value > max)
    fail("quantizer '{}': parameter {} = {} is out of range [{}, {}]", method_, key, value, min, max);
  return value;
}

double ParamReader::real(const std::string& key, double fallback, double min, double max) {
  const std::string* text = lookup(key);
  if (!text) return fallback;
  char* end = nullptr;
  errno = 0;
  const double value = std::strtod(text->c_str(), &end);
  if (text->empty() || *end != '\0' || errno != 0)
    fail("quantizer '{}': parameter {} = '{}' is not a number", method_, key, *text);
  if (!(value >= min && value <= max))
    fail("quantizer '{}': parameter {} = {} is out of range [{}, {}]", method_, key, value, min, max);
  return value;
}

bool ParamReader::boolean(const std::string& key, bool fallback) {
  const std::string* text = lookup(key);
  if (!text) return fallback;
  if (*text == "true" || *text == "1") return true;
  if (*text == "false" || *text == "0") return false;
  fail("quantizer '{}': parameter {} = '{}' is not a boolean (true or false)", method_, key, *text);
}

std::string ParamReader::text(const std::string& key, const std::string& fallback) {
  const std::string* value = lookup(key);
  return value ? *value : fallback;
}

ParamMap ParamReader::prefixed(const std::string& prefix) {
  ParamMap inner;
  for (const auto& [key, value] : params_) {
    if (key.rfind(prefix, 0) != 0) continue;
    known_.insert(key);
    inner[key.substr(prefix.size())] = value;
  }
  return inner;
}

std::string ParamReader::choice(const std::string& key, const std::string& fallback,
                                const std::vector<std::string>& allowed) {
  const std::string* text = lookup(key);
  if (!text) return fallback;
  for (const auto& option : allowed)
    if (*text == option) return *text;
  fail("quantizer '{}': parameter {} = '{}' is not one of {}", method_, key, *text, fmt::join(allowed, ", "));
}

void ParamReader::finish() const {
  for (const auto& [key, value] : params_) {
    if (!known_.count(key))
      fail("quantizer '{}': unknown parameter '{}' (its parameters: {})", method_, key, fmt::join(known_, ", "));
  }
}

void ParamReader::reject(const std::string& message) const { fail("quantizer '{}': {}", method_, message); }

}  // namespace kvdrift
