#pragma once
// The shape and conventions of a Llama-family decoder (Llama 2/3, Qwen2, Qwen3, llama2.c).
#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/enum_names.h"

namespace kvdrift {

// How RoPE pairs the channels of a head: llama2.c/Meta rotate adjacent pairs (2i, 2i+1);
// Hugging Face checkpoints rotate (i, i + head_dim/2) (their q/k rows are permuted to match).
enum class RopeStyle { Interleaved, HalfSplit };

// How RoPE's frequencies are stretched for long contexts (config.json's rope_scaling.rope_type).
enum class RopeScalingType { None, Linear, Llama3 };
inline constexpr EnumName<RopeScalingType> kRopeScalingTypeNames[] = {
    {RopeScalingType::None, "none"}, {RopeScalingType::Linear, "linear"}, {RopeScalingType::Llama3, "llama3"}};

struct RopeScaling {
  RopeScalingType type = RopeScalingType::None;
  double factor = 1.0;
  double low_freq_factor = 1.0;   // llama3 only
  double high_freq_factor = 4.0;  // llama3 only
  int64_t original_max_position = 8192;  // llama3 only
};

struct ModelConfig {
  std::string architecture = "llama";  // llama | mistral | qwen2 | qwen3 (HF model_type)
  int64_t dim = 0;
  int64_t hidden_dim = 0;
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t vocab_size = 0;
  int64_t max_seq_len = 0;  // max_position_embeddings, or a smaller sliding_window in use
  double rope_theta = 10000.0;
  RopeStyle rope_style = RopeStyle::HalfSplit;
  RopeScaling rope_scaling;
  double norm_eps = 1e-5;
  bool tie_embeddings = false;
  bool attention_bias = false;  // Qwen2: biases on q/k/v projections
  bool qk_norm = false;         // Qwen3: per-head RMSNorm on q and k before RoPE
  int64_t bos_token_id = -1;    // -1: none known
  std::vector<int64_t> eos_token_ids;

  int64_t q_dim() const { return n_heads * head_dim; }
  int64_t kv_dim() const { return n_kv_heads * head_dim; }
  // Throws Error (prefixed by `where`) when the numbers cannot describe a model.
  void validate(const std::string& where) const;
};

// Every weight tensor of the model under its Hugging Face name, with its shape, in a fixed order.
std::vector<std::pair<std::string, std::vector<int64_t>>> expected_weight_shapes(const ModelConfig& config);
int64_t parameter_count(const ModelConfig& config);

// config.json <-> ModelConfig. `where` names the file in error messages.
ModelConfig config_from_hf_json(const nlohmann::json& json, const std::string& where);
nlohmann::json config_to_hf_json(const ModelConfig& config);

}  // namespace kvdrift
