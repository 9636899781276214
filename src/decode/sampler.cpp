#include "decode/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.h"

namespace kvdrift {

void SamplingConfig::validate() const {
  if (!(temperature >= 0.0) || !std::isfinite(temperature)) fail("temperature = {} must be >= 0", temperature);
  if (!(top_p > 0.0 && top_p <= 1.0)) fail("top_p = {} must be in (0, 1]", top_p);
  if (top_k < 0) fail("top_k = {} must be >= 0", top_k);
}

Sampler::Sampler(const SamplingConfig& config) : config_(config), generator_(config.seed) { config_.validate(); }

namespace {

// The kept candidates with unnormalized weights exp((logit - max) / T), and their total.
struct Candidates {
  std::vector<int64_t> order;
  std::vector<double> weights;
  double total = 0;
};

Candidates candidates(const torch::Tensor& logits, const SamplingConfig& config) {
  auto host = logits.to(torch::kCPU, torch::kFloat64).contiguous();
  const double* values = host.data_ptr<double>();
  const int64_t vocab = host.numel();
  // Candidates by decreasing logit, ties by increasing id, so the order never depends on the sort.
  Candidates c;
  c.order.resize(vocab);
  std::iota(c.order.begin(), c.order.end(), 0);
  std::stable_sort(c.order.begin(), c.order.end(), [&](int64_t a, int64_t b) { return values[a] > values[b]; });
  int64_t kept = config.top_k > 0 ? std::min(config.top_k, vocab) : vocab;
  c.weights.resize(kept);
  const double max_logit = values[c.order[0]];
  for (int64_t i = 0; i < kept; ++i) c.total += c.weights[i] = std::exp((values[c.order[i]] - max_logit) / config.temperature);
  if (config.top_p < 1.0) {
    // Smallest prefix whose mass reaches top_p.
    double mass = 0;
    int64_t prefix = 0;
    while (prefix < kept && mass < config.top_p * c.total) mass += c.weights[prefix++];
    kept = std::max<int64_t>(prefix, 1);
    c.total = mass;
  }
  c.order.resize(kept);
  c.weights.resize(kept);
  return c;
}

}  // namespace

SamplingDistribution sampling_distribution(const torch::Tensor& logits, const SamplingConfig& config) {
  if (!(config.temperature > 0.0)) fail("a sampling distribution needs temperature > 0, got {}", config.temperature);
  Candidates c = candidates(logits, config);
  for (double& weight : c.weights) weight /= c.total;
  return {std::move(c.order), std::move(c.weights)};
}

double kl_divergence(const SamplingDistribution& p, const SamplingDistribution& q, int64_t vocab) {
  std::vector<double> q_probs(vocab, 0.0);
  for (size_t i = 0; i < q.ids.size(); ++i) q_probs[q.ids[i]] = q.probs[i];
  double kl = 0;
  for (size_t i = 0; i < p.ids.size(); ++i) {
    if (p.probs[i] == 0.0) continue;
    const double other = q_probs[p.ids[i]];
    if (other == 0.0) return std::numeric_limits<double>::infinity();
    kl += p.probs[i] * (std::log(p.probs[i]) - std::log(other));
  }
  return std::max(kl, 0.0);  // rounding of nearly equal distributions must not read as negative
}

int64_t Sampler::next(const torch::Tensor& logits) {
  if (config_.temperature == 0.0) return logits.argmax().item<int64_t>();  // first maximum: lowest id
  const Candidates c = candidates(logits, config_);
  const double u = static_cast<double>(generator_() >> 11) * 0x1.0p-53 * c.total;  // uniform in [0, total)
  double cumulative = 0;
  for (size_t i = 0; i < c.weights.size(); ++i) {
    cumulative += c.weights[i];
    if (u < cumulative) return c.order[i];
  }
  return c.order.back();  // u rounded up to the total
}

}  // namespace kvdrift
