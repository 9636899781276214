#pragma once
// The numerical building blocks of the decoder, each a plain function so it can be checked alone.
#include <torch/types.h>

#include "model/config.h"

namespace kvdrift::ops {

// x * rsqrt(mean(x^2) + eps) * weight, normalised in float32 and cast back to x's dtype (as HF does).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);

// Per-pair rotation frequencies (head_dim/2 of them) with rope_theta and rope_scaling applied.
std::vector<double> rope_inverse_frequencies(const ModelConfig& config);

// cos and sin tables [positions, head_dim/2] in float32, computed in double.
struct RopeTables {
  torch::Tensor cos;
  torch::Tensor sin;
};
RopeTables rope_tables(const ModelConfig& config, int64_t positions, torch::Device device);

// Rotates x [batch, T, heads, head_dim] at `positions` [batch or 1, T] (int64, on x's device) in the
// given pairing style.
torch::Tensor apply_rope(const torch::Tensor& x, const RopeTables& tables, const torch::Tensor& positions,
                         RopeStyle style);

// Causal grouped-query attention of queries q [batch, heads, T, head_dim] over keys/values
// [batch, kv_heads, S, head_dim] at positions [0, S). A query at position p reads keys at positions
// <= p; `query_positions` [batch or 1, T] (int64, on q's device) gives them, and may be undefined when
// every query reads every key it is given (one decode step of rows at the same position).
// Query head h reads kv head h / (heads / kv_heads); no copy of the cache is made for the groups.
// Scores are softmaxed in float32. Returns [batch, heads, T, head_dim].
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                        const torch::Tensor& query_positions);

}  // namespace kvdrift::ops
