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
  torch::Tensor norm;       // |x|
};

TokenScaleError token_scale_error(const torch::Tensor& x, const torch::Tensor& x_hat);

// The share of E_M in E_T over the worst `fraction` of rows by E_T (SPEC §3: 5%), in the two readings
// SPEC leaves open: the ratio of sums (sum E_M / sum E_T over those rows, dominated by the very worst
// rows), and the mean of per-row ratios E_M / E_T (every worst row counts alike; rows with E_T = 0
// left out). 0 when no row has any error.
struct WorstRowsShare {
  double of_sums = 0;
  double mean_of_ratios = 0;
};
WorstRowsShare worst_rows_magnitude_share(const TokenScaleError& error, double fraction = 0.05);

// The like-for-like reading: for rows [layers, kv_heads, positions], among the rows where `selected`
// (those read quantized) with |x| > 0, per layer the worst `fraction` by relative error E_T / |x|^2,
// and the share of E_M in E_T over them as a ratio of sums of relative errors (sum E_M/|x|^2 over
// sum E_T/|x|^2), so no layer's norms outweigh another's; pooled: the same share over every layer's
// worst rows together. NaN where a layer has no such row; 0 where its worst rows have no error.
struct LayerWorstRowsShare {
  std::vector<double> per_layer;
  double pooled = 0;
};
LayerWorstRowsShare worst_rows_relative_share(const TokenScaleError& error, const torch::Tensor& selected,
                                              double fraction = 0.05);

}  // namespace kvdrift::metrics
