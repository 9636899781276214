#include <algorithm>
#include <filesystem>

#include "core/device.h"
#include "core/error.h"
#include "core/sha256.h"
#include "io/run_config.h"
#include "model/checkpoint.h"

namespace kvdrift {

LlamaModel load_model(const std::string& spec, torch::Device device, torch::ScalarType dtype, uint64_t seed) {
  if (const std::optional<std::string> name = synthetic_model_name(spec)) {
    auto checkpoint = synthetic_checkpoint(*name, seed, device, dtype);
    return LlamaModel(checkpoint.config, checkpoint.weights, {spec, ModelFormat::Synthetic}, device, dtype);
  }
  std::error_code ec;
  if (std::filesystem::is_directory(spec, ec)) {
    auto checkpoint = read_hf_checkpoint(spec, device, dtype);
    return LlamaModel(checkpoint.config, checkpoint.weights, {spec, ModelFormat::HuggingFace}, device, dtype);
  }
  if (!std::filesystem::exists(spec, ec)) fail("model file not found: {}", spec);
  auto checkpoint = read_llama2c_checkpoint(spec, device, dtype);
  return LlamaModel(checkpoint.config, checkpoint.weights, {spec, ModelFormat::Llama2c}, device, dtype);
}

ModelConfig read_model_config(const std::string& spec) {
  if (const std::optional<std::string> name = synthetic_model_name(spec)) return synthetic_config(*name);
  std::error_code ec;
  if (std::filesystem::is_directory(spec, ec)) return read_hf_config(spec);
  if (!std::filesystem::exists(spec, ec)) fail("model file not found: {}", spec);
  return read_llama2c_layout(spec).config;
}

std::string checkpoint_sha256(const ModelSource& source) {
  if (source.format == ModelFormat::Synthetic) return "";
  if (source.format == ModelFormat::Llama2c) return sha256_file(source.path);
  std::vector<std::string> files;
  for (const auto& entry : std::filesystem::directory_iterator(source.path)) {
    const std::string name = entry.path().filename().string();
    if (name == "config.json" || entry.path().extension() == ".safetensors") files.push_back(name);
  }
  std::sort(files.begin(), files.end());
  std::string lines;
  for (const auto& name : files) lines += name + " " + sha256_file((std::filesystem::path(source.path) / name).string()) + "\n";
  return sha256_hex(lines);
}

}  // namespace kvdrift
