// `kivi`: keys per channel over groups of G consecutive tokens, flushed R tokens at a time from a
// full-precision residual; values per token over groups of G channels, behind a sliding window of R
// full-precision values. Min/max round-to-nearest in both cases. An optional full-precision sink of S
// tokens (KIVI's own code has none) for the baseline as the KVarN paper ran it (preset kvarn-paper).
#include <algorithm>

#include "core/error.h"
#include "quant/affine.h"
#include "quant/params.h"
#include "quant/quantizer.h"

namespace kvdrift {

namespace {

class KiviQuantizer final : public Quantizer {
 public:
  KiviQuantizer(ParamReader& params, int64_t head_dim) : head_dim_(head_dim) {
    // kivi: KIVI's own defaults. kvarn-paper: the baseline as the KVarN paper configured it (group 128,
    // residual 128, a 128-token full-precision sink; value groups of min(128, head_dim) channels, since
    // a value group cannot span more than one head). Explicit parameters override a preset's.
    preset_ = params.choice("preset", "kivi", {"kivi", "kvarn-paper"});
    const bool paper = preset_ == "kvarn-paper";
    k_bits_ = params.integer("k_bits", 2, 1, 8);
    v_bits_ = params.integer("v_bits", 2, 1, 8);
    group_ = params.integer("group_size", paper ? 128 : 32, 1, 1 << 20);
    value_group_ = params.integer("value_group_size", paper ? std::min<int64_t>(group_, head_dim) : group_, 1, 1 << 20);
    residual_ = params.integer("residual_length", 128, 1, 1 << 20);
    sink_ = params.integer("sink_tokens", paper ? 128 : 0, 0, 1 << 20);
    scale_dtype_ = quant::read_scale_dtype(params);
    zero_dtype_ = quant::read_zero_dtype(params, scale_dtype_);
    round_before_codes_ = quant::read_round_before_codes(params);
    if (head_dim % value_group_ != 0)
      params.reject(fmt::format("{} {} does not divide head_dim {}",
                                params.has("value_group_size") || paper ? "value_group_size" : "group_size", value_group_,
                                head_dim));
    if (residual_ % group_ != 0)
      params.reject(fmt::format("residual_length {} is not a multiple of group_size {}", residual_, group_));
  }

  std::string method() const override { return "kivi"; }

  ParamMap resolved_params() const override {
    return {{"preset", preset_},
            {"k_bits", std::to_string(k_bits_)},
            {"v_bits", std::to_string(v_bits_)},
            {"group_size", std::to_string(group_)},
            {"value_group_size", std::to_string(value_group_)},
            {"residual_length", std::to_string(residual_)},
            {"sink_tokens", std::to_string(sink_)},
            {"scale_dtype", stored_dtype_name(scale_dtype_)},
            {"zero_dtype", stored_dtype_name(zero_dtype_)},
            {"scale_rounding", quant::scale_rounding_name(round_before_codes_)}};
  }

  RolePolicy policy(Role role) const override {
    // Keys: the residual is flushed R at a time once full. Values: a window of the newest R stays full precision.
    if (role == Role::Key) return {sink_, residual_, 0};
    return {sink_, 1, -residual_};
  }

  QuantizedTiles quantize(const torch::Tensor& x, Role role, int64_t) const override {
    if (role == Role::Key && x.size(1) != residual_)
      fail("quantizer 'kivi': key tiles hold residual_length = {} tokens, got {}", residual_, x.size(1));
    const int64_t bits = role == Role::Key ? k_bits_ : v_bits_;
    auto minmax = quant::quantize_minmax(to_groups(x, role), bits, quant::kMinMaxScaleEps, 1.0,
                                         {scale_dtype_, zero_dtype_, round_before_codes_});
    QuantizedTiles tiles;
    tiles.codes = from_groups(minmax.codes, role);
    tiles.bits = bits;
    // Keys [N, T/G, D], values [N, T, D/G].
    tiles.params["scale"] = quant::stored_param(minmax.scale.squeeze(-1), scale_dtype_);
    tiles.params["minimum"] = quant::stored_param(minmax.minimum.squeeze(-1), zero_dtype_);
    return tiles;
  }

  torch::Tensor dequantize(const QuantizedTiles& tiles, Role role, int64_t) const override {
    auto codes = to_groups(tiles.codes.to(torch::kFloat32), role);
    auto scale = tiles.params.at("scale").values.unsqueeze(-1);
    auto minimum = tiles.params.at("minimum").values.unsqueeze(-1);
    return from_groups(codes * scale + minimum, role);
  }

 private:
  // [N, T, D] -> each quantization group on the last axis: keys [N, T/G, D, G] (G consecutive tokens
  // of one channel), values [N, T, D/G, G] (G consecutive channels of one token).
  torch::Tensor to_groups(const torch::Tensor& tiles, Role role) const {
    const int64_t n = tiles.size(0), tokens = tiles.size(1);
    if (role == Role::Key) return tiles.reshape({n, tokens / group_, group_, head_dim_}).transpose(2, 3);
    return tiles.reshape({n, tokens, head_dim_ / value_group_, value_group_});
  }

  // The inverse of to_groups: back to token-major [N, T, D].
  torch::Tensor from_groups(const torch::Tensor& groups, Role role) const {
    if (role == Role::Key) return groups.transpose(2, 3).flatten(1, 2);
    return groups.flatten(2, 3);
  }

  int64_t head_dim_, k_bits_, v_bits_, group_, value_group_, residual_, sink_;
  std::string preset_;
  StoredDtype scale_dtype_, zero_dtype_;
  bool round_before_codes_ = false;
};

}  // namespace

std::unique_ptr<Quantizer> make_kivi(ParamReader& params, int64_t head_dim) {
  return std::make_unique<KiviQuantizer>(params, head_dim);
}

}  // namespace kvdrift
