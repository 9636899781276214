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
//   repair_worst:   in each quantized block of T > 1 tokens, the round(fraction T) rows with the largest
//                   error (|x - x_hat|^2, or that over |x|^2 with rank_by: relative; ties to the earlier
//                   row) get their true scale (repair: scale, as true_scale) or their true vector back
//                   (repair: vector); roles the method quantizes one token at a time (block 1) are left
//                   as they are, and a method with no role in blocks is refused.
// Zero vectors and rows without error keep the method's x_hat. They are analysis tools, not storage
// formats: the truth they use is kept as a stored parameter (the true norms, or the true vectors) in
// float32, so their bits per element are the method's plus that side information (repair_worst's:
// per repaired row a uint8 row index and its float32 norm or vector).
#include <fmt/ranges.h>

#include <cmath>
#include <limits>

#include "core/enum_names.h"
#include "core/error.h"
#include "quant/params.h"
#include "quant/quantizer.h"
#include "quant/wrappers.h"

namespace kvdrift {

namespace {

enum class Wrap { TrueScale, TrueDirection, EqualErrorScale, EqualErrorDirection, RepairWorst };
inline constexpr EnumName<Wrap> kWrapNames[] = {{Wrap::TrueScale, "true_scale"},
                                                {Wrap::TrueDirection, "true_direction"},
                                                {Wrap::EqualErrorScale, "equal_error_scale"},
                                                {Wrap::EqualErrorDirection, "equal_error_direction"},
                                                {Wrap::RepairWorst, "repair_worst"}};

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

// The method quantizes as usual; the truth it needs (the norms for true_scale, the vectors for the
// others) rides along as a float32 parameter, and dequantization applies the wrap.
class Wrapped final : public Quantizer {
 public:
  Wrapped(std::unique_ptr<Quantizer> inner, Wrap wrap) : inner_(std::move(inner)), wrap_(wrap) {}

  std::string method() const override { return inner_->method(); }
  ParamMap resolved_params() const override {
    ParamMap params = inner_->resolved_params();
    params["wrap"] = enum_name(kWrapNames, wrap_);
    return params;
  }
  RolePolicy policy(Role role) const override { return inner_->policy(role); }

  QuantizedTiles quantize(const torch::Tensor& x, Role role, int64_t layer) const override {
    QuantizedTiles tiles = inner_->quantize(x, role, layer);
    const auto x32 = x.to(torch::kFloat32);
    if (wrap_ == Wrap::TrueScale) {
      tiles.params[truth_name()] = {x32.norm(2, -1), StoredDtype::Float32};  // [N, T]
    } else {
      tiles.params[truth_name()] = {x32.clone(), StoredDtype::Float32};  // [N, T, D]
    }
    return tiles;
  }

  torch::Tensor dequantize(const QuantizedTiles& tiles, Role role, int64_t layer) const override {
    QuantizedTiles inner_tiles = tiles;
    inner_tiles.params.erase(truth_name());
    const auto restored = inner_->dequantize(inner_tiles, role, layer);
    const auto& truth = tiles.params.at(truth_name()).values;
    const auto norm = restored.norm(2, -1, /*keepdim=*/true);
    switch (wrap_) {
      case Wrap::TrueScale:
        // A vector quantized to 0 has no direction to rescale: it stays 0.
        return torch::where(norm > 0, restored * (truth.unsqueeze(-1) / norm), restored);
      case Wrap::TrueDirection: {
        const auto true_norm = truth.norm(2, -1, /*keepdim=*/true);
        return torch::where(true_norm > 0, truth * (norm / true_norm), torch::zeros_like(truth));
      }
      case Wrap::EqualErrorScale:
      case Wrap::EqualErrorDirection: return equal_error(truth, restored, wrap_ == Wrap::EqualErrorScale);
      case Wrap::RepairWorst: break;  // its own class, RepairWorst
    }
    internal_error("every wrap dequantizes", __FILE__, __LINE__);
  }

 private:
  const char* truth_name() const { return wrap_ == Wrap::TrueScale ? "true_norm" : "true_vector"; }

  std::unique_ptr<Quantizer> inner_;
  Wrap wrap_;
};

// repair_worst: the method, with the worst rows of each quantized block repaired (see the top).
class RepairWorst final : public Quantizer {
 public:
  RepairWorst(std::unique_ptr<Quantizer> inner, ParamReader& params) : inner_(std::move(inner)) {
    fraction_ = params.real("fraction", 0.05, 0.0, 1.0);
    vector_ = params.choice("repair", "scale", {"scale", "vector"}) == "vector";
    relative_ = params.choice("rank_by", "absolute", {"absolute", "relative"}) == "relative";
    params.finish();
    if (inner_->policy(Role::Key).block == 1 && inner_->policy(Role::Value).block == 1)
      params.reject(
          "wrap: repair_worst repairs the worst rows of each quantized block, and this method quantizes keys and "
          "values one token at a time (block 1): no block has rows to rank");
  }

  std::string method() const override { return inner_->method(); }
  ParamMap resolved_params() const override {
    ParamMap params = inner_->resolved_params();
    params["wrap"] = "repair_worst";
    params["fraction"] = fmt::format("{}", fraction_);
    params["repair"] = vector_ ? "vector" : "scale";
    params["rank_by"] = relative_ ? "relative" : "absolute";
    return params;
  }
  RolePolicy policy(Role role) const override { return inner_->policy(role); }

  QuantizedTiles quantize(const torch::Tensor& x, Role role, int64_t layer) const override {
    QuantizedTiles tiles = inner_->quantize(x, role, layer);
    const int64_t rows = x.size(1), count = std::llround(fraction_ * static_cast<double>(rows));
    if (inner_->policy(role).block == 1 || count == 0) return tiles;
    if (rows > 256)
      fail("quantizer '{}': wrap repair_worst stores row indices as uint8; a block of {} tokens is over 256",
           inner_->method(), rows);
    const auto x32 = x.to(torch::kFloat32);
    auto error = (x32 - inner_->dequantize(tiles, role, layer)).pow(2).sum(-1);  // [N, T]
    if (relative_) {
      const auto energy = x32.pow(2).sum(-1);  // a zero row ranks first if it has an error, last if not
      error = torch::where(energy > 0, error / energy,
                           torch::where(error > 0, std::numeric_limits<float>::infinity(), 0.0f));
    }
    const auto worst =
        std::get<1>(error.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true)).narrow(-1, 0, count);  // [N, k]
    tiles.params["repair_rows"] = {worst.to(torch::kFloat32), StoredDtype::UInt8};
    if (vector_)
      tiles.params["repair_vector"] = {x32.gather(1, worst.unsqueeze(-1).expand({-1, -1, x.size(2)})),
                                       StoredDtype::Float32};
    else
      tiles.params["repair_norm"] = {x32.norm(2, -1).gather(1, worst), StoredDtype::Float32};
    return tiles;
  }

  torch::Tensor dequantize(const QuantizedTiles& tiles, Role role, int64_t layer) const override {
    const auto rows = tiles.params.find("repair_rows");
    if (rows == tiles.params.end()) return inner_->dequantize(tiles, role, layer);
    QuantizedTiles inner_tiles = tiles;
    for (const char* name : {"repair_rows", "repair_vector", "repair_norm"}) inner_tiles.params.erase(name);
    const auto restored = inner_->dequantize(inner_tiles, role, layer);
    const auto index = rows->second.values.to(torch::kLong).unsqueeze(-1).expand({-1, -1, restored.size(2)});
    torch::Tensor repaired;
    if (vector_) {
      repaired = tiles.params.at("repair_vector").values;
    } else {
      // As true_scale: a row quantized to 0 has no direction to rescale and stays 0.
      const auto worst = restored.gather(1, index);
      const auto norm = worst.norm(2, -1, /*keepdim=*/true);
      repaired = torch::where(norm > 0, worst * (tiles.params.at("repair_norm").values.unsqueeze(-1) / norm), worst);
    }
    return restored.scatter(1, index, repaired);
  }

 private:
  std::unique_ptr<Quantizer> inner_;
  double fraction_ = 0.05;
  bool vector_ = false, relative_ = false;
};

}  // namespace

const std::vector<std::string>& wrapper_parameter_names() {
  static const std::vector<std::string> names = {"fraction", "repair", "rank_by"};
  return names;
}

const std::vector<std::string>& wrapper_names() {
  static const std::vector<std::string> names = enum_names(kWrapNames);
  return names;
}

std::unique_ptr<Quantizer> wrap_quantizer(std::unique_ptr<Quantizer> inner, const std::string& wrapper,
                                          const ParamMap& wrapper_params) {
  const std::optional<Wrap> wrap = parse_enum(kWrapNames, wrapper);
  if (!wrap)
    fail("quantizer '{}': parameter wrap = '{}' is not one of {}", inner->method(), wrapper,
         fmt::join(wrapper_names(), ", "));
  if (*wrap == Wrap::RepairWorst) {
    ParamReader params(inner->method(), wrapper_params);
    return std::make_unique<RepairWorst>(std::move(inner), params);
  }
  if (!wrapper_params.empty())
    fail("quantizer '{}': parameter {} belongs to wrap: repair_worst, not to wrap: {}", inner->method(),
         wrapper_params.begin()->first, wrapper);
  // Without an error there is no energy to move: an equal-error wrap of `none` would silently measure `none`.
  if ((*wrap == Wrap::EqualErrorScale || *wrap == Wrap::EqualErrorDirection) && inner->method() == "none")
    fail("quantizer 'none': wrap = '{}' needs a method with an error to redistribute; 'none' has none", wrapper);
  return std::make_unique<Wrapped>(std::move(inner), *wrap);
}

}  // namespace kvdrift
