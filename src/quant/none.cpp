// `none`: the full-precision baseline. Nothing is ever quantized; its lanes must equal the reference.
#include <limits>

#include "quant/params.h"
#include "quant/quantizer.h"

namespace kvdrift {

namespace {

class NoQuantizer final : public Quantizer {
 public:
  std::string method() const override { return "none"; }
  ParamMap resolved_params() const override { return {}; }
  RolePolicy policy(Role) const override {
    return {0, 1, RolePolicy::kNeverDue};
  }
  QuantizedTiles quantize(const torch::Tensor& x, Role, int64_t) const override {
    // Identity: codes are unused; the values themselves are the (float32) stored parameter.
    return {torch::empty({0}, torch::kUInt8), 8, {{"values", {x.to(torch::kFloat32), StoredDtype::Float32}}}};
  }
  torch::Tensor dequantize(const QuantizedTiles& tiles, Role, int64_t) const override { return tiles.params.at("values").values; }
};

}  // namespace

std::unique_ptr<Quantizer> make_none(ParamReader&, int64_t) { return std::make_unique<NoQuantizer>(); }

}  // namespace kvdrift
