#include "quant/qjl_sketch.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <vector>

namespace kvdrift::quant {

torch::Tensor gaussian_projection(int64_t m, int64_t d, uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  return torch::randn({m, d}, generator, torch::kFloat32);
}

torch::Tensor orthogonal_projection(int64_t m, int64_t d, uint64_t seed) {
  const auto gaussian = gaussian_projection(m, d, seed).to(torch::kFloat64);
  std::vector<torch::Tensor> blocks;
  for (int64_t begin = 0; begin < m; begin += d) {
    // G^T = Q R: the rows of Q^T are an orthonormal basis drawn as Haar once R's diagonal is positive.
    auto [q, r] = torch::linalg_qr(gaussian.narrow(0, begin, d).t());
    blocks.push_back((q * r.diagonal().sign()).t() * std::sqrt(static_cast<double>(d)));
  }
  return torch::cat(blocks).to(torch::kFloat32);
}

torch::Tensor qjl_sign_bits(const torch::Tensor& r, const torch::Tensor& projection) {
  return (r.matmul(projection.to(r.device()).t()) >= 0).to(torch::kLong);
}

torch::Tensor qjl_reconstruct(const torch::Tensor& bits, const torch::Tensor& norm, const torch::Tensor& projection) {
  const double factor = std::sqrt(std::acos(-1.0) / 2.0) / static_cast<double>(projection.size(0));
  const auto signs = bits.to(torch::kFloat32) * 2.0 - 1.0;
  return factor * norm.unsqueeze(-1) * signs.matmul(projection.to(bits.device()));
}

}  // namespace kvdrift::quant
