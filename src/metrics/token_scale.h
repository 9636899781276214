#pragma once
// Token-scale error of SPEC §3 for rows x (what a lane produced) and x_hat (what attention reads):
//   E_M = (|x| - |x_hat|)^2                 magnitude (token scale) part
//   E_D = 2 |x| |x_hat| (1 - cos theta)     direction part
//   E_T = |x - x_hat|^2 = E_M + E_D         total
//   ratio = |x_hat| / |x| - 1
// Computed in float64 so the identity holds to ~1e-12 even when x_hat is close to x.
#include <torch/types.h>

namespace kvdrift::metrics {

struct TokenScaleError {
  torch::Tensor magnitude;  // E_M, float64, x's shape without the last dimension
  torch::Tensor direction;  // E_D
  torch::Tensor total;      // E_T
  torch::Tensor norm_ratio; // |x_hat| / |x| - 1 (0 where |x| = 0)
};

TokenScaleError token_scale_error(const torch::Tensor& x, const torch::Tensor& x_hat);

// Share of E_M in the summed E_T over the worst `fraction` of rows by E_T (SPEC §3: 5%).
double worst_rows_magnitude_share(const TokenScaleError& error, double fraction = 0.05);

}  // namespace kvdrift::metrics
