"""paired_stats.py against values worked out by hand."""
import sys
import unittest

import numpy as np

from analysis.tests import support

sys.path.insert(0, support.ANALYSIS_DIR)
import paired_stats as stats  # noqa: E402


class SignFlip(unittest.TestCase):
    def test_exact_by_hand(self):
        # [1, 2, 3]: of the 8 sign patterns only all-plus and all-minus reach |mean| = 2
        self.assertEqual(stats.sign_flip_pvalue([1, 2, 3]), 2 / 8)
        # a mean of 0: every pattern is at least as far from 0
        self.assertEqual(stats.sign_flip_pvalue([1, -1]), 1.0)
        self.assertEqual(stats.sign_flip_pvalue([1, 2, -3]), 1.0)
        self.assertEqual(stats.sign_flip_pvalue([0, 0, 0]), 1.0)
        # [2, 2, 2, 1]: |sum| 7 only with all signs alike (flipping the 1 gives 5): 2 of 16
        self.assertEqual(stats.sign_flip_pvalue([2, 2, 2, 1]), 2 / 16)
        # [-1, -2, 0]: the 0's sign does not matter; ±1 ±2 reaches |3| in 2 of 4: 4 of 8
        self.assertEqual(stats.sign_flip_pvalue([-1, -2, 0]), 0.5)
        # a mean that is 0 but for rounding (0.1 + 0.2 - 0.3 = 5.6e-17 in floats): every pattern ties with it
        self.assertEqual(stats.sign_flip_pvalue([0.1, 0.2, -0.3]), 1.0)
        self.assertTrue(np.isnan(stats.sign_flip_pvalue([])))
        with self.assertRaises(ValueError):
            stats.sign_flip_pvalue([1.0, np.nan])

    def test_random_patterns_beyond_16_samples(self):
        # 17 positive differences: only the patterns of one sign throughout reach the observed mean; of the
        # 20000 random patterns (default_rng(0)) those count, and the observed one: (count + 1) / 20001
        patterns = np.random.default_rng(0).choice([-1.0, 1.0], size=(20000, 17))
        alike = np.sum(np.abs(patterns.sum(axis=1)) == 17)
        self.assertEqual(stats.sign_flip_pvalue(np.arange(1, 18)), (alike + 1) / 20001)
        # a mixed case: the random estimate is close to the exact count, and reproducible (seed 0)
        d = np.random.default_rng(3).normal(0.4, 1.0, 17)
        exact = stats.sign_flip_pvalue(d, exact_up_to=17)
        estimate = stats.sign_flip_pvalue(d)
        self.assertAlmostEqual(estimate, exact, delta=0.01)
        self.assertEqual(estimate, stats.sign_flip_pvalue(d))
        self.assertNotEqual(estimate, stats.sign_flip_pvalue(d, seed=1))


class Holm(unittest.TestCase):
    def test_step_down_by_hand(self):
        # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max 0.06 for the last
        np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
        np.testing.assert_allclose(stats.holm([0.04, 0.01]), [0.04, 0.02])
        np.testing.assert_allclose(stats.holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1, monotone
        np.testing.assert_allclose(stats.holm([0.03]), [0.03])
        # NaN (no test) stays NaN and is not counted: m = 2
        np.testing.assert_allclose(stats.holm([np.nan, 0.01, 0.02]), [np.nan, 0.02, 0.02])
        self.assertEqual(len(stats.holm([])), 0)


class SimultaneousBand(unittest.TestCase):
    def test_constant_columns_have_no_width(self):
        band = stats.simultaneous_band(np.tile([1.0, 2.0, 3.0], (5, 1)))
        for ends in (band.low, band.high, band.pointwise_low, band.pointwise_high):
            np.testing.assert_allclose(ends, [1, 2, 3])
        self.assertEqual(band.critical, 0.0)
        self.assertEqual(band.samples.tolist(), [5, 5, 5])

    def test_two_samples_by_hand(self):
        # resampled means of {0, 1}: 0, 0.5, 1 (a quarter, a half, a quarter); |mean − 0.5| / sd is 0 or
        # 0.5 / sd, so its 95% quantile times sd is 0.5: the band is [0, 1], as is the percentile band
        band = stats.simultaneous_band([[0.0], [1.0]])
        self.assertAlmostEqual(band.mean[0], 0.5)
        for value, expected in ((band.low[0], 0), (band.high[0], 1), (band.pointwise_low[0], 0),
                                (band.pointwise_high[0], 1)):
            self.assertAlmostEqual(value, expected, places=12)

    def test_covers_every_steps_own_studentized_band(self):
        # One column alone gives that step's own (pointwise, studentized) critical value with the same
        # resamples; the maximum over steps is at least each of them, so its band contains theirs.
        matrix = np.random.default_rng(1).normal(size=(20, 6))
        matrix[:5, 4:] = np.nan  # samples that ended early
        band = stats.simultaneous_band(matrix)
        self.assertEqual(band.samples.tolist(), [20, 20, 20, 20, 15, 15])
        for step in range(6):
            own = stats.simultaneous_band(matrix[:, step:step + 1])
            self.assertGreaterEqual(band.critical, own.critical)
            self.assertLessEqual(band.low[step], own.low[0] + 1e-12)
            self.assertGreaterEqual(band.high[step], own.high[0] - 1e-12)
            self.assertAlmostEqual(band.mean[step], np.nanmean(matrix[:, step]))
        self.assertTrue(np.all(band.high - band.low > band.pointwise_high - band.pointwise_low))

    def test_reproducible_weights(self):
        weights = stats.resample_weights(4, resamples=3, seed=0)
        self.assertEqual(weights.shape, (3, 4))
        self.assertTrue(np.all(weights.sum(axis=1) == 4))
        np.testing.assert_array_equal(weights, stats.resample_weights(4, resamples=3, seed=0))
        # the weighted mean per step leaves out missing values
        np.testing.assert_allclose(stats.step_means(np.array([[1.0, np.nan], [3.0, 5.0]]), np.array([[1.0, 3.0]])),
                                   [[2.5, 5.0]])


class ReportingRules(unittest.TestCase):
    def test_fewer_than_8_samples_give_per_sample_values(self):
        self.assertEqual(stats.describe_interval(0.5, 0.1, 0.9, [0.2] * 8), "0.5 [0.1, 0.9]")
        self.assertEqual(stats.describe_interval(0.75, 0.7, 0.8, [0.75, 0.8]),
                         "0.75 (n=2 < 8: per-sample values [0.75, 0.8], range [0.75, 0.8])")
        self.assertEqual(stats.describe_interval(0.3, np.nan, np.nan, [0.1, 0.5, 0.2, 0.4, 0.3], ".0%"),
                         "30% (n=5 < 8: per-sample values [10%, 50%, 20%, 40%, 30%], range [10%, 50%])")
        self.assertEqual(stats.describe_interval(1.0, np.nan, np.nan, [1.0, np.nan]),
                         "1 (n=2 < 8: per-sample values [1, n/a], range [1, 1])")

    def test_a_base_interval_containing_0_gives_a_difference(self):
        self.assertEqual(stats.relative_change((0.1, 0.5), "F", "D"), ("fraction", "F"))
        self.assertEqual(stats.relative_change((-0.5, -0.1), "F", "D"), ("fraction", "F"))
        self.assertEqual(stats.relative_change((-0.1, 0.5), "F", "D"), ("difference", "D"))
        self.assertEqual(stats.relative_change((0.0, 0.5), "F", "D"), ("difference", "D"))
        self.assertEqual(stats.relative_change((np.nan, np.nan), "F", "D"), ("difference", "D"))


if __name__ == "__main__":
    unittest.main()
