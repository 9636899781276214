#pragma once
// Typed reading of a quantizer's key=value parameters with range checks. Every key must be read by the
// method's factory: finish() reports the first key nobody asked for (a misspelling, or a parameter
// this method does not have), listing the ones it does have.
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "quant/quantizer.h"

namespace kvdrift {

class ParamReader {
 public:
  ParamReader(std::string method, ParamMap params);

  int64_t integer(const std::string& key, int64_t fallback, int64_t min, int64_t max);
  double real(const std::string& key, double fallback, double min, double max);
  bool boolean(const std::string& key, bool fallback);
  std::string choice(const std::string& key, const std::string& fallback, const std::vector<std::string>& allowed);
  // Free text (a method name, checked by whoever uses it), or `fallback`.
  std::string text(const std::string& key, const std::string& fallback);
  // Every parameter whose key starts with `prefix`, the prefix removed (`value.v_bits` -> `v_bits`), for a
  // method built inside another; they count as read.
  ParamMap prefixed(const std::string& prefix);
  bool has(const std::string& key) const { return params_.count(key) > 0; }
  const std::string& method() const { return method_; }
  // Throws Error for a parameter that was given but never read.
  void finish() const;
  // Error prefixed with the method name, for checks that involve several parameters.
  [[noreturn]] void reject(const std::string& message) const;

 private:
  const std::string* lookup(const std::string& key);

  std::string method_;
  ParamMap params_;
  std::set<std::string> known_;
};

}  // namespace kvdrift
