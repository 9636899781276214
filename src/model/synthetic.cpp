// Random-weight models with the exact shapes of real checkpoints, for speed measurements at size.
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <functional>

#include "core/error.h"
#include "model/checkpoint.h"

namespace kvdrift {

namespace {

ModelConfig shape(const std::string& architecture, int64_t dim, int64_t hidden, int64_t layers, int64_t heads,
                  int64_t kv_heads, int64_t head_dim) {
  ModelConfig c;
  c.architecture = architecture;
  c.dim = dim;
  c.hidden_dim = hidden;
  c.n_layers = layers;
  c.n_heads = heads;
  c.n_kv_heads = kv_heads;
  c.head_dim = head_dim;
  return c;
}

ModelConfig llama3_config(int64_t dim, int64_t hidden, int64_t layers, int64_t heads, int64_t kv_heads,
                          int64_t head_dim, bool tied, double rope_factor) {
  ModelConfig c = shape("llama", dim, hidden, layers, heads, kv_heads, head_dim);
  c.vocab_size = 128256;
  c.max_seq_len = 131072;
  c.rope_theta = 500000.0;
  c.rope_scaling = {RopeScalingType::Llama3, rope_factor, 1.0, 4.0, 8192};
  c.norm_eps = 1e-5;
  c.tie_embeddings = tied;
  c.bos_token_id = 128000;
  c.eos_token_ids = {128001, 128008, 128009};
  return c;
}

ModelConfig qwen_config(const std::string& architecture, int64_t dim, int64_t hidden, int64_t layers, int64_t heads,
                        int64_t kv_heads, int64_t head_dim, int64_t max_seq_len) {
  ModelConfig c = shape(architecture, dim, hidden, layers, heads, kv_heads, head_dim);
  c.vocab_size = 151936;
  c.max_seq_len = max_seq_len;
  c.rope_theta = 1000000.0;
  c.norm_eps = 1e-6;
  c.tie_embeddings = true;
  c.attention_bias = architecture == "qwen2";
  c.qk_norm = architecture == "qwen3";
  c.bos_token_id = -1;
  c.eos_token_ids = {151643, 151645};
  return c;
}

// Shapes from the models' published config.json files.
const std::map<std::string, std::function<ModelConfig()>>& synthetic_registry() {
  static const std::map<std::string, std::function<ModelConfig()>> registry = {
      {"llama-3.2-1b", [] { return llama3_config(2048, 8192, 16, 32, 8, 64, true, 32.0); }},
      {"llama-3.2-3b", [] { return llama3_config(3072, 8192, 28, 24, 8, 128, true, 32.0); }},
      {"llama-3.1-8b", [] { return llama3_config(4096, 14336, 32, 32, 8, 128, false, 8.0); }},
      {"qwen2.5-1.5b", [] { return qwen_config("qwen2", 1536, 8960, 28, 12, 2, 128, 32768); }},
      {"qwen2.5-7b", [] { return qwen_config("qwen2", 3584, 18944, 28, 28, 4, 128, 32768); }},
      {"qwen3-4b", [] { return qwen_config("qwen3", 2560, 9728, 36, 32, 8, 128, 40960); }},
      {"qwen3-8b", [] { return qwen_config("qwen3", 4096, 12288, 36, 32, 8, 128, 40960); }},
      // For tests: every feature (GQA, biases, q/k norm) at a size that runs in milliseconds.
      {"tiny",
       [] {
         ModelConfig c = qwen_config("qwen3", 64, 128, 2, 4, 2, 16, 512);
         c.vocab_size = 256;
         c.attention_bias = true;
         c.eos_token_ids = {2};
         return c;
       }},
  };
  return registry;
}

}  // namespace

std::vector<std::string> synthetic_model_names() {
  std::vector<std::string> names;
  for (const auto& [name, make] : synthetic_registry()) names.push_back(name);
  return names;
}

ModelConfig synthetic_config(const std::string& name) {
  const auto& registry = synthetic_registry();
  auto it = registry.find(name);
  if (it == registry.end())
    fail("unknown synthetic model '{}' (known: {})", name, fmt::join(synthetic_model_names(), ", "));
  ModelConfig config = it->second();
  config.validate("synthetic:" + name);
  return config;
}

Checkpoint synthetic_checkpoint(const std::string& name, uint64_t seed, torch::Device device,
                                torch::ScalarType dtype) {
  Checkpoint checkpoint{synthetic_config(name), {}};
  // One generator per tensor, seeded from (seed, tensor index): the weights do not depend on the order
  // or the device they are built for.
  const auto shapes = expected_weight_shapes(checkpoint.config);
  for (size_t i = 0; i < shapes.size(); ++i) {
    const auto& [tensor_name, shape] = shapes[i];
    auto generator = at::make_generator<at::CPUGeneratorImpl>(seed * 1000003 + i);
    torch::Tensor tensor;
    const bool is_norm = tensor_name.find("norm") != std::string::npos;
    if (is_norm) {
      tensor = 1.0 + 0.1 * torch::randn(shape, generator, torch::kFloat32);
    } else {
      // std 1/sqrt(fan_in) keeps activations O(1) through the depth of the model.
      const double std = 1.0 / std::sqrt(static_cast<double>(shape.back()));
      tensor = torch::randn(shape, generator, torch::kFloat32).mul_(tensor_name.find("bias") != std::string::npos ? 0.1 : std);
    }
    checkpoint.weights[tensor_name] = tensor.to(device, dtype);
  }
  return checkpoint;
}

}  // namespace kvdrift
