// The one list of quantization methods: a new method adds its factory declaration and one line here
// (docs/quantizers.md, "Adding a method").
#include <functional>
#include <mutex>

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
std::unique_ptr<Quantizer> make_ggml(ParamReader& params, int64_t head_dim);
std::unique_ptr<Quantizer> make_turboquant(ParamReader& params, int64_t head_dim);
std::unique_ptr<Quantizer> make_qjl(ParamReader& params, int64_t head_dim);

namespace {

struct Registry {
  std::mutex mutex;  // methods registered from outside (tests) may race with lookups
  std::map<std::string, QuantizerFactory> methods = {
      {"none", make_none}, {"rtn", make_rtn}, {"kivi", make_kivi}, {"quarot", make_quarot}, {"kvarn", make_kvarn},
      {"ggml", make_ggml}, {"turboquant", make_turboquant}, {"qjl", make_qjl},
  };
};

Registry& registry() {
  static Registry instance;
  return instance;
}

}  // namespace

void register_quantizer_method(const std::string& method, QuantizerFactory factory) {
  Registry& methods = registry();
  const std::lock_guard<std::mutex> lock(methods.mutex);
  KVDRIFT_CHECK(methods.methods.count(method) == 0 && method != "wrap");
  methods.methods.emplace(method, std::move(factory));
}

std::vector<std::string> quantizer_methods() {
  Registry& methods = registry();
  const std::lock_guard<std::mutex> lock(methods.mutex);
  std::vector<std::string> names;
  for (const auto& [name, factory] : methods.methods) names.push_back(name);
  return names;
}

std::unique_ptr<Quantizer> make_quantizer(const std::string& method, const ParamMap& params, int64_t head_dim) {
  QuantizerFactory factory;
  {
    Registry& methods = registry();
    const std::lock_guard<std::mutex> lock(methods.mutex);
    const auto it = methods.methods.find(method);
    if (it != methods.methods.end()) factory = it->second;
  }
  if (!factory) fail("unknown quantizer method '{}' (known: {})", method, fmt::join(quantizer_methods(), ", "));
  // `wrap` belongs to no method: it puts a causal wrapper around any of them (quant/wrappers.h).
  ParamMap method_params = params, wrapper_params;
  const auto wrap = method_params.find("wrap");
  const std::string wrapper = wrap == method_params.end() ? "" : wrap->second;
  if (wrap != method_params.end()) method_params.erase(wrap);
  if (!wrapper.empty()) {
    for (const auto& key : wrapper_parameter_names()) {
      const auto it = method_params.find(key);
      if (it == method_params.end()) continue;
      wrapper_params.insert(*it);
      method_params.erase(it);
    }
  }
  ParamReader reader(method, method_params);
  auto quantizer = factory(reader, head_dim);
  reader.finish();
  return wrapper.empty() ? std::move(quantizer) : wrap_quantizer(std::move(quantizer), wrapper, wrapper_params);
}
}  // namespace kvdrift
