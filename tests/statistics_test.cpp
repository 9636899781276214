// kvdrift::stats against values worked out by hand (in the comments), and the bootstrap by its properties:
// its resampled statistics come from a random engine, so no expected interval is written down.
#include "metrics/statistics.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"

namespace kvdrift::stats {
namespace {

// The message of the kvdrift::Error that `action` throws; fails the test when it throws none.
template <typename Action>
std::string error_message(Action action) {
  try {
    action();
  } catch (const Error& error) {
    return error.what();
  }
  ADD_FAILURE() << "no kvdrift::Error thrown";
  return "";
}

// `action` throws kvdrift::Error and its message contains `text` (the offending value).
#define EXPECT_ERROR_NAMING(action, text)                                                 \
  do {                                                                                    \
    EXPECT_THROW(action, Error);                                                          \
    const std::string message = error_message([&] { action; });                           \
    EXPECT_NE(message.find(text), std::string::npos) << #action << " threw: " << message; \
  } while (0)

// ---------------------------------------------------------------------------------------------
// mean, percentile

TEST(StatisticsTest, Mean) {
  EXPECT_DOUBLE_EQ(mean({1, 2, 3, 4}), 2.5);  // 10 / 4
  EXPECT_TRUE(std::isnan(mean({})));
}

TEST(StatisticsTest, PercentileMatchesNumpy) {
  // numpy: rank = p/100 * (n-1), linear between the sorted values around it.
  EXPECT_DOUBLE_EQ(percentile({1, 2, 3, 4}, 50), 2.5);   // rank 1.5: 2 + 0.5
  EXPECT_DOUBLE_EQ(percentile({1, 2, 3, 4}, 90), 3.7);   // rank 2.7: 3 + 0.7
  EXPECT_DOUBLE_EQ(percentile({4, 1, 3, 2}, 25), 1.75);  // unsorted; rank 0.75: 1 + 0.75
  EXPECT_DOUBLE_EQ(percentile({4, 1, 3, 2}, 0), 1);
  EXPECT_DOUBLE_EQ(percentile({4, 1, 3, 2}, 100), 4);
  EXPECT_DOUBLE_EQ(percentile({7}, 30), 7);
  EXPECT_DOUBLE_EQ(percentile({10, 20, 30}, 75), 25);  // rank 1.5: 20 + 0.5 * 10
}

TEST(StatisticsTest, PercentileEmptyOrNaN) {
  EXPECT_TRUE(std::isnan(percentile({}, 50)));
  EXPECT_TRUE(std::isnan(percentile({1, kNaN, 3}, 50)));
  EXPECT_TRUE(std::isnan(percentile({1, 2, kNaN}, 0)));
}

TEST(StatisticsTest, PercentileWithInfinity) {
  const double inf = kInf;
  EXPECT_DOUBLE_EQ(percentile({inf, 1, 2, 3}, 50), 2.5);  // +inf sorts last; rank 1.5 is between 2 and 3
  EXPECT_EQ(percentile({1, 2, 3, inf}, 90), inf);         // rank 2.7: between 3 and +inf
  EXPECT_EQ(percentile({1, 2, 3, inf}, 100), inf);
  EXPECT_DOUBLE_EQ(percentile({1, 2, 3, 4, inf}, 75), 4);  // rank exactly 3: no share of +inf (not inf * 0)
  EXPECT_EQ(percentile({inf, inf}, 50), inf);              // not inf - inf
  EXPECT_EQ(percentile({1, -inf, 2}, 25), -inf);           // rank 0.5: between -inf and 1 (not -inf + inf)
}

TEST(StatisticsTest, PercentileRejectsPercentOutOfRange) {
  EXPECT_ERROR_NAMING(percentile({1, 2}, 101), "101");
  EXPECT_ERROR_NAMING(percentile({1, 2}, -5), "-5");
}

// ---------------------------------------------------------------------------------------------
// LineSums

TEST(StatisticsTest, LineExact) {
  LineSums sums;  // y = 3 - 2x at x = 0..3: y = 3, 1, -1, -3
  for (double x : {0, 1, 2, 3}) sums.add(x, 3 - 2 * x);
  EXPECT_DOUBLE_EQ(sums.slope(), -2);
  EXPECT_DOUBLE_EQ(sums.intercept(), 3);
  EXPECT_DOUBLE_EQ(sums.mean_y(), 0);
}

TEST(StatisticsTest, LineNoisy) {
  // x = 0,1,2,3, y = 1,3,2,5: n=4, sx=6, sy=11, sxx=14, sxy=0+3+4+15=22.
  // Sxx = 14 - 36/4 = 5, Sxy = 22 - 6*11/4 = 5.5, slope = 1.1, intercept = (11 - 1.1*6)/4 = 1.1.
  // Check: residuals -0.1, 0.8, -1.3, 0.6 sum to 0 and sum x*residual = 0.8 - 2.6 + 1.8 = 0.
  LineSums sums;
  const double ys[] = {1, 3, 2, 5};
  for (int x = 0; x < 4; ++x) sums.add(x, ys[x]);
  EXPECT_DOUBLE_EQ(sums.n, 4);
  EXPECT_DOUBLE_EQ(sums.sxy, 22);
  EXPECT_NEAR(sums.slope(), 1.1, 1e-12);
  EXPECT_NEAR(sums.intercept(), 1.1, 1e-12);
  EXPECT_DOUBLE_EQ(sums.mean_y(), 2.75);
}

TEST(StatisticsTest, LineWeightedMergeEqualsRepeatedPoints) {
  LineSums first, second, repeated;
  first.add(0, 1);
  first.add(1, 3);
  second.add(2, 2);
  second.add(3, 5);
  for (auto [x, y] : std::vector<std::pair<double, double>>{{0, 1}, {1, 3}, {2, 2}, {2, 2}, {3, 5}, {3, 5}})
    repeated.add(x, y);

  LineSums merged;
  merged.add(first);
  merged.add(second, 2);
  EXPECT_DOUBLE_EQ(merged.n, repeated.n);
  EXPECT_DOUBLE_EQ(merged.sx, repeated.sx);
  EXPECT_DOUBLE_EQ(merged.sy, repeated.sy);
  EXPECT_DOUBLE_EQ(merged.sxx, repeated.sxx);
  EXPECT_DOUBLE_EQ(merged.sxy, repeated.sxy);
  // n=6, sx=11, sy=18, sxx=27, sxy=41: Sxx = 27 - 121/6 = 41/6, Sxy = 41 - 11*18/6 = 8,
  // slope = 8 / (41/6) = 48/41, intercept = (18 - 11 * 48/41) / 6 = (738 - 528) / 41 / 6 = 35/41.
  EXPECT_NEAR(merged.slope(), 48.0 / 41, 1e-12);
  EXPECT_NEAR(merged.intercept(), 35.0 / 41, 1e-12);
  EXPECT_DOUBLE_EQ(merged.mean_y(), 3);
}

TEST(StatisticsTest, LineSkipsNonFinitePoints) {
  LineSums sums;
  sums.add(kNaN, 1);
  sums.add(1, kInf);
  sums.add(-kInf, 2);
  EXPECT_EQ(sums.n, 0);
  EXPECT_EQ(sums.sy, 0);
}

TEST(StatisticsTest, LineUndefined) {
  LineSums empty;
  EXPECT_TRUE(std::isnan(empty.slope()));
  EXPECT_TRUE(std::isnan(empty.intercept()));
  EXPECT_TRUE(std::isnan(empty.mean_y()));

  LineSums one;
  one.add(2, 7);
  EXPECT_TRUE(std::isnan(one.slope()));
  EXPECT_TRUE(std::isnan(one.intercept()));
  EXPECT_DOUBLE_EQ(one.mean_y(), 7);

  LineSums same_x;  // a vertical line has no slope
  for (double y : {1, 5, 3}) same_x.add(2, y);
  EXPECT_TRUE(std::isnan(same_x.slope()));
  EXPECT_TRUE(std::isnan(same_x.intercept()));

  LineSums same_inexact_x;  // 0.1 is inexact: sxx - sx^2/n need not cancel to exactly 0
  for (double y : {1, 5, 3}) same_inexact_x.add(0.1, y);
  EXPECT_TRUE(std::isnan(same_inexact_x.slope()));

  LineSums one_point_twice;  // weight 2 on a single point: two points, but at one x
  one_point_twice.add(one, 2);
  EXPECT_TRUE(std::isnan(one_point_twice.slope()));
}

TEST(StatisticsTest, LineRejectsBadWeight) {
  LineSums sums, other;
  EXPECT_ERROR_NAMING(sums.add(other, -1), "-1");
  EXPECT_ERROR_NAMING(sums.add(other, kNaN), "nan");
}

// ---------------------------------------------------------------------------------------------
// Kaplan–Meier. At risk at an event step d: events at steps >= d plus censored at steps > d.

TEST(StatisticsTest, KaplanMeierTextbook) {
  // Samples: 1 event, 2 event, 2 censored, 3 event, 5 censored, 5 event.
  // d=1: at risk 6 (all), 1 event          S(1) = 5/6
  // d=2: at risk 4 (2e, 3e, 5c, 5e; 2c is not: it was observed at steps 0..1 only), 1 event
  //                                        S(2) = 5/6 * 3/4 = 5/8 = 0.625
  // d=3: at risk 3 (3e, 5c, 5e), 1 event   S(3) = 5/8 * 2/3 = 5/12 ~ 0.417 <= 0.5: the median is 3
  // d=5: at risk 1 (5e), 1 event           S(5) = 0
  const std::vector<double> times = {1, 2, 2, 3, 5, 5};
  const std::vector<bool> event = {true, true, false, true, false, true};
  const Survival survival = kaplan_meier(times, event);
  EXPECT_EQ(survival.median, 3);
  EXPECT_EQ(survival.at_risk_at_median, 3);
  EXPECT_EQ(survival.events, 4);
  EXPECT_EQ(survival.censored, 2);
}

TEST(StatisticsTest, KaplanMeierNoCensoring) {
  // S(1) = 3/4, S(2) = 3/4 * 2/3 = 1/2 <= 0.5: median 2, with 3 at risk at step 2 (the samples at 2, 3, 4).
  const Survival survival = kaplan_meier({4, 3, 2, 1}, {true, true, true, true});
  EXPECT_EQ(survival.median, 2);
  EXPECT_EQ(survival.at_risk_at_median, 3);
  EXPECT_EQ(survival.events, 4);
  EXPECT_EQ(survival.censored, 0);
}

TEST(StatisticsTest, KaplanMeierNotReachedAndEmpty) {
  const Survival censored = kaplan_meier({3, 5}, {false, false});
  EXPECT_EQ(censored.median, kInf);
  EXPECT_EQ(censored.at_risk_at_median, 0);
  EXPECT_EQ(censored.events, 0);
  EXPECT_EQ(censored.censored, 2);

  // One event among four at step 1: S = 3/4 from then on, never <= 0.5.
  EXPECT_EQ(kaplan_meier({1, 8, 8, 8}, {true, false, false, false}).median, kInf);

  const Survival empty = kaplan_meier({}, {});
  EXPECT_TRUE(std::isnan(empty.median));
  EXPECT_EQ(empty.at_risk_at_median, 0);
  EXPECT_EQ(empty.events, 0);
  EXPECT_EQ(empty.censored, 0);
}

TEST(StatisticsTest, KaplanMeierCensoredAtEventStepIsNotAtRisk) {
  // Samples: 2 event, 2 censored, 4 event. At d=2 only 2e and 4e are at risk: S(2) = 1 - 1/2 = 0.5,
  // so the median is 2 with 2 at risk. (Counting the censored sample too would give S(2) = 2/3 and median 4.)
  const Survival survival = kaplan_meier({2, 2, 4}, {true, false, true});
  EXPECT_EQ(survival.median, 2);
  EXPECT_EQ(survival.at_risk_at_median, 2);

  // Censored at 0 was observed at no step: never at risk. At d=1 only the event is: S(1) = 0.
  const Survival at_zero = kaplan_meier({0, 1}, {false, true});
  EXPECT_EQ(at_zero.median, 1);
  EXPECT_EQ(at_zero.at_risk_at_median, 1);
}

TEST(StatisticsTest, KaplanMeierWeightsEqualDuplicatedSamples) {
  const std::vector<double> times = {1, 2, 2, 3, 5, 5};
  const std::vector<bool> event = {true, true, false, true, false, true};
  const std::vector<double> weights = {2, 0, 1, 3, 1, 1};
  // Duplicated: 1e x2, 2c, 3e x3, 5c, 5e (2e dropped). Total 8.
  // d=1: at risk 8, 2 events              S(1) = 6/8 = 3/4
  // d=3: at risk 5 (3e x3, 5c, 5e), 3 events  S(3) = 3/4 * 2/5 = 0.3: median 3 with 5 at risk
  const Survival weighted = kaplan_meier(times, event, weights);
  const Survival duplicated =
      kaplan_meier({1, 1, 2, 3, 3, 3, 5, 5}, {true, true, false, true, true, true, false, true});
  EXPECT_EQ(weighted.median, 3);
  EXPECT_EQ(weighted.at_risk_at_median, 5);
  EXPECT_EQ(weighted.events, 6);
  EXPECT_EQ(weighted.censored, 2);
  EXPECT_EQ(duplicated.median, weighted.median);
  EXPECT_EQ(duplicated.at_risk_at_median, weighted.at_risk_at_median);
  EXPECT_EQ(duplicated.events, weighted.events);
  EXPECT_EQ(duplicated.censored, weighted.censored);

  // All weights zero: no samples.
  EXPECT_TRUE(std::isnan(kaplan_meier({1, 2}, {true, true}, {0, 0}).median));
}

TEST(StatisticsTest, KaplanMeierRejectsBadInput) {
  EXPECT_ERROR_NAMING(kaplan_meier({1, 2}, {true}), "2 times but 1 event");
  EXPECT_ERROR_NAMING(kaplan_meier({1, 2}, {true, true}, {1}), "2 times but 1 weights");
  EXPECT_ERROR_NAMING(kaplan_meier({1, -3}, {true, true}), "times[1] = -3");
  EXPECT_ERROR_NAMING(kaplan_meier({1, kNaN}, {true, true}), "times[1] = nan");
  EXPECT_ERROR_NAMING(kaplan_meier({1, 2}, {true, true}, {1, -0.5}), "weights[1] = -0.5");
  EXPECT_ERROR_NAMING(kaplan_meier({-1}, {true}), "times[0] = -1");
}

// ---------------------------------------------------------------------------------------------
// bootstrap

std::function<double(const std::vector<double>&)> weighted_mean_of(const std::vector<double>& data) {
  return [data](const std::vector<double>& weights) {
    double sum = 0, total = 0;
    for (size_t i = 0; i < data.size(); ++i) {
      sum += weights[i] * data[i];
      total += weights[i];
    }
    return sum / total;
  };
}

const std::vector<double> kData = {2.1, 3.5, 1.2, 4.8, 2.9, 3.3, 0.7, 5.6, 2.4, 3.9,
                                   1.8, 4.1, 2.6, 3.0, 1.5, 4.4, 2.2, 3.7, 0.9, 5.1};

TEST(StatisticsTest, BootstrapIsDeterministic) {
  const auto statistic = weighted_mean_of(kData);
  const Interval first = bootstrap(20, statistic, 500, 42);
  const Interval again = bootstrap(20, statistic, 500, 42);
  EXPECT_EQ(first.low, again.low);
  EXPECT_EQ(first.high, again.high);
  const Interval other_seed = bootstrap(20, statistic, 500, 43);
  EXPECT_TRUE(first.low != other_seed.low || first.high != other_seed.high);
}

TEST(StatisticsTest, BootstrapConstantData) {
  // Every resample's weighted mean is 5 * W / W = 5 exactly.
  const Interval interval = bootstrap(10, weighted_mean_of(std::vector<double>(10, 5.0)), 200, 1);
  EXPECT_EQ(interval.low, 5);
  EXPECT_EQ(interval.high, 5);
}

TEST(StatisticsTest, BootstrapMeanContainsSampleMeanAndNarrowsWithData) {
  const double sample_mean = mean(kData);
  const auto [data_min, data_max] = std::minmax_element(kData.begin(), kData.end());
  const Interval interval = bootstrap(20, weighted_mean_of(kData), 2000, 7);
  EXPECT_LT(interval.low, sample_mean);
  EXPECT_GT(interval.high, sample_mean);
  EXPECT_GE(interval.low, *data_min);  // a weighted mean never leaves [min, max]
  EXPECT_LE(interval.high, *data_max);

  // The same values four times over: the standard error halves, so the width should be about half.
  std::vector<double> four_times;
  for (int copy = 0; copy < 4; ++copy) four_times.insert(four_times.end(), kData.begin(), kData.end());
  const Interval narrower = bootstrap(80, weighted_mean_of(four_times), 2000, 7);
  EXPECT_LT(narrower.low, sample_mean);
  EXPECT_GT(narrower.high, sample_mean);
  EXPECT_LT(narrower.high - narrower.low, 0.7 * (interval.high - interval.low));

  // Same seed, same resampled statistics: the 50% interval's percentiles lie inside the 95% interval's.
  const Interval half = bootstrap(20, weighted_mean_of(kData), 2000, 7, 0.5);
  EXPECT_GE(half.low, interval.low);
  EXPECT_LE(half.high, interval.high);
  EXPECT_LT(half.high - half.low, interval.high - interval.low);
}

TEST(StatisticsTest, BootstrapWeightsAreMultiplicities) {
  // Every call gets `samples` weights, non-negative integers summing to `samples`; over many resamples
  // each of 7 units (not a power of 2, so rejection matters) is drawn about equally often.
  std::vector<double> drawn(7, 0.0);
  int64_t calls = 0;
  bootstrap(
      7,
      [&](const std::vector<double>& weights) {
        ++calls;
        EXPECT_EQ(weights.size(), 7u);
        double total = 0;
        for (size_t i = 0; i < weights.size(); ++i) {
          EXPECT_GE(weights[i], 0);
          EXPECT_EQ(weights[i], std::floor(weights[i]));
          total += weights[i];
          drawn[i] += weights[i];
        }
        EXPECT_EQ(total, 7);
        return 0.0;
      },
      3000, 11);
  EXPECT_EQ(calls, 3000);
  // Each unit: 21000 draws * 1/7 = 3000 expected, standard deviation sqrt(21000 * 1/7 * 6/7) ~ 51.
  for (double count : drawn) EXPECT_NEAR(count, 3000, 300);
}

TEST(StatisticsTest, BootstrapNaNAndInfinity) {
  const Interval all_nan = bootstrap(
      5, [](const std::vector<double>&) { return kNaN; }, 100, 3);
  EXPECT_TRUE(std::isnan(all_nan.low));
  EXPECT_TRUE(std::isnan(all_nan.high));

  // NaN whenever unit 0 is drawn: P = 1 - (1/2)^2 = 3/4 of resamples for 2 units, more than half.
  const Interval mostly_nan = bootstrap(
      2, [](const std::vector<double>& w) { return w[0] > 0 ? kNaN : 1.0; }, 400, 3);
  EXPECT_TRUE(std::isnan(mostly_nan.low));
  EXPECT_TRUE(std::isnan(mostly_nan.high));

  // NaN when unit 0 is drawn twice or more: P = 1 - 0.9^10 - 10 * 0.1 * 0.9^9 ~ 0.26 for 10 units.
  // The rest give 1: the interval is [1, 1] from them alone.
  const Interval some_nan = bootstrap(
      10, [](const std::vector<double>& w) { return w[0] >= 2 ? kNaN : 1.0; }, 400, 3);
  EXPECT_EQ(some_nan.low, 1);
  EXPECT_EQ(some_nan.high, 1);

  // +inf when unit 0 is drawn (P = 1 - 0.9^10 ~ 0.65), else 1: +inf is kept and sorts last, so the
  // 97.5th percentile is +inf and the 2.5th is 1.
  const Interval with_inf = bootstrap(
      10, [](const std::vector<double>& w) { return w[0] > 0 ? kInf : 1.0; }, 400, 3);
  EXPECT_EQ(with_inf.low, 1);
  EXPECT_EQ(with_inf.high, kInf);

  bool called = false;
  const Interval no_samples = bootstrap(
      0,
      [&](const std::vector<double>&) {
        called = true;
        return 1.0;
      },
      10, 3);
  EXPECT_TRUE(std::isnan(no_samples.low));
  EXPECT_TRUE(std::isnan(no_samples.high));
  EXPECT_FALSE(called);
}

TEST(StatisticsTest, BootstrapKaplanMeierMedian) {
  // The median first-divergence step of resampled prompts is always one of the event steps or +inf.
  const std::vector<double> times = {3, 8, 5, 12, 20, 6, 9, 20, 4, 15};
  const std::vector<bool> event = {true, true, true, true, false, true, true, false, true, true};
  const Interval interval = bootstrap(
      10, [&](const std::vector<double>& w) { return kaplan_meier(times, event, w).median; }, 500, 5);
  EXPECT_GE(interval.low, 3);
  EXPECT_LE(interval.low, interval.high);
  for (double end : {interval.low, interval.high})
    EXPECT_TRUE(std::isinf(end) || std::count(times.begin(), times.end(), end) > 0) << end;
}

TEST(StatisticsTest, BootstrapRejectsBadArguments) {
  const auto statistic = weighted_mean_of(kData);
  EXPECT_ERROR_NAMING(bootstrap(20, statistic, 0, 1), "resamples 0");
  EXPECT_ERROR_NAMING(bootstrap(-2, statistic, 10, 1), "samples -2");
  EXPECT_ERROR_NAMING(bootstrap(20, statistic, 10, 1, 1.5), "level 1.5");
  EXPECT_ERROR_NAMING(bootstrap(20, statistic, 10, 1, 0), "level 0");
  EXPECT_ERROR_NAMING(bootstrap(20, statistic, 10, 1, 1), "level 1");
}

}  // namespace
}  // namespace kvdrift::stats
