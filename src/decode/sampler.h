#pragma once
// Choosing the next token from logits, reproducibly: greedy argmax (ties to the lowest id) or
// temperature / top-k / top-p sampling driven by the sampler's own seeded generator. Sampling
// happens on the host in double precision, so the same seed and logits give the same token on
// every device.
#include <torch/types.h>

#include <cstdint>
#include <random>
#include <vector>

namespace kvdrift {

struct SamplingConfig {
  double temperature = 0.0;  // 0: greedy
  double top_p = 1.0;        // nucleus mass kept, in (0, 1]
  int64_t top_k = 0;         // 0: no top-k cut
  uint64_t seed = 0;
  void validate() const;  // throws Error naming the bad setting
  // Whether sampling draws from something else than softmax(logits): a temperature other than 1, or a
  // top-k / top-p cut. Greedy decoding is not sampling.
  bool reshapes_distribution() const { return temperature > 0.0 && (temperature != 1.0 || top_p < 1.0 || top_k > 0); }
};

// The distribution sampling draws from (temperature > 0): softmax(logits / temperature) over the top_k
// largest logits, cut to the smallest prefix by decreasing logit (ties by increasing id) whose mass
// reaches top_p, renormalized. Candidates in that order with their probabilities.
struct SamplingDistribution {
  std::vector<int64_t> ids;
  std::vector<double> probs;  // sum to 1
};
SamplingDistribution sampling_distribution(const torch::Tensor& logits, const SamplingConfig& config);

// KL(p || q) in nats between two sampling distributions over the same vocabulary: +inf when p keeps a
// token q cuts.
double kl_divergence(const SamplingDistribution& p, const SamplingDistribution& q, int64_t vocab);

class Sampler {
 public:
  explicit Sampler(const SamplingConfig& config);
  // logits: [vocab] float32 on any device.
  int64_t next(const torch::Tensor& logits);

 private:
  SamplingConfig config_;
  std::mt19937_64 generator_;  // its output sequence is fixed by the C++ standard
};

}  // namespace kvdrift
