#pragma once
// Summary statistics for run logs and the analysis around them: means and numpy-style percentiles,
// weighted least-squares lines, Kaplan–Meier estimates of "first divergence" steps, and a percentile
// bootstrap over prompts. Pure C++17 and deterministic on every platform, so a summary written on one
// machine can be reproduced on another.
//
// Weights throughout are a bootstrap resample's multiplicities (how often each unit was drawn): every
// weighted statistic equals the unweighted one on the resample with each unit repeated that often.
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

namespace kvdrift::stats {

inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
inline constexpr double kInf = std::numeric_limits<double>::infinity();

// Arithmetic mean; NaN when `values` is empty.
double mean(const std::vector<double>& values);

// numpy.percentile's default: linear interpolation between the closest ranks, percent in [0, 100].
// NaN when `values` is empty or any value is NaN. +inf values sort last, and interpolation involving
// +inf yields +inf (likewise -inf at the bottom), where numpy can return NaN (it computes inf - inf).
double percentile(std::vector<double> values, double percent);

// Sums for a weighted ordinary-least-squares line y = intercept + slope * x. Per-sample sums are built once;
// a bootstrap resample combines them with weights (the sample's multiplicity) without revisiting points.
struct LineSums {
  double n = 0, sx = 0, sy = 0, sxx = 0, sxy = 0;

  void add(double x, double y);                        // skips the point if x or y is not finite
  void add(const LineSums& other, double weight = 1);  // weighted merge; weight must be finite and >= 0
  // NaN when fewer than 2 points or all x equal (x's spread is below 1e-12 of its magnitude, which
  // rounding cannot tell apart from equal).
  double slope() const;
  double intercept() const;  // NaN likewise
  double mean_y() const;     // NaN when n == 0
};

// Kaplan–Meier estimate for "first divergence" times. times[i] >= 0 is sample i's step of first divergence
// when event[i] is true, or the number of steps it was observed without diverging when event[i] is false
// (censored).
//
// Convention: an event at step d means steps 0..d-1 matched and step d differed; a sample censored at c was
// observed at steps 0..c-1 only, so it is at risk for event steps d < c and NOT at risk at d == c (unlike the
// textbook tie rule, where censoring at d comes after the events at d). Hence
//   at_risk(d) = (events at steps >= d) + (censored at steps > d)
//   S(t) = P(first divergence > t) = product over event steps d <= t of (1 - events(d) / at_risk(d)).
// Optional weights (a bootstrap resample's multiplicities, default all 1) scale each sample's counts.
// Only the median and its counts, for the run log's summary and its bootstrap interval: the curve S(t)
// is analysis/kvdrift_log.py's survival_curve, the one the survival figure draws (its tests work the
// same cases by hand, and analysis/tests/test_demo.py checks that it first reaches 0.5 at this median).
struct Survival {
  double median;             // smallest event step d with S(d) <= 0.5; +inf when S never reaches 0.5
                             // ("not reached"); NaN when there are no samples (or all weights are 0)
  double at_risk_at_median;  // weighted number at risk at the median step (0 when not reached or no samples)
  double events;             // weighted count of events
  double censored;           // weighted count of censored samples
};
Survival kaplan_meier(const std::vector<double>& times, const std::vector<bool>& event,
                      const std::vector<double>& weights = {});


// Percentile bootstrap over `samples` independent units (prompts). Each of `resamples` resamples draws `samples`
// unit indices with replacement and calls statistic(weights), where weights[i] is how often unit i was drawn.
// The interval is [percentile(stats, 100*(1-level)/2), percentile(stats, 100*(1+level)/2)] of the resampled
// statistics; resamples whose statistic is NaN are left out (+inf is kept: it sorts last); NaN interval when
// samples == 0 or more than half of the resamples are NaN.
// Reproducible on every platform: std::mt19937_64 seeded with `seed`, indices drawn by rejection sampling from its
// raw 64-bit output (NOT std::uniform_int_distribution, whose algorithm is implementation-defined).
struct Interval {
  double low, high;
};
Interval bootstrap(int64_t samples, const std::function<double(const std::vector<double>& weights)>& statistic,
                   int64_t resamples, uint64_t seed, double level = 0.95);

}  // namespace kvdrift::stats
