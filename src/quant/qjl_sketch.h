#pragma once
// QJL's one-bit Johnson-Lindenstrauss sketch (Zandieh, Daliri, Han, arXiv 2406.03482), a building block
// of the `qjl` method (keys) and of TurboQuant's prod variant (residuals): a vector r [..., d] is stored
// as z = sign(S r) under a seeded Gaussian S [m, d] and its norm; r_hat = sqrt(pi / 2) / m |r| S^T z, so
// <q, r_hat> is an unbiased estimate of <q, r> over S for every q.
#include <torch/types.h>

#include <cstdint>

namespace kvdrift::quant {

// S: [m, d] float32 with N(0, 1) entries drawn from `seed`.
torch::Tensor gaussian_projection(int64_t m, int64_t d, uint64_t seed);
// The QJL authors' sketch (their `rot=True`): gaussian_projection(m, d, seed) with each block of d rows
// replaced by the Q of its QR decomposition (columns signed so that diag(R) > 0, which makes Q
// Haar-distributed) times sqrt(d): d orthogonal rows of norm sqrt(d) per block. m a multiple of d. Each
// row is then uniform on the sphere of radius sqrt(d) instead of Gaussian, so qjl_reconstruct's
// estimate has mean sqrt(pi d / 2) E|u_1| k (u uniform on the unit sphere): k times 1.0040 at d = 64,
// 1.0020 at d = 128, not exactly k.
torch::Tensor orthogonal_projection(int64_t m, int64_t d, uint64_t seed);
// [S r >= 0] as 0/1, int64 [..., m].
torch::Tensor qjl_sign_bits(const torch::Tensor& r, const torch::Tensor& projection);
// sqrt(pi / 2) / m * norm * S^T (2 bits - 1): [..., d] for bits [..., m] and norm [...].
torch::Tensor qjl_reconstruct(const torch::Tensor& bits, const torch::Tensor& norm, const torch::Tensor& projection);

}  // namespace kvdrift::quant
