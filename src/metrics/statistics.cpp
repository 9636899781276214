#include "metrics/statistics.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "core/error.h"

namespace kvdrift::stats {

double mean(const std::vector<double>& values) {
  if (values.empty()) return kNaN;
  return std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(values.size());
}

double percentile(std::vector<double> values, double percent) {
  if (!(percent >= 0 && percent <= 100)) fail("percentile: percent {} is not in [0, 100]", percent);
  if (values.empty() || std::any_of(values.begin(), values.end(), [](double v) { return std::isnan(v); })) return kNaN;
  std::sort(values.begin(), values.end());
  const double rank = percent / 100.0 * static_cast<double>(values.size() - 1);
  const size_t below = std::min(static_cast<size_t>(std::floor(rank)), values.size() - 1);
  const size_t above = std::min(below + 1, values.size() - 1);
  const double lo = values[below], hi = values[above], fraction = rank - static_cast<double>(below);
  // lo + (hi - lo) * fraction turns into inf - inf or inf * 0 = NaN as soon as an infinity is involved.
  if (fraction == 0 || lo == hi) return lo;
  if (std::isinf(lo) || std::isinf(hi)) return std::isinf(hi) ? hi : lo;
  return lo + (hi - lo) * fraction;
}

// --- LineSums ---

void LineSums::add(double x, double y) {
  if (!std::isfinite(x) || !std::isfinite(y)) return;
  n += 1;
  sx += x;
  sy += y;
  sxx += x * x;
  sxy += x * y;
}

void LineSums::add(const LineSums& other, double weight) {
  if (!(weight >= 0) || std::isinf(weight)) fail("LineSums::add: weight {} is not finite and >= 0", weight);
  n += weight * other.n;
  sx += weight * other.sx;
  sy += weight * other.sy;
  sxx += weight * other.sxx;
  sxy += weight * other.sxy;
}

double LineSums::slope() const {
  if (n < 2) return kNaN;
  // Centered sums: sum (x - mean_x)^2 and sum (x - mean_x)(y - mean_y).
  const double spread_x = sxx - sx * sx / n;
  // Equal x leave only rounding noise of order 1e-16 * sxx in spread_x, which must not become a slope.
  if (!(spread_x > 1e-12 * sxx)) return kNaN;
  return (sxy - sx * sy / n) / spread_x;
}

double LineSums::intercept() const {
  const double s = slope();
  return std::isnan(s) ? kNaN : (sy - s * sx) / n;
}

double LineSums::mean_y() const { return n > 0 ? sy / n : kNaN; }

// --- Kaplan–Meier ---

namespace {

struct SurvivalStep {
  double step;      // an event step d with a positive weighted event count
  double at_risk;   // weighted number at risk at d
  double survival;  // S(d)
};

struct SurvivalFit {
  std::vector<SurvivalStep> steps;  // ascending
  double total = 0, events = 0, censored = 0;
};

SurvivalFit fit_survival(const std::vector<double>& times, const std::vector<bool>& event,
                         const std::vector<double>& weights) {
  if (times.size() != event.size()) fail("kaplan_meier: {} times but {} event flags", times.size(), event.size());
  if (!weights.empty() && weights.size() != times.size())
    fail("kaplan_meier: {} times but {} weights", times.size(), weights.size());
  for (size_t i = 0; i < times.size(); ++i) {
    if (!(times[i] >= 0) || std::isinf(times[i]))
      fail("kaplan_meier: times[{}] = {} is not a finite step >= 0", i, times[i]);
    if (!weights.empty() && (!(weights[i] >= 0) || std::isinf(weights[i])))
      fail("kaplan_meier: weights[{}] = {} is not finite and >= 0", i, weights[i]);
  }
  auto weight_of = [&](size_t i) { return weights.empty() ? 1.0 : weights[i]; };

  std::vector<size_t> order(times.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return times[a] < times[b]; });

  SurvivalFit fit;
  for (size_t i = 0; i < times.size(); ++i) (event[i] ? fit.events : fit.censored) += weight_of(i);
  fit.total = fit.events + fit.censored;

  // Walk the distinct steps in order; `remaining` is the weight of samples at steps >= the current one.
  double remaining = fit.total, survival = 1;
  for (size_t begin = 0; begin < order.size();) {
    const double step = times[order[begin]];
    double events_here = 0, censored_here = 0;
    size_t end = begin;
    for (; end < order.size() && times[order[end]] == step; ++end)
      (event[order[end]] ? events_here : censored_here) += weight_of(order[end]);
    if (events_here > 0) {
      const double at_risk = remaining - censored_here;  // censored at d was not observed at d
      survival *= 1 - events_here / at_risk;
      fit.steps.push_back({step, at_risk, survival});
    }
    remaining -= events_here + censored_here;
    begin = end;
  }
  return fit;
}

}  // namespace

Survival kaplan_meier(const std::vector<double>& times, const std::vector<bool>& event,
                      const std::vector<double>& weights) {
  const SurvivalFit fit = fit_survival(times, event, weights);
  Survival result{kInf, 0, fit.events, fit.censored};
  if (fit.total <= 0) {
    result.median = kNaN;
    return result;
  }
  for (const SurvivalStep& step : fit.steps) {
    if (step.survival <= 0.5) {
      result.median = step.step;
      result.at_risk_at_median = step.at_risk;
      break;
    }
  }
  return result;
}

// --- Bootstrap ---

namespace {

// Uniform in [0, bound): accept only raw draws below the largest multiple of `bound` that fits in 2^64,
// so every residue is equally likely. 2^64 mod bound == (2^64 - bound) mod bound == (-bound) % bound.
uint64_t uniform_index(std::mt19937_64& engine, uint64_t bound) {
  const uint64_t rejected_below = (0 - bound) % bound;  // draws in [0, 2^64 mod bound) are rejected
  uint64_t draw;
  do {
    draw = engine();
  } while (draw < rejected_below);
  return draw % bound;
}

}  // namespace

Interval bootstrap(int64_t samples, const std::function<double(const std::vector<double>& weights)>& statistic,
                   int64_t resamples, uint64_t seed, double level) {
  if (samples < 0) fail("bootstrap: samples {} is negative", samples);
  if (resamples < 1) fail("bootstrap: resamples {} is not >= 1", resamples);
  if (!(level > 0 && level < 1)) fail("bootstrap: level {} is not in (0, 1)", level);
  if (samples == 0) return {kNaN, kNaN};

  std::mt19937_64 engine(seed);
  std::vector<double> weights(static_cast<size_t>(samples));
  std::vector<double> resampled;
  resampled.reserve(static_cast<size_t>(resamples));
  for (int64_t r = 0; r < resamples; ++r) {
    std::fill(weights.begin(), weights.end(), 0.0);
    for (int64_t i = 0; i < samples; ++i) weights[uniform_index(engine, static_cast<uint64_t>(samples))] += 1;
    const double value = statistic(weights);
    if (!std::isnan(value)) resampled.push_back(value);
  }
  const int64_t nan_count = resamples - static_cast<int64_t>(resampled.size());
  if (2 * nan_count > resamples) return {kNaN, kNaN};
  return {percentile(resampled, 100 * (1 - level) / 2), percentile(resampled, 100 * (1 + level) / 2)};
}

}  // namespace kvdrift::stats
