#include "model/ops.h"

#include <cmath>
#include <limits>

namespace kvdrift::ops {

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  auto x32 = x.to(torch::kFloat32);
  auto normed = x32 * torch::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * normed.to(x.scalar_type());
}

std::vector<double> rope_inverse_frequencies(const ModelConfig& config) {
  const int64_t half = config.head_dim / 2;
  std::vector<double> inv_freq(half);
  for (int64_t i = 0; i < half; ++i)
    inv_freq[i] = 1.0 / std::pow(config.rope_theta, static_cast<double>(2 * i) / config.head_dim);
  const RopeScaling& s = config.rope_scaling;
  if (s.type == RopeScalingType::Linear) {
    for (double& f : inv_freq) f /= s.factor;
  } else if (s.type == RopeScalingType::Llama3) {
    // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    const double low_freq_wavelen = s.original_max_position / s.low_freq_factor;
    const double high_freq_wavelen = s.original_max_position / s.high_freq_factor;
    for (double& f : inv_freq) {
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_freq_wavelen) {
        f /= s.factor;
      } else if (wavelen >= high_freq_wavelen) {
        const double smooth =
            (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        f = (1.0 - smooth) * f / s.factor + smooth * f;
      }
    }
  }
  return inv_freq;
}

RopeTables rope_tables(const ModelConfig& config, int64_t positions, torch::Device device) {
  const auto inv_freq = rope_inverse_frequencies(config);
  const int64_t half = static_cast<int64_t>(inv_freq.size());
  auto angles = torch::empty({positions, half}, torch::kFloat64);
  auto a = angles.accessor<double, 2>();
  for (int64_t p = 0; p < positions; ++p)
    for (int64_t i = 0; i < half; ++i) a[p][i] = static_cast<double>(p) * inv_freq[i];
  return {angles.cos().to(torch::kFloat32).to(device), angles.sin().to(torch::kFloat32).to(device)};
}

torch::Tensor apply_rope(const torch::Tensor& x, const RopeTables& tables, const torch::Tensor& positions,
                         RopeStyle style) {
  const int64_t half = x.size(-1) / 2;
  // [rows, T] positions -> [rows, T, 1, half] tables, to broadcast over heads (and batch when rows = 1).
  auto gather = [&](const torch::Tensor& table) {
    return table.index_select(0, positions.flatten()).view({positions.size(0), positions.size(1), 1, half});
  };
  auto cos = gather(tables.cos);
  auto sin = gather(tables.sin);
  auto x32 = x.to(torch::kFloat32);
  torch::Tensor rotated;
  if (style == RopeStyle::Interleaved) {
    auto pairs = x32.unflatten(-1, {half, 2});
    auto even = pairs.select(-1, 0);
    auto odd = pairs.select(-1, 1);
    rotated = torch::stack({even * cos - odd * sin, even * sin + odd * cos}, -1).flatten(-2);
  } else {
    auto first = x32.narrow(-1, 0, half);
    auto second = x32.narrow(-1, half, half);
    rotated = torch::cat({first * cos - second * sin, second * cos + first * sin}, -1);
  }
  return rotated.to(x.scalar_type());
}

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                        const torch::Tensor& query_positions) {
  const int64_t batch = q.size(0), heads = q.size(1), length = q.size(2), head_dim = q.size(3);
  const int64_t kv_heads = keys.size(1), span = keys.size(2);
  const int64_t group = heads / kv_heads;
  // Heads h = kv * group + g are contiguous per kv head, so the group folds into the row axis.
  auto grouped = q.reshape({batch, kv_heads, group * length, head_dim});
  auto scores = torch::matmul(grouped, keys.transpose(-1, -2)).to(torch::kFloat32);
  scores.mul_(1.0 / std::sqrt(static_cast<double>(head_dim)));
  if (query_positions.defined()) {
    // Grouped row g*T + t holds the query at query_positions[., t]; it sees keys at positions <= that.
    auto query_pos = query_positions.repeat({1, group});  // [batch or 1, group*T]
    auto key_pos = torch::arange(span, query_positions.options());
    auto future = key_pos.view({1, 1, span}) > query_pos.unsqueeze(2);  // [batch or 1, group*T, S]
    scores.masked_fill_(future.unsqueeze(1), -std::numeric_limits<float>::infinity());
  }
  auto probs = torch::softmax(scores, -1).to(values.scalar_type());
  return torch::matmul(probs, values).view({batch, heads, length, head_dim});
}

}  // namespace kvdrift::ops
