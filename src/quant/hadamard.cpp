#include "quant/hadamard.h"

#include <cmath>

#include "core/error.h"

namespace kvdrift::quant {

namespace {

bool is_power_of_two(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

// Checked in QuaRot's order, so d = 40·2^m uses H_40 (it would also fit H_20).
const int64_t kKnownOrders[] = {60, 52, 36, 28, 40, 20, 12};

// The known order K with d = K * 2^m, or 0.
int64_t known_factor(int64_t d) {
  for (int64_t k : kKnownOrders)
    if (d % k == 0 && is_power_of_two(d / k)) return k;
  return 0;
}

// Unnormalised Sylvester transform over the last dimension: each pass pairs index i with i + h.
torch::Tensor walsh_hadamard(const torch::Tensor& x) {
  const int64_t d = x.size(-1);
  auto y = x;
  for (int64_t h = 1; h < d; h *= 2) {
    auto pairs = y.unflatten(-1, {d / (2 * h), 2, h});
    auto a = pairs.select(-2, 0);
    auto b = pairs.select(-2, 1);
    y = torch::stack({a + b, a - b}, -2).flatten(-3);
  }
  return y;
}

torch::Tensor rotate(const torch::Tensor& x, bool transpose) {
  const int64_t d = x.size(-1);
  auto x32 = x.to(torch::kFloat32);
  if (is_power_of_two(d)) return walsh_hadamard(x32) / std::sqrt(static_cast<double>(d));  // symmetric
  const int64_t k = known_factor(d);
  if (k == 0)
    fail("head dim {} has no Hadamard construction (supported: powers of two, or K * 2^m with K in 12, 20, 28, 36, "
         "40, 52, 60)",
         d);
  // x H with H = H_K kron H_m: view x as [K, m], transform the m axis, then contract the K axis.
  const int64_t m = d / k;
  auto hk = known_hadamard_matrix(k).to(x32.device());
  if (transpose) hk = hk.t();
  auto blocks = walsh_hadamard(x32.unflatten(-1, {k, m}));                 // [..., K, m]
  auto mixed = torch::matmul(blocks.transpose(-1, -2), hk).transpose(-1, -2);  // [..., K, m]: sum_a X[a,b] H_K[a,a']
  return mixed.flatten(-2) / std::sqrt(static_cast<double>(d));
}

}  // namespace

bool has_hadamard(int64_t d) { return is_power_of_two(d) || known_factor(d) != 0; }

const char* hadamard_dims() { return "powers of two, or K * 2^m with K in 12, 20, 28, 36, 40, 52, 60"; }

torch::Tensor hadamard_rotate(const torch::Tensor& x) { return rotate(x, false); }

torch::Tensor hadamard_unrotate(const torch::Tensor& y) { return rotate(y, true); }

}  // namespace kvdrift::quant
