#include "metrics/token_scale.h"

#include <algorithm>
#include <cmath>
#include <limits>

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
  error.norm = norm_a;
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

LayerWorstRowsShare worst_rows_relative_share(const TokenScaleError& error, const torch::Tensor& selected,
                                              double fraction) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const auto squared_norm = error.norm.pow(2);
  const auto usable = selected & (squared_norm > 0);
  LayerWorstRowsShare share;
  double pooled_magnitude = 0, pooled_total = 0;
  for (int64_t layer = 0; layer < error.total.size(0); ++layer) {
    const auto rows = usable[layer].flatten();
    const auto norms = squared_norm[layer].flatten().masked_select(rows);
    const auto relative_total = error.total[layer].flatten().masked_select(rows) / norms;
    const auto relative_magnitude = error.magnitude[layer].flatten().masked_select(rows) / norms;
    const int64_t count = relative_total.numel();
    if (count == 0) {
      share.per_layer.push_back(nan);
      continue;
    }
    const int64_t worst = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(fraction * static_cast<double>(count))));
    const auto top = std::get<1>(relative_total.topk(worst));
    const double total = relative_total.index_select(0, top).sum().item<double>();
    const double magnitude = relative_magnitude.index_select(0, top).sum().item<double>();
    share.per_layer.push_back(total > 0 ? magnitude / total : 0.0);
    pooled_magnitude += magnitude;
    pooled_total += total;
  }
  const bool any = std::any_of(share.per_layer.begin(), share.per_layer.end(), [](double v) { return !std::isnan(v); });
  share.pooled = !any ? nan : pooled_total > 0 ? pooled_magnitude / pooled_total : 0.0;
  return share;
}

}  // namespace kvdrift::metrics
