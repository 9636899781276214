#include "model/llama.h"

#include <algorithm>

#include <spdlog/spdlog.h>

#include "core/device.h"
#include "core/error.h"

namespace kvdrift {

namespace {

// The RoPE tables' first size: every prompt and reply of the shipped configs fits.
constexpr int64_t kInitialRopePositions = 4096;

std::string shape_string(c10::IntArrayRef shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

// Checks names and shapes against the config before anything is converted.
void check_weights(const ModelConfig& config, const WeightMap& weights, const std::string& where) {
  const auto expected = expected_weight_shapes(config);
  for (const auto& [name, shape] : expected) {
    auto it = weights.find(name);
    if (it == weights.end()) fail("{}: missing tensor '{}'", where, name);
    if (it->second.sizes() != c10::IntArrayRef(shape))
      fail("{}: tensor '{}' has shape {}, expected {} from the config", where, name, shape_string(it->second.sizes()),
           shape_string(shape));
  }
  if (weights.size() != expected.size()) {
    for (const auto& [name, tensor] : weights) {
      bool known = false;
      for (const auto& e : expected) known = known || e.first == name;
      if (!known)
        fail("{}: unexpected tensor '{}' (not part of a {} model with this config)", where, name, config.architecture);
    }
  }
}

}  // namespace

LlamaModel::LlamaModel(ModelConfig config, const WeightMap& weights, ModelSource source, torch::Device device,
                       torch::ScalarType dtype)
    : config_(std::move(config)), source_(std::move(source)), device_(device), dtype_(dtype) {
  config_.validate(source_.path);
  check_weights(config_, weights, source_.path);
  auto take = [&](const std::string& name) { return weights.at(name).to(device_, dtype_); };
  embedding_ = take("model.embed_tokens.weight");
  for (int64_t l = 0; l < config_.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    Layer layer;
    layer.attn_norm = take(p + "input_layernorm.weight");
    torch::Tensor qkv_bias;
    if (config_.attention_bias)
      qkv_bias = torch::cat(
          {take(p + "self_attn.q_proj.bias"), take(p + "self_attn.k_proj.bias"), take(p + "self_attn.v_proj.bias")});
    layer.qkv = Linear(torch::cat({take(p + "self_attn.q_proj.weight"), take(p + "self_attn.k_proj.weight"),
                                   take(p + "self_attn.v_proj.weight")}),
                       qkv_bias);
    if (config_.qk_norm) {
      layer.q_norm = take(p + "self_attn.q_norm.weight");
      layer.k_norm = take(p + "self_attn.k_norm.weight");
    }
    layer.o = Linear(take(p + "self_attn.o_proj.weight"));
    layer.ffn_norm = take(p + "post_attention_layernorm.weight");
    layer.gate_up = Linear(torch::cat({take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")}));
    layer.down = Linear(take(p + "mlp.down_proj.weight"));
    layers_.push_back(std::move(layer));
  }
  final_norm_ = take("model.norm.weight");
  classifier_ = Linear(config_.tie_embeddings ? embedding_ : take("lm_head.weight"));
  gemm_path_ = default_gemm_path();
  rope_ = ops::rope_tables(config_, std::min<int64_t>(config_.max_seq_len, kInitialRopePositions), device_);
}

StaticKVCache LlamaModel::make_cache(int64_t batch, int64_t capacity) const {
  if (capacity > config_.max_seq_len)
    fail("{}: a context of {} positions exceeds the model's maximum of {}", source_.path, capacity,
         config_.max_seq_len);
  return StaticKVCache(config_.n_layers, batch, config_.n_kv_heads, capacity, config_.head_dim, dtype_, device_);
}

int64_t LlamaModel::weight_bytes() const {
  int64_t total =
      embedding_.numel() + final_norm_.numel() + (config_.tie_embeddings ? 0 : classifier_.weight().numel());
  for (const auto& layer : layers_) {
    for (const auto* t : {&layer.attn_norm, &layer.qkv.weight(), &layer.qkv.bias(), &layer.q_norm, &layer.k_norm,
                          &layer.o.weight(), &layer.ffn_norm, &layer.gate_up.weight(), &layer.down.weight()})
      if (t->defined()) total += t->numel();
  }
  return total * static_cast<int64_t>(c10::elementSize(dtype_));
}

void LlamaModel::set_gemm_path(GemmPath path) {
  gemm_path_ = path;
  gemm_rows_ = gemm_streak_ = 0;
  if (path == GemmPath::Plain) unpack_gemm();
}

std::vector<const Linear*> LlamaModel::linears() const {
  std::vector<const Linear*> all;
  for (const Layer& layer : layers_)
    for (const Linear* linear : {&layer.qkv, &layer.o, &layer.gate_up, &layer.down}) all.push_back(linear);
  all.push_back(&classifier_);
  return all;
}

void LlamaModel::unpack_gemm() const {
  for (const Linear* linear : linears()) linear->pack(0);
}

void LlamaModel::prepare_gemm(int64_t rows, Phase phase) const {
  if (phase == Phase::Prefill) {  // a new batch: its arithmetic must not depend on the batches before it
    gemm_rows_ = gemm_streak_ = 0;
    if (packed_rows() > 0) unpack_gemm();
    return;
  }
  if (gemm_path_ != GemmPath::Packed || rows < kMinPackedRows || !packed_gemm_available(classifier_.weight())) return;
  gemm_streak_ = rows == gemm_rows_ ? gemm_streak_ + 1 : 1;
  gemm_rows_ = rows;
  if (gemm_streak_ != kStableForwards || rows == packed_rows()) return;
  int64_t bytes = 0;
  for (const Linear* linear : linears()) bytes += linear->weight().numel() * 4;
  const std::optional<int64_t> available = available_memory_bytes();
  // The old copy is freed before the new one is made; a margin of 1 GiB is left for the caches' growth.
  const int64_t freed = packed_rows() > 0 ? bytes : 0;
  if (available && *available + freed < bytes + (int64_t{1} << 30)) {
    spdlog::warn("{}: not enough memory to keep pre-packed weights beside the model ({:.2f} GiB needed, {:.2f} "
                 "available): its GEMMs take torch::linear (kvdrift --gemm plain chooses that up front)",
                 source_.path, bytes / 1073741824.0, (*available + freed) / 1073741824.0);
    gemm_path_ = GemmPath::Plain;
    unpack_gemm();
    return;
  }
  for (const Linear* linear : linears()) linear->pack(rows);
  spdlog::debug("{}: weights pre-packed for forwards of {} rows", source_.path, rows);
}

torch::Tensor LlamaModel::forward(const torch::Tensor& tokens, const RowSpans& spans, KVCache& cache, bool last_only,
                                  AttentionObserver* observer) const {
  const ModelConfig& c = config_;
  const int64_t batch = tokens.size(0), length = tokens.size(1);
  if (spans.rows() != batch || spans.width() != length)
    fail("{}: forward of {} rows x {} tokens given positions for {} rows x {}", source_.path, batch, length,
         spans.rows(), spans.width());
  if (spans.end() > c.max_seq_len)
    fail("{}: position {} is beyond the model's context of {}", source_.path, spans.end() - 1, c.max_seq_len);
  // Each position's angles depend on it alone: a longer table holds the shorter one's rows bit for bit.
  if (spans.end() > rope_positions())
    rope_ = ops::rope_tables(c, std::min(c.max_seq_len, std::max(spans.end(), 2 * rope_positions())), device_);
  // Computed once for every layer: each token's position, and the queries' positions for the causal
  // mask unless every query reads every key (one decode step of aligned rows).
  prepare_gemm(batch * length, spans.phase());
  const auto positions = spans.positions(device_);
  const auto query_positions = length > 1 || !spans.is_aligned() ? positions : torch::Tensor();
  auto x = embedding_.index_select(0, tokens.to(device_).reshape(-1)).view({batch, length, c.dim});
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& layer = layers_[l];
    // Attention block.
    auto h = ops::rms_norm(x, layer.attn_norm, c.norm_eps);
    auto qkv = layer.qkv(h);
    auto q = qkv.narrow(-1, 0, c.q_dim()).view({batch, length, c.n_heads, c.head_dim});
    auto k = qkv.narrow(-1, c.q_dim(), c.kv_dim()).view({batch, length, c.n_kv_heads, c.head_dim});
    auto v = qkv.narrow(-1, c.q_dim() + c.kv_dim(), c.kv_dim()).view({batch, length, c.n_kv_heads, c.head_dim});
    if (c.qk_norm) {
      q = ops::rms_norm(q, layer.q_norm, c.norm_eps);
      k = ops::rms_norm(k, layer.k_norm, c.norm_eps);
    }
    q = ops::apply_rope(q, rope_, positions, c.rope_style).transpose(1, 2);
    k = ops::apply_rope(k, rope_, positions, c.rope_style).transpose(1, 2);
    v = v.transpose(1, 2);
    auto [keys, values] = cache.update(static_cast<int64_t>(l), spans, k, v);
    auto heads = ops::attention(q, keys, values, query_positions);
    if (observer) observer->observe({static_cast<int64_t>(l), spans, query_positions, q, k, v, heads});
    auto attended = heads.transpose(1, 2).reshape({batch, length, c.q_dim()});
    x = x + layer.o(attended);
    // Feed-forward block (SwiGLU).
    h = ops::rms_norm(x, layer.ffn_norm, c.norm_eps);
    auto gate_up = layer.gate_up(h);
    auto gate = gate_up.narrow(-1, 0, c.hidden_dim);
    auto up = gate_up.narrow(-1, c.hidden_dim, c.hidden_dim);
    x = x + layer.down(torch::silu(gate) * up);
  }
  if (last_only) {
    bool full_width = true;
    std::vector<int64_t> last(batch);
    for (int64_t r = 0; r < batch; ++r) {
      last[r] = std::max<int64_t>(spans.length(r) - 1, 0);  // a row with nothing in this chunk: ignored
      full_width = full_width && spans.length(r) == length;
    }
    if (full_width) {
      x = x.narrow(1, length - 1, 1);
    } else {  // a padded batch: each row's last real token
      auto index = torch::tensor(last, torch::kInt64).to(device_).view({batch, 1, 1}).expand({batch, 1, c.dim});
      x = x.gather(1, index);
    }
  }
  x = ops::rms_norm(x, final_norm_, c.norm_eps);
  return classifier_(x).to(torch::kFloat32);
}

}  // namespace kvdrift
