#pragma once
// A Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, llama2.c) in LibTorch.
#include <torch/types.h>

#include <map>
#include <string>
#include <vector>

#include "cache/kv_cache.h"
#include "model/config.h"
#include "model/ops.h"

namespace kvdrift {

using WeightMap = std::map<std::string, torch::Tensor>;

// Where a model came from, for logs and outputs.
// The checkpoint layouts kvdrift reads (docs/model.md).
enum class ModelFormat { Llama2c, HuggingFace, Synthetic };
inline constexpr EnumName<ModelFormat> kModelFormatNames[] = {
    {ModelFormat::Llama2c, "llama2c"}, {ModelFormat::HuggingFace, "hf"}, {ModelFormat::Synthetic, "synthetic"}};
inline const char* model_format_name(ModelFormat format) { return enum_name(kModelFormatNames, format); }

struct ModelSource {
  std::string path;  // file, directory or "synthetic:NAME"
  ModelFormat format = ModelFormat::Llama2c;
};

// What a forward's layer hands its observer: the rows' positions (`spans`, and `query_positions` as
// ops::attention takes them), q [batch, heads, T, head_dim] after RoPE, the step's new keys/values
// [batch, kv_heads, T, head_dim], and the attention output [batch, heads, T, head_dim] (before the
// output projection).
struct LayerAttention {
  int64_t layer;
  const RowSpans& spans;
  const torch::Tensor& query_positions;
  const torch::Tensor& q;
  const torch::Tensor& keys;
  const torch::Tensor& values;
  const torch::Tensor& output;
};

// Sees each layer's attention during forward. The engine's static lanes and per-layer metrics hang
// here; an observer must not modify what it sees.
class AttentionObserver {
 public:
  virtual ~AttentionObserver() = default;
  virtual void observe(const LayerAttention& attention) = 0;
};

class LlamaModel {
 public:
  // `weights` holds every tensor of expected_weight_shapes(config) under its HF name (any dtype, any
  // device); they are checked, converted to `dtype` on `device`, and fused for the decode step.
  // `source` names the checkpoint in error messages.
  LlamaModel(ModelConfig config, const WeightMap& weights, ModelSource source, torch::Device device,
             torch::ScalarType dtype);

  // tokens [batch, T] (int64): runs each row's positions of `spans`, writing their keys/values into
  // `cache`. Returns float32 logits [batch, T, vocab]; with last_only, [batch, 1, vocab] at each row's
  // last real token.
  torch::Tensor forward(const torch::Tensor& tokens, const RowSpans& spans, KVCache& cache, bool last_only = false,
                        AttentionObserver* observer = nullptr) const;
  // Every row at positions [start, start+T), in the phase sequential_phase gives.
  torch::Tensor forward(const torch::Tensor& tokens, int64_t start, KVCache& cache, bool last_only = false,
                        AttentionObserver* observer = nullptr) const {
    const int64_t width = tokens.size(1);
    return forward(tokens, RowSpans::aligned(tokens.size(0), start, width, sequential_phase(start, width)), cache,
                   last_only, observer);
  }

  StaticKVCache make_cache(int64_t batch, int64_t capacity) const;

  const ModelConfig& config() const { return config_; }
  const ModelSource& source() const { return source_; }
  torch::Device device() const { return device_; }
  torch::ScalarType dtype() const { return dtype_; }
  int64_t weight_bytes() const;
  // Positions the RoPE tables cover now: they grow with the positions a forward reaches (doubling, up to
  // the model's context), so that a declared context of 2^24 does not cost gigabytes of tables up front.
  int64_t rope_positions() const { return rope_.cos.size(0); }

 private:
  struct Layer {
    torch::Tensor attn_norm;
    torch::Tensor wqkv;            // q, k and v projections stacked: one matmul per step
    torch::Tensor bqkv;            // undefined unless attention_bias
    torch::Tensor q_norm, k_norm;  // undefined unless qk_norm
    torch::Tensor wo;
    torch::Tensor ffn_norm;
    torch::Tensor w_gate_up;  // gate and up projections stacked
    torch::Tensor w_down;
  };

  ModelConfig config_;
  ModelSource source_;
  torch::Device device_;
  torch::ScalarType dtype_;
  torch::Tensor embedding_;
  std::vector<Layer> layers_;
  torch::Tensor final_norm_;
  torch::Tensor classifier_;  // aliases embedding_ when tied
  mutable ops::RopeTables rope_;  // grown by forward (rope_positions)
};

}  // namespace kvdrift
