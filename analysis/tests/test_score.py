"""score.py on hand-made MATH500 and GSM8K runs: /scores holds the per-lane counts and per-sample
flags worked out by hand, and bad input is refused without touching the file."""
import math
import os
import re
import sys
import unittest

import h5py
import numpy as np

from analysis.tests import support

sys.path.insert(0, support.ANALYSIS_DIR)
import kvdrift_log as log  # noqa: E402
import score  # noqa: E402

QUANTIZERS = [("alpha", "rtn", {"k_bits": 2}), ("beta", "kivi", {"k_bits": 2})]
Z2 = 1.959963984540054 ** 2  # the squared two-sided 95% normal quantile


def scored_run(path, prompts_path, texts, complete=True, with_continuations=True):
    """texts: per sample (answer, reference continuation, alpha continuation, beta continuation)."""
    samples = []
    for index, (answer, reference, alpha, beta) in enumerate(texts):
        attrs = {"answer": answer}
        if with_continuations:
            attrs["reference_continuation"] = reference
        lanes = {}
        for name, text in (("alpha", alpha), ("beta", beta)):
            lane_attrs = {"first_divergence": 0, "outcome": "token_mismatch"}
            if with_continuations:
                lane_attrs["continuation"] = text
            lanes[(name, "free_running")] = {"attrs": lane_attrs, "data": {"tokens": [1, 2]}}
        samples.append({"index": index, "attrs": attrs, "reference_tokens": [1, 2], "lanes": lanes})
    return support.write_run(path, QUANTIZERS, samples, prompts={"source": "jsonl", "path": prompts_path},
                             complete=complete)


MATH_TEXTS = [
    ("\\frac{1}{2}", "so $\\boxed{\\dfrac12}$", "it is \\boxed{0.5}", "\\boxed{1/3}"),
    ("7", "\\boxed{7}", "the answer is 7", "\\boxed{7.0}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3,\\frac{\\pi}{2})}", "\\boxed{(3, \\frac{\\pi}{2})}",
     "\\boxed{(3,\\pi)}"),
]


def read_scores(path):
    with h5py.File(path, "r") as f:
        if "scores" not in f:
            return None
        group = f["scores"]
        lanes = {}
        for name in ("reference", "alpha/free_running", "beta/free_running"):
            g = group[name]
            lanes[name] = (int(g.attrs["correct"]), int(g.attrs["scored"]), float(g.attrs["accuracy"]),
                           g["sample"][:].tolist(), g["correct"][:].tolist(),
                           [x.decode() for x in g["extracted"][:]],
                           (float(g.attrs["accuracy_ci_low"]), float(g.attrs["accuracy_ci_high"])))
            assert g["sample"].dtype == np.int64 and g["correct"].dtype == np.int64
        return dict(group.attrs), lanes


class ScoreMath(unittest.TestCase):
    def test_math500_run(self):
        directory = support.scratch_dir("score_math")
        path = scored_run(os.path.join(directory, "run.h5"), "/data/math500/test.jsonl", MATH_TEXTS)
        result = support.run_script("score.py", path)
        self.assertEqual(result.returncode, 0, result.stderr)
        attrs, lanes = read_scores(path)
        self.assertEqual(attrs["task"], "math")
        self.assertRegex(attrs["scored_utc"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertEqual(lanes["reference"][:5], (3, 3, 1.0, [0, 1, 2], [1, 1, 1]))
        self.assertEqual(lanes["alpha/free_running"][:5], (2, 3, 2 / 3, [0, 1, 2], [1, 0, 1]))
        self.assertEqual(lanes["beta/free_running"][:5], (1, 3, 1 / 3, [0, 1, 2], [0, 1, 0]))
        self.assertEqual(lanes["alpha/free_running"][5], ["0.5", "", "(3, \\frac{\\pi}{2})"])
        self.assertIn("alpha free-running                              2       3     0.667", result.stdout)
        # Wilson intervals: k of n all correct gives [n / (n + z^2), 1]; k and n - k of n mirror each
        # other about 1/2
        low, high = lanes["reference"][6]
        self.assertAlmostEqual(low, 3 / (3 + Z2), places=12)  # 0.4385
        self.assertEqual(high, 1.0)
        alpha, beta = lanes["alpha/free_running"][6], lanes["beta/free_running"][6]
        self.assertAlmostEqual(alpha[0], 1 - beta[1], places=12)
        self.assertAlmostEqual(alpha[1], 1 - beta[0], places=12)
        self.assertTrue(0 < beta[0] < 1 / 3 < beta[1] < 1)
        self.assertEqual(score.INTERVAL, "95% Wilson score")
        with h5py.File(path, "r") as f:
            self.assertEqual(f["scores"].attrs["interval"], "95% Wilson score")
            self.assertEqual(log.read_scores(f)["interval"], "95% Wilson score")  # as reports name it
        self.assertIn("accuracy  95% CI (Wilson)", result.stdout)
        self.assertIn("reference                                       3       3     1.000  [0.439, 1.000]",
                      result.stdout)
        # scoring again replaces /scores rather than adding to it
        again = support.run_script("score.py", path, "--task", "math")
        self.assertEqual(again.returncode, 0, again.stderr)
        attrs_again, lanes_again = read_scores(path)
        self.assertEqual(attrs_again["task"], "math")
        self.assertEqual(lanes_again, lanes)
        # a --task that contradicts prompts.path is refused, and the scores stay
        wrong = support.run_script("score.py", path, "--task", "gsm8k")
        self.assertEqual(wrong.returncode, 1)
        self.assertEqual(wrong.stderr, f"score.py: error: {path}: --task gsm8k, but prompts.path "
                                       "'/data/math500/test.jsonl' holds math prompts; leave --task out\n")
        self.assertEqual(read_scores(path), (attrs_again, lanes))

    def test_unfinished_samples_are_not_scored(self):
        directory = support.scratch_dir("score_partial")
        path = scored_run(os.path.join(directory, "run.h5"), "/data/math500/test.jsonl", MATH_TEXTS)
        with h5py.File(path, "r+") as f:
            f["samples/1"].attrs["complete"] = np.int64(0)
        result = support.run_script("score.py", path)
        self.assertEqual(result.returncode, 0, result.stderr)
        _, lanes = read_scores(path)
        self.assertEqual(lanes["reference"][:5], (2, 2, 1.0, [0, 2], [1, 1]))


class ScoreGsm8k(unittest.TestCase):
    def test_gsm8k_run(self):
        texts = [("2 + 3 = <<2+3=5>>5\n#### 1,200", "so 1200 in all", "1,200.", "about 1,199"),
                 ("#### 18", "18 eggs, 20 left", "makes $18 a day.", "")]
        directory = support.scratch_dir("score_gsm8k")
        path = scored_run(os.path.join(directory, "run.h5"), "/data/gsm8k/test.jsonl", texts)
        result = support.run_script("score.py", path)
        self.assertEqual(result.returncode, 0, result.stderr)
        attrs, lanes = read_scores(path)
        self.assertEqual(attrs["task"], "gsm8k")
        self.assertEqual(lanes["reference"][:5], (1, 2, 0.5, [0, 1], [1, 0]))
        self.assertEqual(lanes["reference"][5], ["1200", "20"])
        self.assertEqual(lanes["alpha/free_running"][5], ["1,200", "18"])
        self.assertEqual(lanes["alpha/free_running"][:5], (2, 2, 1.0, [0, 1], [1, 1]))
        self.assertEqual(lanes["beta/free_running"][:5], (0, 2, 0.0, [0, 1], [0, 0]))
        # Wilson: 1 of 2 is symmetric about 1/2; 2 of 2 is [2 / (2 + z^2), 1]; 0 of 2 is [0, z^2 / (2 + z^2)]
        low, high = lanes["reference"][6]
        self.assertAlmostEqual(low + high, 1.0, places=12)
        self.assertTrue(0 < low < 0.5 < high < 1)
        self.assertEqual(lanes["alpha/free_running"][6][1], 1.0)
        self.assertAlmostEqual(lanes["alpha/free_running"][6][0], 2 / (2 + Z2), places=12)
        self.assertEqual(lanes["beta/free_running"][6][0], 0.0)
        self.assertAlmostEqual(lanes["beta/free_running"][6][1], Z2 / (2 + Z2), places=12)


    def test_replies_are_scored_not_what_follows_them(self):
        # Decoding past the end token (stop_at_eos: false) leaves numbers after the answer in the
        # continuation; the reply (up to the end token) is what gets scored when the log has it.
        texts = [("#### 18", "she makes 18 dollars. Next question: 624", "18 then 7", "7")]
        directory = support.scratch_dir("score_replies")
        path = scored_run(os.path.join(directory, "run.h5"), "/data/gsm8k/test.jsonl", texts)
        with h5py.File(path, "r+") as f:
            f["samples/0"].attrs["reference_reply"] = "she makes 18 dollars."
            f["samples/0/alpha/free_running"].attrs["reply"] = "18"
        result = support.run_script("score.py", path)
        self.assertEqual(result.returncode, 0, result.stderr)
        _, lanes = read_scores(path)
        self.assertEqual(lanes["reference"][5], ["18"])
        self.assertEqual(lanes["alpha/free_running"][5], ["18"])
        self.assertEqual(lanes["beta/free_running"][5], ["7"])  # no reply recorded: its continuation
        self.assertEqual([lanes[k][0] for k in ("reference", "alpha/free_running", "beta/free_running")], [1, 1, 0])


class AccuracyInterval(unittest.TestCase):
    def test_wilson_interval(self):
        # Newcombe (1998), "Two-sided confidence intervals for the single proportion: comparison of
        # seven methods", Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score, no
        # continuity correction), to the four decimals printed there
        for (k, n), (low, high) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605),
                                    (0, 20): (0.0, 0.1611), (1, 29): (0.0061, 0.1718)}.items():
            correct, scored, accuracy, ci_low, ci_high = score.accuracy_summary([1] * k + [0] * (n - k))
            self.assertEqual((correct, scored, accuracy), (k, n, k / n))
            self.assertAlmostEqual(ci_low, low, delta=5e-5, msg=f"{k}/{n}")
            self.assertAlmostEqual(ci_high, high, delta=5e-5, msg=f"{k}/{n}")
        # None or all correct: one end exactly 0 or 1, the other z^2 / (n + z^2) from it (not the
        # degenerate [0, 0] a bootstrap gives)
        self.assertEqual(score.accuracy_summary([0] * 16)[2:4], (0.0, 0.0))
        self.assertAlmostEqual(score.accuracy_summary([0] * 16)[4], Z2 / (16 + Z2), places=12)  # 0.1936
        self.assertEqual(score.accuracy_summary([1] * 7)[2:5:2], (1.0, 1.0))
        self.assertAlmostEqual(score.accuracy_summary([1] * 7)[3], 7 / (7 + Z2), places=12)

    def test_nothing_scored_is_nan(self):
        correct, scored, *rest = score.accuracy_summary([])
        self.assertEqual((correct, scored), (0, 0))
        self.assertTrue(all(math.isnan(v) for v in rest))


class ScoreErrors(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = support.scratch_dir("score_errors")

    def assert_error(self, path, message, *extra):
        result = support.run_script("score.py", path, *extra)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, f"score.py: error: {message}\n")
        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as f:
                self.assertNotIn("scores", f)
                self.assertNotIn("scores_incomplete", f)

    def test_run_not_complete(self):
        path = scored_run(os.path.join(self.dir, "partial.h5"), "/data/math500/test.jsonl", MATH_TEXTS,
                          complete=False)
        self.assert_error(path, f"{path}: run is not complete (root attribute complete is not 1); finish or "
                                "resume it before scoring")

    def test_run_without_continuation_texts(self):
        path = scored_run(os.path.join(self.dir, "old.h5"), "/data/math500/test.jsonl", MATH_TEXTS,
                          with_continuations=False)
        self.assert_error(path, f"{path}: run has no continuation texts (samples/0 has no "
                                "reference_continuation); re-run it with a kvdrift newer than 0.1.0")

    def test_task_cannot_be_inferred(self):
        path = scored_run(os.path.join(self.dir, "stories.h5"), "/data/tinystories/sample.txt", MATH_TEXTS)
        self.assert_error(path, f"{path}: cannot tell the task from prompts.path '/data/tinystories/sample.txt' "
                                "(expected a directory named math500, aime24, gsm8k, humaneval); pass --task")

    def test_sample_without_reference_answer(self):
        texts = [("", "\\boxed{1}", "", "")]
        path = scored_run(os.path.join(self.dir, "noanswer.h5"), "/data/math500/test.jsonl", texts)
        self.assert_error(path, f"{path}: samples/0 has no reference answer (set prompts.answer_field)")

    def test_not_a_run_log(self):
        path = os.path.join(self.dir, "plain.h5")
        with h5py.File(path, "w") as f:
            f.attrs["something"] = 1
        self.assert_error(path, f"{path}: not a kvdrift run log (no schema_version attribute)")

    def test_timeout_is_a_number_of_seconds_up_to_a_day(self):
        """inf and nan once reached the sandbox's setrlimit (OverflowError) and deadline; each is refused in
        one line, exit 2, before the file is read."""
        path = scored_run(os.path.join(self.dir, "timeout.h5"), "/data/math500/test.jsonl", MATH_TEXTS)
        for value in ("inf", "nan", "-1", "0", "1e300"):
            result = support.run_script("score.py", path, f"--timeout={value}")
            self.assertEqual((result.returncode, result.stderr),
                             (2, f"score.py: error: argument --timeout: '{value}' is not a number of seconds above "
                                 "0 and at most 86400 (a day)\n"))
        with h5py.File(path, "r") as f:
            self.assertNotIn("scores", f)

    def test_unknown_task_option(self):
        path = scored_run(os.path.join(self.dir, "any.h5"), "/data/math500/test.jsonl", MATH_TEXTS)
        result = support.run_script("score.py", path, "--task", "mmlu")
        self.assertEqual(result.returncode, 2)
        self.assertTrue(re.search(r"argument --task: invalid choice: 'mmlu'", result.stderr), result.stderr)


if __name__ == "__main__":
    unittest.main()
