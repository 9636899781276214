// Causal wrappers (`wrap: true_scale | true_direction` on any method): quantize as the method does,
// then put back one part of the truth, so a run can tell which part of the error drives accumulation.
//   true_scale:     x_hat' = x_hat * |x| / |x_hat|   (only direction error left: E_M = 0)
//   true_direction: x_hat' = x / |x| * |x_hat|       (only magnitude error left: E_D = 0)
// per token vector (one position of one kv-head). They are analysis tools, not storage formats: the
// truth they restore is kept as a stored parameter (the true norms, or the true vectors) in float32,
// so their bits per element are the method's plus that side information.
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

}  // namespace

const std::vector<std::string>& wrapper_names() {
  static const std::vector<std::string> names = {"true_scale", "true_direction"};
  return names;
}

std::unique_ptr<Quantizer> wrap_quantizer(std::unique_ptr<Quantizer> inner, const std::string& wrapper) {
  if (wrapper == "true_scale") return std::make_unique<TrueScaleOrDirection>(std::move(inner), true);
  if (wrapper == "true_direction") return std::make_unique<TrueScaleOrDirection>(std::move(inner), false);
  fail("quantizer '{}': parameter wrap = '{}' is not one of true_scale, true_direction", inner->method(), wrapper);
}

}  // namespace kvdrift
