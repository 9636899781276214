#include <filesystem>

#include "core/device.h"
#include "core/error.h"
#include "model/checkpoint.h"

namespace kvdrift {

LlamaModel load_model(const std::string& spec, torch::Device device, torch::ScalarType dtype, uint64_t seed) {
  require_supported(device, dtype);  // before loading gigabytes of weights
  const std::string synthetic_prefix = "synthetic:";
  if (spec.rfind(synthetic_prefix, 0) == 0) {
    const std::string name = spec.substr(synthetic_prefix.size());
    auto checkpoint = synthetic_checkpoint(name, seed, device, dtype);
    return LlamaModel(checkpoint.config, checkpoint.weights, {spec, "synthetic"}, device, dtype);
  }
  std::error_code ec;
  if (std::filesystem::is_directory(spec, ec)) {
    auto checkpoint = read_hf_checkpoint(spec, device, dtype);
    return LlamaModel(checkpoint.config, checkpoint.weights, {spec, "hf"}, device, dtype);
  }
  if (!std::filesystem::exists(spec, ec)) fail("model file not found: {}", spec);
  auto checkpoint = read_llama2c_checkpoint(spec, device, dtype);
  return LlamaModel(checkpoint.config, checkpoint.weights, {spec, "llama2c"}, device, dtype);
}

}  // namespace kvdrift
