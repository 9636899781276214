#pragma once
// A Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, llama2.c) in LibTorch.
#include <torch/types.h>

#include <map>
#include <string>
#include <vector>

#include "cache/kv_cache.h"
#include "model/config.h"
#include "model/linear.h"
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
  // How the weight GEMMs run (model/linear.h); starts as default_gemm_path(). With Packed, on CPU in
  // float32, the weights are packed for the decode forwards' row count (at least kMinPackedRows) once
  // that count has come kStableForwards times in a row since the last prefill: a batch's decode rows
  // change only when rows leave, so a batch that shrinks every few steps does not repack each time. A
  // prefill drops the packed copy, so that which steps of a batch run packed (and round as packed GEMMs
  // do) depends on that batch alone, never on what the process decoded before it: a resumed run
  // computes what an uninterrupted one did. Packing needs memory for a second copy of the weights;
  // where the machine lacks it, the model stays plain and says so once.
  void set_gemm_path(GemmPath path);
  GemmPath gemm_path() const { return gemm_path_; }
  // The row count the weights are packed for now (0: none).
  int64_t packed_rows() const { return classifier_.packed_rows(); }
  static constexpr int64_t kMinPackedRows = 4;  // below, MKL's GEMV-like paths are as fast unpacked
  static constexpr int64_t kStableForwards = 8;
  std::vector<const Linear*> linears() const;  // every weight GEMM of a forward, in order
  // Positions the RoPE tables cover now: they grow with the positions a forward reaches (doubling, up to
  // the model's context), so that a declared context of 2^24 does not cost gigabytes of tables up front.
  int64_t rope_positions() const { return rope_.cos.size(0); }

 private:
  struct Layer {
    torch::Tensor attn_norm;
    Linear qkv;                    // q, k and v projections stacked (with their biases if attention_bias)
    torch::Tensor q_norm, k_norm;  // undefined unless qk_norm
    Linear o;
    torch::Tensor ffn_norm;
    Linear gate_up;  // gate and up projections stacked
    Linear down;
  };

  // Packs every weight GEMM for a forward of `rows` rows in `phase` when set_gemm_path's rule says so.
  void prepare_gemm(int64_t rows, Phase phase) const;
  void unpack_gemm() const;

  ModelConfig config_;
  ModelSource source_;
  torch::Device device_;
  torch::ScalarType dtype_;
  torch::Tensor embedding_;
  std::vector<Layer> layers_;
  torch::Tensor final_norm_;
  Linear classifier_;  // its weight aliases embedding_ when tied
  mutable ops::RopeTables rope_;  // grown by forward (rope_positions)
  mutable GemmPath gemm_path_;  // turns Plain when the machine lacks memory for packed weights
  mutable int64_t gemm_rows_ = 0, gemm_streak_ = 0;  // the last forward's row count and how often in a row
};

}  // namespace kvdrift
