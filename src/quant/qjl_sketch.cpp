#include "quant/qjl_sketch.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

namespace kvdrift::quant {

torch::Tensor gaussian_projection(int64_t m, int64_t d, uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  return torch::randn({m, d}, generator, torch::kFloat32);
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
