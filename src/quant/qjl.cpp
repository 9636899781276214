// `qjl` (Zandieh, Daliri, Han, arXiv 2406.03482) for keys: each key k is stored as its one-bit sketch
// z = sign(S k) under a seeded S [m, d] (`m`, a positive multiple of head_dim, default head_dim;
// `sketch`: gaussian, as the paper's estimator assumes, or orthogonal, the authors' code's default) and
// its norm |k| in float16; the dequantized key is k_hat = sqrt(pi / 2) / m |k| S^T z, so that q . k_hat
// is QJL's inner-product estimator exactly (unbiased over a Gaussian S). `residual_length` R > 0 keeps
// the newest keys in full precision and sketches them R at a time once R are due (the authors' buffer
// of 128); 0, each key as it is written. Values are quantized by another method: `value_method`
// (default rtn) with its parameters given as `value.NAME` (value.v_bits: 2), and that method's value
// policy. The authors' separate sketch of each group's outlier channels is not modelled. The sketch is
// quant/qjl_sketch.h's, which TurboQuant's prod variant uses too.
#include <string>

#include "core/error.h"
#include "quant/affine.h"
#include "quant/params.h"
#include "quant/qjl_sketch.h"
#include "quant/quantizer.h"

namespace kvdrift {

namespace {

class QjlQuantizer final : public Quantizer {
 public:
  QjlQuantizer(ParamReader& params, int64_t head_dim) : head_dim_(head_dim) {
    sketch_ = params.integer("m", head_dim, 1, int64_t{1} << 20);
    if (sketch_ % head_dim != 0)
      params.reject(fmt::format("m {} is not a multiple of head_dim {}", sketch_, head_dim));
    seed_ = params.integer("seed", 0, 0, int64_t{1} << 62);
    sketch_kind_ = params.choice("sketch", "gaussian", {"gaussian", "orthogonal"});
    residual_ = params.integer("residual_length", 0, 0, int64_t{1} << 20);
    value_method_ = params.text("value_method", "rtn");
    if (value_method_ == "qjl") params.reject("value_method cannot be qjl: QJL's sketch is for keys");
    values_ = make_quantizer(value_method_, params.prefixed("value."), head_dim);
    projection_ = sketch_kind_ == "orthogonal"
                      ? quant::orthogonal_projection(sketch_, head_dim, static_cast<uint64_t>(seed_))
                      : quant::gaussian_projection(sketch_, head_dim, static_cast<uint64_t>(seed_));
  }

  std::string method() const override { return "qjl"; }
  ParamMap resolved_params() const override {
    ParamMap params = {{"m", std::to_string(sketch_)},
                       {"seed", std::to_string(seed_)},
                       {"sketch", sketch_kind_},
                       {"residual_length", std::to_string(residual_)},
                       {"value_method", value_method_}};
    for (const auto& [key, value] : values_->resolved_params()) params["value." + key] = value;
    return params;
  }
  // Keys: every token sketched when written, or R at a time once R are due; values: the value method's.
  RolePolicy policy(Role role) const override {
    if (role == Role::Value) return values_->policy(role);
    return residual_ > 0 ? RolePolicy{0, residual_, 0} : RolePolicy{0, 1, 1};
  }

  QuantizedTiles quantize(const torch::Tensor& x, Role role, int64_t layer) const override {
    if (role == Role::Value) return values_->quantize(x, role, layer);
    const int64_t n = x.size(0), tokens = x.size(1);
    const auto keys = x.to(torch::kFloat32);
    QuantizedTiles tiles;
    // [N, T, m / d, d]: the sketch's bits laid out in rows of head_dim, as the cache packs codes per row.
    tiles.codes = quant::qjl_sign_bits(keys, projection_).reshape({n, tokens, sketch_ / head_dim_, head_dim_})
                      .to(torch::kUInt8);
    tiles.bits = 1;
    tiles.params["norm"] = quant::stored_param(keys.norm(2, -1), StoredDtype::Float16);
    return tiles;
  }

  torch::Tensor dequantize(const QuantizedTiles& tiles, Role role, int64_t layer) const override {
    if (role == Role::Value) return values_->dequantize(tiles, role, layer);
    const int64_t n = tiles.codes.size(0), tokens = tiles.codes.size(1);
    const auto bits = tiles.codes.reshape({n, tokens, sketch_});
    return quant::qjl_reconstruct(bits, tiles.params.at("norm").values, projection_);
  }

 private:
  int64_t head_dim_, sketch_ = 0, seed_ = 0, residual_ = 0;
  std::string sketch_kind_, value_method_;
  std::unique_ptr<Quantizer> values_;
  torch::Tensor projection_;  // S [m, d]
};

}  // namespace

std::unique_ptr<Quantizer> make_qjl(ParamReader& params, int64_t head_dim) {
  return std::make_unique<QjlQuantizer>(params, head_dim);
}

}  // namespace kvdrift
