#include "metrics/token_scale.h"

#include <algorithm>
#include <cmath>

namespace kvdrift::metrics {

TokenScaleError token_scale_error(const torch::Tensor& x, const torch::Tensor& x_hat) {
  auto a = x.to(torch::kFloat64);
  auto b = x_hat.to(torch::kFloat64);
  auto norm_a = a.norm(2, -1);
  auto norm_b = b.norm(2, -1);
  auto dot = (a * b).sum(-1);
  TokenScaleError error;
  error.magnitude = (norm_a - norm_b).pow(2);
  // 2|a||b|(1 - cos) = 2(|a||b| - a.b); no division, so zero rows are fine.
  error.direction = 2.0 * (norm_a * norm_b - dot);
  error.total = (a - b).pow(2).sum(-1);
  error.norm_ratio = torch::where(norm_a > 0, norm_b / norm_a - 1.0, torch::zeros_like(norm_a));
  return error;
}

WorstRowsShare worst_rows_magnitude_share(const TokenScaleError& error, double fraction) {
  auto total = error.total.flatten();
  const int64_t rows = total.numel();
  if (rows == 0) return {};
  const int64_t worst = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(fraction * rows)));
  auto top = std::get<1>(total.topk(worst));
  const auto worst_total = total.index_select(0, top);
  const auto worst_magnitude = error.magnitude.flatten().index_select(0, top);
  const double total_sum = worst_total.sum().item<double>();
  if (total_sum <= 0) return {};
  const auto with_error = worst_total > 0;
  const double mean_of_ratios =
      (worst_magnitude.masked_select(with_error) / worst_total.masked_select(with_error)).mean().item<double>();
  return {worst_magnitude.sum().item<double>() / total_sum, mean_of_ratios};
}

}  // namespace kvdrift::metrics
