// The one list of quantization methods: a new method adds its factory declaration and one line here.
#include <functional>

#include "core/error.h"
#include "quant/affine.h"
#include "quant/params.h"
#include "quant/quantizer.h"
#include "quant/wrappers.h"

namespace kvdrift {

std::unique_ptr<Quantizer> make_none(ParamReader& params, int64_t head_dim);
std::unique_ptr<Quantizer> make_rtn(ParamReader& params, int64_t head_dim);
std::unique_ptr<Quantizer> make_kivi(ParamReader& params, int64_t head_dim);
std::unique_ptr<Quantizer> make_quarot(ParamReader& params, int64_t head_dim);
std::unique_ptr<Quantizer> make_kvarn(ParamReader& params, int64_t head_dim);

namespace {

using Factory = std::function<std::unique_ptr<Quantizer>(ParamReader&, int64_t)>;

const std::map<std::string, Factory>& registry() {
  static const std::map<std::string, Factory> methods = {
      {"none", make_none}, {"rtn", make_rtn}, {"kivi", make_kivi}, {"quarot", make_quarot}, {"kvarn", make_kvarn},
  };
  return methods;
}

}  // namespace

std::vector<std::string> quantizer_methods() {
  std::vector<std::string> names;
  for (const auto& [name, factory] : registry()) names.push_back(name);
  return names;
}

std::unique_ptr<Quantizer> make_quantizer(const std::string& method, const ParamMap& params, int64_t head_dim) {
  auto it = registry().find(method);
  if (it == registry().end())
    fail("unknown quantizer method '{}' (known: {})", method, fmt::join(quantizer_methods(), ", "));
  // `wrap` belongs to no method: it puts a causal wrapper around any of them (quant/wrappers.h).
  ParamMap method_params = params;
  const auto wrap = method_params.find("wrap");
  const std::string wrapper = wrap == method_params.end() ? "" : wrap->second;
  if (wrap != method_params.end()) method_params.erase(wrap);
  ParamReader reader(method, method_params);
  auto quantizer = it->second(reader, head_dim);
  reader.finish();
  return wrapper.empty() ? std::move(quantizer) : wrap_quantizer(std::move(quantizer), wrapper);
}
}  // namespace kvdrift
