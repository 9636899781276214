#include "quant/hadamard.h"

#include <ATen/Parallel.h>

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

}  // namespace

torch::Tensor walsh_hadamard_reference(const torch::Tensor& x) {
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

torch::Tensor walsh_hadamard_cpu(const torch::Tensor& x) {
  if (!x.device().is_cpu() || x.scalar_type() != torch::kFloat32)
    fail("walsh_hadamard_cpu takes float32 CPU tensors, got {} on {}", c10::toString(x.scalar_type()),
         x.device().str());
  const int64_t d = x.size(-1);
  // Another length would pair indices past the row's end.
  if (d >= 2 && !is_power_of_two(d)) fail("walsh_hadamard_cpu: length {} is not a power of two", d);
  auto y = torch::empty(x.sizes(), x.options().memory_format(torch::MemoryFormat::Contiguous));
  y.copy_(x);
  if (d < 2 || y.numel() == 0) return y;
  float* data = y.data_ptr<float>();
  // The reference's passes, in place: the same pairs, each a + b and a - b rounded once, so bit for bit.
  at::parallel_for(0, y.numel() / d, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* v = data + row * d;
      for (int64_t h = 1; h < d; h *= 2)
        for (int64_t block = 0; block < d; block += 2 * h)
          for (int64_t i = block; i < block + h; ++i) {
            const float a = v[i], b = v[i + h];
            v[i] = a + b;
            v[i + h] = a - b;
          }
    }
  });
  return y;
}

torch::Tensor walsh_hadamard(const torch::Tensor& x) {
  return x.device().is_cpu() && x.scalar_type() == torch::kFloat32 ? walsh_hadamard_cpu(x)
                                                                    : walsh_hadamard_reference(x);
}

namespace {

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
