// `quarot`: a Hadamard rotation of each head vector spreads outlier channels over the whole vector,
// then every token is quantized per token in groups of G channels as soon as it is written. Both roles
// use QuaRot's integer zero point z = round(-min / s), x_hat = s (q - z) (its ActQuantizer): keys on a
// range that always contains 0 (so z fits the code width), values on the clipped [min, max] (so z may
// lie outside it and is stored in zero_dtype). value_zero_point: float_minimum keeps the older
// x_hat = q s + min variant for comparison.
#include <cmath>
#include <limits>

#include "core/error.h"
#include "quant/affine.h"
#include "quant/hadamard.h"
#include "quant/params.h"
#include "quant/quantizer.h"

namespace kvdrift {

namespace {

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
    scale_dtype_ = quant::read_scale_dtype(params);
    zero_dtype_ = quant::read_zero_dtype(params, scale_dtype_);
    round_before_codes_ = quant::read_round_before_codes(params);
    integer_value_zero_ = params.choice("value_zero_point", "integer", {"integer", "float_minimum"}) == "integer";
    if (!quant::has_hadamard(head_dim))
      params.reject(
          fmt::format("head_dim {} has no Hadamard construction (supported: {})", head_dim, quant::hadamard_dims()));
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
            {"scale_dtype", stored_dtype_name(scale_dtype_)},
            {"zero_dtype", stored_dtype_name(zero_dtype_)},
            {"value_zero_point", integer_value_zero_ ? "integer" : "float_minimum"},
            {"scale_rounding", quant::scale_rounding_name(round_before_codes_)}};
  }

  RolePolicy policy(Role) const override {
    // Every token is quantized when written, so the step's own token is read quantized too.
    return {0, 1, 1};
  }

  QuantizedTiles quantize(const torch::Tensor& x, Role role, int64_t) const override {
    const int64_t n = x.size(0), tokens = x.size(1);
    auto groups = quant::hadamard_rotate(x).reshape({n, tokens, head_dim_ / group_, group_});
    QuantizedTiles tiles = role == Role::Key    ? quantize_integer_zero(groups, key_, true, StoredDtype::UInt8)
                           : integer_value_zero_ ? quantize_integer_zero(groups, value_, false, zero_dtype_)
                                                 : quantize_float_minimum(groups);
    tiles.codes = tiles.codes.reshape({n, tokens, head_dim_});
    return tiles;
  }

  torch::Tensor dequantize(const QuantizedTiles& tiles, Role, int64_t) const override {
    const int64_t n = tiles.codes.size(0), tokens = tiles.codes.size(1);
    auto codes = tiles.codes.to(torch::kFloat32).reshape({n, tokens, head_dim_ / group_, group_});
    auto scale = tiles.params.at("scale").values.unsqueeze(-1);
    auto rotated = tiles.params.count("zero") ? scale * (codes - tiles.params.at("zero").values.unsqueeze(-1))
                                              : codes * scale + tiles.params.at("minimum").values.unsqueeze(-1);
    return quant::hadamard_unrotate(rotated.reshape({n, tokens, head_dim_}));
  }

 private:
  // groups: rotated [N, T, D/G, G]. Codes keep that shape; parameters are [N, T, D/G].
  // QuaRot's asymmetric quantizer with an integer zero point, on [min, max] * clip, widened to contain
  // 0 when `contain_zero` (keys: the zero point then fits `bits`, stored as uint8).
  QuantizedTiles quantize_integer_zero(const torch::Tensor& groups, const RoleSettings& role, bool contain_zero,
                                       StoredDtype zero_dtype) const {
    const double levels = std::pow(2.0, static_cast<double>(role.bits)) - 1.0;
    auto low = std::get<0>(groups.min(-1, /*keepdim=*/true));
    auto high = std::get<0>(groups.max(-1, /*keepdim=*/true));
    if (contain_zero) {
      low = low.clamp_max(0.0);
      high = high.clamp_min(0.0);
    }
    low = low * role.clip_ratio;
    high = high * role.clip_ratio;
    // An empty range: a constant group is widened to contain 0 (then c is a code exactly); an all-zero
    // group takes [-1, 1] as in QuaRot. No scale is ever 0.
    auto constant = high == low;
    low = torch::where(constant, low.clamp_max(0.0), low);
    high = torch::where(constant, high.clamp_min(0.0), high);
    auto zero_range = high == low;
    low = torch::where(zero_range, torch::full_like(low, -1.0), low);
    high = torch::where(zero_range, torch::full_like(high, 1.0), high);
    auto scale = (high - low) / levels;
    // before_codes: the zero point and the codes follow the scale as stored.
    if (round_before_codes_)
      scale = quant::round_to_storage(scale, scale_dtype_).clamp_min(std::numeric_limits<float>::min());
    auto zero = torch::round(-low / scale) + 0.0;  // + 0.0 turns the -0 of a group without negatives into +0
    auto codes = (torch::round(groups / scale) + zero).clamp(0.0, levels);
    QuantizedTiles tiles;
    tiles.codes = codes.to(torch::kUInt8);
    tiles.bits = role.bits;
    tiles.params["scale"] = quant::stored_param(scale.squeeze(-1), scale_dtype_);
    tiles.params["zero"] = quant::stored_param(zero.squeeze(-1), zero_dtype);
    return tiles;
  }

  QuantizedTiles quantize_float_minimum(const torch::Tensor& groups) const {
    auto minmax = quant::quantize_minmax(groups, value_.bits, quant::kMinMaxScaleEps, value_.clip_ratio,
                                         {scale_dtype_, zero_dtype_, round_before_codes_});
    QuantizedTiles tiles;
    tiles.codes = minmax.codes;
    tiles.bits = value_.bits;
    tiles.params["scale"] = quant::stored_param(minmax.scale.squeeze(-1), scale_dtype_);
    tiles.params["minimum"] = quant::stored_param(minmax.minimum.squeeze(-1), zero_dtype_);
    return tiles;
  }

  int64_t head_dim_, group_;
  RoleSettings key_, value_;
  StoredDtype scale_dtype_, zero_dtype_;
  bool integer_value_zero_ = true;
  bool round_before_codes_ = false;
};

}  // namespace

std::unique_ptr<Quantizer> make_quarot(ParamReader& params, int64_t head_dim) {
  return std::make_unique<QuarotQuantizer>(params, head_dim);
}

}  // namespace kvdrift
