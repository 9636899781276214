#include "decode/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace kvdrift {

void SamplingConfig::validate() const {
  if (!(temperature >= 0.0) || !std::isfinite(temperature)) fail("temperature = {} must be >= 0", temperature);
  if (!(top_p > 0.0 && top_p <= 1.0)) fail("top_p = {} must be in (0, 1]", top_p);
  if (top_k < 0) fail("top_k = {} must be >= 0", top_k);
}

Sampler::Sampler(const SamplingConfig& config) : config_(config), generator_(config.seed) { config_.validate(); }

int64_t Sampler::next(const torch::Tensor& logits) {
  if (config_.temperature == 0.0) return logits.argmax().item<int64_t>();  // first maximum: lowest id
  auto host = logits.to(torch::kCPU, torch::kFloat64).contiguous();
  const double* values = host.data_ptr<double>();
  const int64_t vocab = host.numel();
  // Candidates by decreasing logit, ties by increasing id, so the order never depends on the sort.
  std::vector<int64_t> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return values[a] > values[b]; });
  int64_t kept = config_.top_k > 0 ? std::min(config_.top_k, vocab) : vocab;
  std::vector<double> probs(kept);
  const double max_logit = values[order[0]];
  double total = 0;
  for (int64_t i = 0; i < kept; ++i) total += probs[i] = std::exp((values[order[i]] - max_logit) / config_.temperature);
  if (config_.top_p < 1.0) {
    // Smallest prefix whose mass reaches top_p.
    double mass = 0;
    int64_t prefix = 0;
    while (prefix < kept && mass < config_.top_p * total) mass += probs[prefix++];
    kept = std::max<int64_t>(prefix, 1);
    total = mass;
  }
  const double u = static_cast<double>(generator_() >> 11) * 0x1.0p-53 * total;  // uniform in [0, total)
  double cumulative = 0;
  for (int64_t i = 0; i < kept; ++i) {
    cumulative += probs[i];
    if (u < cumulative) return order[i];
  }
  return order[kept - 1];  // u rounded up to the total
}

}  // namespace kvdrift
