// `rtn`: asymmetric min/max round-to-nearest, per token (groups along channels) or per channel
// (groups along tokens). The ablation baseline every other method is compared against.
#include "core/error.h"
#include "quant/affine.h"
#include "quant/params.h"
#include "quant/quantizer.h"

namespace kvdrift {

namespace {

class RtnQuantizer final : public Quantizer {
 public:
  RtnQuantizer(ParamReader& params, int64_t head_dim) {
    k_bits_ = params.integer("k_bits", 4, 1, 8);
    v_bits_ = params.integer("v_bits", 4, 1, 8);
    per_token_ = params.choice("axis", "per_token", {"per_token", "per_channel"}) == "per_token";
    group_ = params.integer("group_size", per_token_ ? head_dim : 32, 1, 1 << 20);
    clip_ratio_ = params.real("clip_ratio", 1.0, 1e-3, 1.0);
    residual_ = params.integer("residual_length", 0, 0, 1 << 20);
    sink_ = params.integer("sink", 0, 0, 1 << 20);
    scale_dtype_ = quant::read_scale_dtype(params);
    zero_dtype_ = quant::read_zero_dtype(params, scale_dtype_);
    round_before_codes_ = quant::read_round_before_codes(params);
    if (per_token_ && head_dim % group_ != 0)
      params.reject(fmt::format("group_size {} does not divide head_dim {}", group_, head_dim));
    if (!per_token_ && (residual_ % group_ != 0 || sink_ % group_ != 0))
      params.reject(fmt::format("per_channel needs residual_length ({}) and sink ({}) to be multiples of group_size ({})",
                                residual_, sink_, group_));
  }

  std::string method() const override { return "rtn"; }

  ParamMap resolved_params() const override {
    return {{"k_bits", std::to_string(k_bits_)},         {"v_bits", std::to_string(v_bits_)},
            {"axis", per_token_ ? "per_token" : "per_channel"},
            {"group_size", std::to_string(group_)},      {"clip_ratio", fmt::format("{}", clip_ratio_)},
            {"residual_length", std::to_string(residual_)}, {"sink", std::to_string(sink_)},
            {"scale_dtype", stored_dtype_name(scale_dtype_)},                {"zero_dtype", stored_dtype_name(zero_dtype_)},
            {"scale_rounding", quant::scale_rounding_name(round_before_codes_)}};
  }

  RolePolicy policy(Role) const override {
    // Per token: the newest `residual` tokens (the step's own included) stay full precision.
    if (per_token_) return {sink_, 1, 1 - residual_};
    return {sink_, group_, -residual_};
  }

  QuantizedTiles quantize(const torch::Tensor& x, Role role, int64_t) const override {
    const int64_t bits = role == Role::Key ? k_bits_ : v_bits_;
    const int64_t n = x.size(0), tokens = x.size(1), dim = x.size(2);
    if (!per_token_ && tokens % group_ != 0)
      fail("quantizer 'rtn': per_channel needs tiles of a multiple of group_size {} tokens, got {}", group_, tokens);
    // Bring each group to the last axis.
    auto groups = per_token_ ? x.reshape({n, tokens, dim / group_, group_})
                             : x.reshape({n, tokens / group_, group_, dim}).transpose(2, 3);
    auto codes = quant::quantize_minmax(groups, bits, quant::kMinMaxScaleEps, clip_ratio_,
                                         {scale_dtype_, zero_dtype_, round_before_codes_});
    QuantizedTiles tiles;
    tiles.codes = per_token_ ? codes.codes.reshape({n, tokens, dim}) : codes.codes.transpose(2, 3).reshape({n, tokens, dim});
    tiles.bits = bits;
    // Parameters [N, T, D/G] (per token) or [N, T/G, D] (per channel).
    tiles.params["scale"] = quant::stored_param(codes.scale.squeeze(-1), scale_dtype_);
    tiles.params["minimum"] = quant::stored_param(codes.minimum.squeeze(-1), zero_dtype_);
    return tiles;
  }

  torch::Tensor dequantize(const QuantizedTiles& tiles, Role, int64_t) const override {
    const int64_t n = tiles.codes.size(0), tokens = tiles.codes.size(1), dim = tiles.codes.size(2);
    auto scale = tiles.params.at("scale").values.unsqueeze(-1);
    auto minimum = tiles.params.at("minimum").values.unsqueeze(-1);
    if (per_token_) {
      auto codes = tiles.codes.to(torch::kFloat32).reshape({n, tokens, dim / group_, group_});
      return (codes * scale + minimum).reshape({n, tokens, dim});
    }
    auto codes = tiles.codes.to(torch::kFloat32).reshape({n, tokens / group_, group_, dim}).transpose(2, 3);
    return (codes * scale + minimum).transpose(2, 3).reshape({n, tokens, dim});
  }

 private:
  int64_t k_bits_, v_bits_, group_, residual_, sink_;
  bool per_token_;
  double clip_ratio_;
  StoredDtype scale_dtype_, zero_dtype_;
  bool round_before_codes_ = false;
};

}  // namespace

std::unique_ptr<Quantizer> make_rtn(ParamReader& params, int64_t head_dim) {
  return std::make_unique<RtnQuantizer>(params, head_dim);
}

}  // namespace kvdrift
