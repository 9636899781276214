"""kvdrift_log.survival_curve, the one Kaplan–Meier curve (the survival figure draws it; the engine's
/summary records its median): hand-worked curves and numbers at risk, with kvdrift's convention that a
sample censored at step c was seen at steps 0..c-1 only, so it is not at risk at c."""
import sys
import unittest

import numpy as np

from analysis.tests import support

sys.path.insert(0, support.ANALYSIS_DIR)
import kvdrift_log  # noqa: E402

EVENT, CENSORED = "token_mismatch", "identical"


def curve(times, events, steps):
    survival, at_risk = kvdrift_log.survival_curve(times, [EVENT if e else CENSORED for e in events], steps)
    return list(survival), list(at_risk)


class SurvivalCurve(unittest.TestCase):
    def assert_curve(self, times, events, steps, survival, at_risk):
        got_survival, got_at_risk = curve(times, events, steps)
        np.testing.assert_allclose(got_survival, survival, rtol=0, atol=1e-12)
        self.assertEqual(got_at_risk, at_risk)

    def test_textbook(self):
        # 1 event, 2 event, 2 censored, 3 event, 5 censored, 5 event.
        # d=1: 6 at risk, 1 event: S = 5/6; d=2: 4 at risk (2c was seen at steps 0..1 only): S = 5/6 * 3/4;
        # d=3: 3 at risk: S = 5/8 * 2/3 = 5/12 (<= 0.5 first here: the median is 3); d=5: 1 at risk: S = 0.
        self.assert_curve([1, 2, 2, 3, 5, 5], [True, True, False, True, False, True], 7,
                          [1, 5 / 6, 5 / 8, 5 / 12, 5 / 12, 0, 0], [6, 6, 4, 3, 2, 1, 0])

    def test_no_censoring(self):
        self.assert_curve([4, 3, 2, 1], [True] * 4, 6, [1, 0.75, 0.5, 0.25, 0, 0], [4, 4, 3, 2, 1, 0])

    def test_censored_at_an_event_step_is_not_at_risk_there(self):
        # At d=2 only the events at 2 and 4 are at risk: S(2) = 1/2 (counting 2c too would give 2/3).
        self.assert_curve([2, 2, 4], [True, False, True], 5, [1, 1, 0.5, 0.5, 0], [3, 3, 2, 1, 1])
        # Censored at 0: seen at no step, never at risk.
        self.assert_curve([0, 1], [False, True], 2, [1, 0], [1, 1])

    def test_not_reached_and_empty(self):
        self.assert_curve([3, 5], [False, False], 3, [1, 1, 1], [2, 2, 2])
        self.assert_curve([], [], 2, [1, 1], [0, 0])
        self.assert_curve([1], [True], 0, [], [])

    def test_times_past_the_last_step_are_at_risk_throughout(self):
        self.assert_curve([10**9, 1], [False, True], 3, [1, 0.5, 0.5], [2, 2, 1])

    def test_length_only_is_an_event_and_censored_outcomes_are_not(self):
        survival, _ = kvdrift_log.survival_curve([1, 1, 2, 2], ["length_only", "token_mismatch", "identical",
                                                                "censored"], 3)
        np.testing.assert_allclose(survival, [1, 0.5, 0.5])


if __name__ == "__main__":
    unittest.main()
