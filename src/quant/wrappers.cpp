// Causal wrappers (`wrap: ...` on any method): quantize as the method does, then put back one part of
// the truth, or turn the method's error into an error of one kind at the same energy, so a run can
// tell which part of the error drives accumulation. Per token vector x (one position of one kv-head),
// x_hat the method's, E_T = |x - x_hat|^2:
//   true_scale:     x_hat' = x_hat * |x| / |x_hat|   (only direction error left: E_M = 0)
//   true_direction: x_hat' = x / |x| * |x_hat|       (only magnitude error left: E_D = 0)
//   equal_error_scale:     x_hat' = x / |x| * (|x| + s sqrt(E_T)), s the sign of |x_hat| - |x| (+1 when
//                          |x| - sqrt(E_T) would be negative): E_M' = E_T, E_D' = 0
//   equal_error_direction: |x_hat'| = |x|, turned from x towards x_hat's part orthogonal to x by the
//                          angle with 2 |x|^2 (1 - cos theta) = E_T (pi when E_T >= 4 |x|^2): E_D' = E_T, E_M' = 0
// Zero vectors and rows without error keep the method's x_hat. They are analysis tools, not storage
// formats: the truth they use is kept as a stored parameter (the true norms, or the true vectors) in
// float32, so their bits per element are the method's plus that side information.
#include <fmt/ranges.h>

#include "core/error.h"
#include "quant/quantizer.h"
#include "quant/wrappers.h"

namespace kvdrift {

namespace {

class TrueScaleOrDirection final : public Quantizer {
 public:
  TrueScaleOrDirection(std::unique_ptr<Quantizer> inner, bool true_scale)
      : inner_(std::move(inner)), true_scale_(true_scale) {}

  std::string method() const override { return inner_->method(); }
  ParamMap resolved_params() const override {
    ParamMap params = inner_->resolved_params();
    params["wrap"] = true_scale_ ? "true_scale" : "true_direction";
    return params;
  }
  RolePolicy policy(Role role) const override { return inner_->policy(role); }

  QuantizedTiles quantize(const torch::Tensor& x, Role role, int64_t layer) const override {
    QuantizedTiles tiles = inner_->quantize(x, role, layer);
    const auto x32 = x.to(torch::kFloat32);
    if (true_scale_) {
      tiles.params["true_norm"] = {x32.norm(2, -1), StoredDtype::Float32};  // [N, T]
    } else {
      tiles.params["true_vector"] = {x32.clone(), StoredDtype::Float32};  // [N, T, D]
    }
    return tiles;
  }

  torch::Tensor dequantize(const QuantizedTiles& tiles, Role role, int64_t layer) const override {
    QuantizedTiles inner_tiles = tiles;
    inner_tiles.params.erase(true_scale_ ? "true_norm" : "true_vector");
    const auto restored = inner_->dequantize(inner_tiles, role, layer);
    const auto norm = restored.norm(2, -1, /*keepdim=*/true);
    if (true_scale_) {
      // A vector quantized to 0 has no direction to rescale: it stays 0.
      const auto scale = tiles.params.at("true_norm").values.unsqueeze(-1) / norm;
      return torch::where(norm > 0, restored * scale, restored);
    }
    const auto& truth = tiles.params.at("true_vector").values;
    const auto true_norm = truth.norm(2, -1, /*keepdim=*/true);
    return torch::where(true_norm > 0, truth * (norm / true_norm), torch::zeros_like(truth));
  }

 private:
  std::unique_ptr<Quantizer> inner_;
  bool true_scale_;
};

// x_hat' with the method's error energy moved entirely into magnitude (scale) or direction, in float64
// so that E_M' and E_D' come out exact to float32 rounding. x, x_hat: [..., D].
torch::Tensor equal_error(const torch::Tensor& x32, const torch::Tensor& x_hat32, bool scale) {
  const auto x = x32.to(torch::kFloat64), x_hat = x_hat32.to(torch::kFloat64);
  const auto norm = x.norm(2, -1, /*keepdim=*/true);
  const auto error = (x - x_hat).pow(2).sum(-1, /*keepdim=*/true);
  const auto unit = x / norm.clamp_min(1e-300);
  torch::Tensor result;
  if (scale) {
    const auto root = error.sqrt();
    const auto grows = (x_hat.norm(2, -1, /*keepdim=*/true) >= norm) | (norm < root);
    result = unit * (norm + torch::where(grows, root, -root));
  } else {
    // The method's error orthogonal to x; where it has none, the coordinate axis least aligned with x.
    auto orthogonal = x_hat - unit * (x_hat * unit).sum(-1, /*keepdim=*/true);
    const auto axis = torch::zeros_like(x).scatter_(-1, x.abs().argmin(-1, /*keepdim=*/true), 1.0);
    const auto axis_orthogonal = axis - unit * (axis * unit).sum(-1, /*keepdim=*/true);
    const auto orthogonal_norm = orthogonal.norm(2, -1, /*keepdim=*/true);
    orthogonal = torch::where(orthogonal_norm > 1e-12 * norm, orthogonal, axis_orthogonal);
    const auto direction = orthogonal / orthogonal.norm(2, -1, /*keepdim=*/true).clamp_min(1e-300);
    const auto cosine = (1.0 - error / (2.0 * norm * norm).clamp_min(1e-300)).clamp(-1.0, 1.0);
    result = norm * (cosine * unit + (1.0 - cosine * cosine).clamp_min(0.0).sqrt() * direction);
  }
  return torch::where((norm > 0) & (error > 0), result, x_hat).to(torch::kFloat32);
}

class EqualError final : public Quantizer {
 public:
  EqualError(std::unique_ptr<Quantizer> inner, bool scale) : inner_(std::move(inner)), scale_(scale) {}

  std::string method() const override { return inner_->method(); }
  ParamMap resolved_params() const override {
    ParamMap params = inner_->resolved_params();
    params["wrap"] = scale_ ? "equal_error_scale" : "equal_error_direction";
    return params;
  }
  RolePolicy policy(Role role) const override { return inner_->policy(role); }

  QuantizedTiles quantize(const torch::Tensor& x, Role role, int64_t layer) const override {
    QuantizedTiles tiles = inner_->quantize(x, role, layer);
    tiles.params["true_vector"] = {x.to(torch::kFloat32).clone(), StoredDtype::Float32};  // [N, T, D]
    return tiles;
  }

  torch::Tensor dequantize(const QuantizedTiles& tiles, Role role, int64_t layer) const override {
    QuantizedTiles inner_tiles = tiles;
    inner_tiles.params.erase("true_vector");
    return equal_error(tiles.params.at("true_vector").values, inner_->dequantize(inner_tiles, role, layer), scale_);
  }

 private:
  std::unique_ptr<Quantizer> inner_;
  bool scale_;
};

}  // namespace

const std::vector<std::string>& wrapper_names() {
  static const std::vector<std::string> names = {"true_scale", "true_direction", "equal_error_scale",
                                                 "equal_error_direction"};
  return names;
}

std::unique_ptr<Quantizer> wrap_quantizer(std::unique_ptr<Quantizer> inner, const std::string& wrapper) {
  if (wrapper == "true_scale") return std::make_unique<TrueScaleOrDirection>(std::move(inner), true);
  if (wrapper == "true_direction") return std::make_unique<TrueScaleOrDirection>(std::move(inner), false);
  const bool equal_error_scale = wrapper == "equal_error_scale";
  if (equal_error_scale || wrapper == "equal_error_direction") {
    // Without an error there is no energy to move: the wrapper would silently measure `none`.
    if (inner->method() == "none")
      fail("quantizer 'none': wrap = '{}' needs a method with an error to redistribute; 'none' has none",
           wrapper);
    return std::make_unique<EqualError>(std::move(inner), equal_error_scale);
  }
  fail("quantizer '{}': parameter wrap = '{}' is not one of {}", inner->method(), wrapper,
       fmt::join(wrapper_names(), ", "));
}

}  // namespace kvdrift
