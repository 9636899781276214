#pragma once
// Choosing the next token from logits, reproducibly: greedy argmax (ties to the lowest id) or
// temperature / top-k / top-p sampling driven by the sampler's own seeded generator. Sampling
// happens on the host in double precision, so the same seed and logits give the same token on
// every device.
#include <torch/types.h>

#include <cstdint>
#include <random>

namespace kvdrift {

struct SamplingConfig {
  double temperature = 0.0;  // 0: greedy
  double top_p = 1.0;        // nucleus mass kept, in (0, 1]
  int64_t top_k = 0;         // 0: no top-k cut
  uint64_t seed = 0;
  void validate() const;  // throws Error naming the bad setting
};

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
