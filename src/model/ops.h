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

// Rotates x [batch, T, heads, head_dim] at positions [start, start+T) in the given pairing style.
torch::Tensor apply_rope(const torch::Tensor& x, const RopeTables& tables, int64_t start, RopeStyle style);

// Causal grouped-query attention of queries q [batch, heads, T, head_dim] at positions
// [start, start+T) over keys/values [batch, kv_heads, S, head_dim] at positions [0, S).
// Query head h reads kv head h / (heads / kv_heads); no copy of the cache is made for the groups.
// Scores are softmaxed in float32. Returns [batch, heads, T, head_dim].
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values, int64_t start);

}  // namespace kvdrift::ops
