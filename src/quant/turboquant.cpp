// `turboquant` (Zandieh, Daliri, Hadian, Mirrokni, arXiv 2504.19874): each head vector x is split into
// its norm (stored float16) and its direction u = x / |x|; u is rotated by a seeded random rotation, so
// that each coordinate follows the distribution of one coordinate of a uniformly random unit vector in
// dimension d, f(t) ~ (1 - t^2)^((d - 3) / 2) on [-1, 1]; each coordinate is then quantized on its own
// with the b-bit Lloyd-Max codebook of f (computed once per (d, b) and cached):
//   variant mse:  y = R u, q_i = the nearest centroid of y_i; x_hat = |x| R^T c(q)
//   variant prod: b - 1 bits as mse, then one bit of QJL on the residual r = y - c(q): z = sign(S r) with
//                 S a seeded d x d Gaussian matrix, and |r| stored float16;
//                 x_hat = |x| R^T (c(q) + sqrt(pi / 2) / d |r| S^T z), whose inner product with any
//                 query is unbiased over S (b = 1: QJL alone).
// The rotation is a randomized Hadamard transform, R = H diag(s) with seeded signs s (the paper draws a
// uniformly random orthogonal matrix; H diag(s) makes any fixed vector's coordinates close to that
// distribution, and leaves a uniformly random one's exactly so). One rotation and one S per quantizer
// (`seed`), for every layer and role. The code of an element is q (mse) or 2 q + [S r >= 0] (prod),
// b bits, counted at b bits.
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "core/error.h"
#include "quant/affine.h"
#include "quant/hadamard.h"
#include "quant/params.h"
#include "quant/qjl_sketch.h"
#include "quant/quantizer.h"

namespace kvdrift {

namespace {

// The Lloyd-Max centroids (ascending) of the coordinate density f_d on [-1, 1] with 2^bits cells:
// Lloyd's iteration (cells split at the centroids' midpoints, centroids at the cells' conditional means)
// from equal-mass cells, in double precision on a grid of 2^18 points (cells are runs of grid points),
// until the cells stop changing.
std::vector<double> lloyd_max_centroids(int64_t dim, int64_t bits) {
  constexpr int64_t kPoints = int64_t{1} << 18;
  const double exponent = 0.5 * static_cast<double>(dim - 3);
  std::vector<double> t(kPoints), mass(kPoints + 1, 0.0), moment(kPoints + 1, 0.0);
  for (int64_t i = 0; i < kPoints; ++i) {
    t[i] = -1.0 + (2.0 * static_cast<double>(i) + 1.0) / static_cast<double>(kPoints);
    const double weight = std::exp(exponent * std::log1p(-t[i] * t[i]));
    mass[i + 1] = mass[i] + weight;
    moment[i + 1] = moment[i] + weight * t[i];
  }
  const int64_t levels = int64_t{1} << bits;
  // Cell k is the grid points [first[k], first[k + 1]).
  std::vector<int64_t> first(levels + 1, kPoints);
  first[0] = 0;
  for (int64_t k = 1; k < levels; ++k) {
    const double target = mass[kPoints] * static_cast<double>(k) / static_cast<double>(levels);
    first[k] = std::lower_bound(mass.begin() + 1, mass.end(), target) - (mass.begin() + 1);
  }
  std::vector<double> centroids(levels, 0.0);
  for (int iteration = 0; iteration < 100000; ++iteration) {
    for (int64_t k = 0; k < levels; ++k) {
      const double cell_mass = mass[first[k + 1]] - mass[first[k]];
      if (cell_mass > 0) centroids[k] = (moment[first[k + 1]] - moment[first[k]]) / cell_mass;
    }
    bool changed = false;
    for (int64_t k = 1; k < levels; ++k) {
      const double boundary = 0.5 * (centroids[k - 1] + centroids[k]);
      const int64_t split = std::lower_bound(t.begin(), t.end(), boundary) - t.begin();
      changed = changed || split != first[k];
      first[k] = split;
    }
    if (!changed) break;
  }
  return centroids;
}

// lloyd_max_centroids, computed once per (dim, bits) for the whole process.
const std::vector<double>& cached_centroids(int64_t dim, int64_t bits) {
  static std::mutex mutex;
  static std::map<std::pair<int64_t, int64_t>, std::vector<double>> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find({dim, bits});
  if (it == cache.end()) it = cache.emplace(std::make_pair(dim, bits), lloyd_max_centroids(dim, bits)).first;
  return it->second;
}

// One role's codebook: the centroids and the cell boundaries between them, float32.
struct Codebook {
  torch::Tensor centroids;   // [2^b]
  torch::Tensor boundaries;  // [2^b - 1]
};

Codebook make_codebook(int64_t dim, int64_t bits) {
  if (bits == 0) return {torch::zeros({1}), torch::empty({0})};
  const auto& centroids = cached_centroids(dim, bits);
  auto values = torch::tensor(centroids, torch::kFloat64);
  auto boundaries = 0.5 * (values.slice(0, 0, -1) + values.slice(0, 1));
  return {values.to(torch::kFloat32), boundaries.to(torch::kFloat32)};
}

class TurboQuantQuantizer final : public Quantizer {
 public:
  TurboQuantQuantizer(ParamReader& params, int64_t head_dim) {
    key_bits_ = params.integer("k_bits", 4, 1, 8);
    value_bits_ = params.integer("v_bits", 4, 1, 8);
    prod_ = params.choice("variant", "mse", {"mse", "prod"}) == "prod";
    seed_ = params.integer("seed", 0, 0, int64_t{1} << 62);
    if (!quant::has_hadamard(head_dim))
      params.reject(fmt::format("head_dim {} has no Hadamard construction for the randomized rotation (supported: {})",
                                head_dim, quant::hadamard_dims()));
    auto generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed_));
    signs_ = torch::randint(0, 2, {head_dim}, generator, torch::kFloat32) * 2.0 - 1.0;
    // S from a second stream of the same seed, so that the signs do not depend on the variant.
    if (prod_) projection_ = quant::gaussian_projection(head_dim, head_dim, static_cast<uint64_t>(seed_) + 1);
    key_codebook_ = make_codebook(head_dim, key_bits_ - (prod_ ? 1 : 0));
    value_codebook_ = make_codebook(head_dim, value_bits_ - (prod_ ? 1 : 0));
  }

  std::string method() const override { return "turboquant"; }
  ParamMap resolved_params() const override {
    return {{"k_bits", std::to_string(key_bits_)},
            {"v_bits", std::to_string(value_bits_)},
            {"variant", prod_ ? "prod" : "mse"},
            {"seed", std::to_string(seed_)}};
  }
  // Every token is quantized when written, so the step's own token is read quantized too.
  RolePolicy policy(Role) const override { return {0, 1, 1}; }

  QuantizedTiles quantize(const torch::Tensor& x, Role role, int64_t) const override {
    const auto x32 = x.to(torch::kFloat32);
    const auto norm = x32.norm(2, -1, /*keepdim=*/true);
    const auto direction = torch::where(norm > 0, x32 / norm, torch::zeros_like(x32));
    const auto rotated = quant::hadamard_rotate(direction * signs_.to(x.device()));
    const Codebook& codebook = role == Role::Key ? key_codebook_ : value_codebook_;
    const auto index = torch::bucketize(rotated, codebook.boundaries.to(x.device()));
    QuantizedTiles tiles;
    tiles.bits = role == Role::Key ? key_bits_ : value_bits_;
    tiles.stored_code_bits = tiles.bits;
    tiles.params["norm"] = quant::stored_param(norm.squeeze(-1), StoredDtype::Float16);
    if (!prod_) {
      tiles.codes = index.to(torch::kUInt8);
      return tiles;
    }
    const auto residual = rotated - codebook.centroids.to(x.device()).index({index});
    tiles.codes = (2 * index + quant::qjl_sign_bits(residual, projection_)).to(torch::kUInt8);
    tiles.params["residual_norm"] = quant::stored_param(residual.norm(2, -1), StoredDtype::Float16);
    return tiles;
  }

  torch::Tensor dequantize(const QuantizedTiles& tiles, Role role, int64_t) const override {
    const Codebook& codebook = role == Role::Key ? key_codebook_ : value_codebook_;
    const auto device = tiles.codes.device();
    const auto codes = tiles.codes.to(torch::kLong);
    auto rotated = codebook.centroids.to(device).index({prod_ ? torch::bitwise_right_shift(codes, 1) : codes});
    if (prod_)
      rotated = rotated + quant::qjl_reconstruct(torch::bitwise_and(codes, 1), tiles.params.at("residual_norm").values,
                                                 projection_);
    const auto direction = quant::hadamard_unrotate(rotated) * signs_.to(device);
    return tiles.params.at("norm").values.unsqueeze(-1) * direction;
  }

 private:
  int64_t key_bits_ = 4, value_bits_ = 4, seed_ = 0;
  bool prod_ = false;
  torch::Tensor signs_;       // [d], +-1
  torch::Tensor projection_;  // S [d, d], N(0, 1) entries (prod only)
  Codebook key_codebook_, value_codebook_;
};

}  // namespace

std::unique_ptr<Quantizer> make_turboquant(ParamReader& params, int64_t head_dim) {
  return std::make_unique<TurboQuantQuantizer>(params, head_dim);
}

}  // namespace kvdrift
