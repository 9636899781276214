// `quarot`: a Hadamard rotation of each head vector spreads outlier channels over the whole vector,
// then every token is quantized per token in groups of G channels as soon as it is written. Keys use
// an integer zero point on a range that always contains 0; values use plain clipped min/max.
#include <cmath>

#include "core/error.h"
#include "quant/affine.h"
#include "quant/hadamard.h"
#include "quant/params.h"
#include "quant/quantizer.h"

namespace kvdrift {

namespace {

constexpr double kScaleEps = 1e-8;  // value scales only; key ranges are never empty

// Low bit widths lose more to outliers than to clipping them.
double default_clip_ratio(int64_t bits) { return bits <= 4 ? 0.95 : 1.0; }

struct RoleSettings {
  int64_t bits;
  double clip_ratio;
};

class QuarotQuantizer final : public Quantizer {
 public:
  QuarotQuantizer(ParamReader& params, int64_t head_dim) : head_dim_(head_dim) {
    key_.bits = params.integer("k_bits", 4, 1, 8);
    value_.bits = params.integer("v_bits", 4, 1, 8);
    group_ = params.integer("group_size", head_dim, 1, 1 << 20);
    // A clip_ratio given by the user applies to both roles; otherwise each role's default follows its bits.
    const bool clip_given = params.has("clip_ratio");
    const double clip = params.real("clip_ratio", 1.0, 0.0, 1.0);
    if (clip <= 0.0) params.reject(fmt::format("clip_ratio {} is not in (0, 1]", clip));
    key_.clip_ratio = clip_given ? clip : default_clip_ratio(key_.bits);
    value_.clip_ratio = clip_given ? clip : default_clip_ratio(value_.bits);
    scale_dtype_ = params.choice("scale_dtype", "float16", quant::scale_dtypes());
    if (!quant::has_hadamard(head_dim))
      params.reject(fmt::format("head_dim {} has no Hadamard construction (supported: powers of two, or K * 2^m "
                                "with K in 12, 20, 28, 36, 40, 52, 60)",
                                head_dim));
    if (head_dim % group_ != 0)
      params.reject(fmt::format("group_size {} does not divide head_dim {}", group_, head_dim));
  }

  std::string method() const override { return "quarot"; }

  ParamMap resolved_params() const override {
    const std::string clip_ratio =
        key_.clip_ratio == value_.clip_ratio
            ? fmt::format("{}", key_.clip_ratio)
            : fmt::format("{} (keys), {} (values)", key_.clip_ratio, value_.clip_ratio);
    return {{"k_bits", std::to_string(key_.bits)},
            {"v_bits", std::to_string(value_.bits)},
            {"group_size", std::to_string(group_)},
            {"clip_ratio", clip_ratio},
            {"scale_dtype", scale_dtype_}};
  }

  RolePolicy policy(Role) const override {
    // Every token is quantized when written, so the step's own token is read quantized too.
    return {0, 1, 1};
  }

  QuantizedTiles quantize(const torch::Tensor& x, Role role) const override {
    const int64_t n = x.size(0), tokens = x.size(1);
    auto groups = quant::hadamard_rotate(x).reshape({n, tokens, head_dim_ / group_, group_});
    QuantizedTiles tiles = role == Role::Key ? quantize_keys(groups) : quantize_values(groups);
    tiles.codes = tiles.codes.reshape({n, tokens, head_dim_});
    return tiles;
  }

  torch::Tensor dequantize(const QuantizedTiles& tiles, Role role) const override {
    const int64_t n = tiles.codes.size(0), tokens = tiles.codes.size(1);
    auto codes = tiles.codes.to(torch::kFloat32).reshape({n, tokens, head_dim_ / group_, group_});
    auto scale = tiles.params.at("scale").values.unsqueeze(-1);
    auto rotated = role == Role::Key ? scale * (codes - tiles.params.at("zero").values.unsqueeze(-1))
                                     : codes * scale + tiles.params.at("minimum").values.unsqueeze(-1);
    return quant::hadamard_unrotate(rotated.reshape({n, tokens, head_dim_}));
  }

 private:
  // groups: rotated [N, T, D/G, G]. Codes keep that shape; parameters are [N, T, D/G].
  QuantizedTiles quantize_keys(const torch::Tensor& groups) const {
    const double levels = std::pow(2.0, static_cast<double>(key_.bits)) - 1.0;
    auto low = std::get<0>(groups.min(-1, /*keepdim=*/true)).clamp_max(0.0) * key_.clip_ratio;
    auto high = std::get<0>(groups.max(-1, /*keepdim=*/true)).clamp_min(0.0) * key_.clip_ratio;
    // The range always contains 0, so it is empty only for an all-zero group: use [-1, 1] there.
    auto empty = high == low;
    low = torch::where(empty, torch::full_like(low, -1.0), low);
    high = torch::where(empty, torch::full_like(high, 1.0), high);
    auto scale = (high - low) / levels;
    auto zero = torch::round(-low / scale) + 0.0;  // + 0.0 turns the -0 of a group without negatives into +0
    auto codes = (torch::round(groups / scale) + zero).clamp(0.0, levels);
    QuantizedTiles tiles;
    tiles.codes = codes.to(torch::kUInt8);
    tiles.bits = key_.bits;
    tiles.params["scale"] = {quant::round_to_storage(scale.squeeze(-1), scale_dtype_), scale_dtype_};
    tiles.params["zero"] = {zero.squeeze(-1), "uint8"};  // an integer in [0, 2^bits - 1]
    return tiles;
  }

  QuantizedTiles quantize_values(const torch::Tensor& groups) const {
    auto minmax = quant::quantize_minmax(groups, value_.bits, kScaleEps, value_.clip_ratio);
    QuantizedTiles tiles;
    tiles.codes = minmax.codes;
    tiles.bits = value_.bits;
    tiles.params["scale"] = {quant::round_to_storage(minmax.scale.squeeze(-1), scale_dtype_), scale_dtype_};
    tiles.params["minimum"] = {quant::round_to_storage(minmax.minimum.squeeze(-1), scale_dtype_), scale_dtype_};
    return tiles;
  }

  int64_t head_dim_, group_;
  RoleSettings key_, value_;
  std::string scale_dtype_;
};

}  // namespace

std::unique_ptr<Quantizer> make_quarot(ParamReader& params, int64_t head_dim) {
  return std::make_unique<QuarotQuantizer>(params, head_dim);
}

}  // namespace kvdrift
