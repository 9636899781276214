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
import score  # noqa: E402

QUANTIZERS = [("alpha", "rtn", {"k_bits": 2}), ("beta", "kivi", {"k_bits": 2})]


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
        # 95% bootstrap intervals over 3 samples: a resample mean is k/3; all three resampled samples
        # correct (p = 1) or all wrong (p = 0) each have probability >= 1/27 (~37 of 1000 resamples,
        # more than the 25 beyond each 2.5% tail) whenever the lane has both, so [0, 1]
        self.assertEqual(lanes["reference"][6], (1.0, 1.0))
        self.assertEqual(lanes["alpha/free_running"][6], (0.0, 1.0))
        self.assertEqual(lanes["beta/free_running"][6], (0.0, 1.0))
        self.assertIn("reference                                       3       3     1.000  [1.000, 1.000]",
                      result.stdout)
        self.assertIn("alpha free-running                              2       3     0.667  [0.000, 1.000]",
                      result.stdout)
        # scoring again replaces /scores rather than adding to it
        again = support.run_script("score.py", path, "--task", "aime")
        self.assertEqual(again.returncode, 0, again.stderr)
        attrs, lanes_again = read_scores(path)
        self.assertEqual(attrs["task"], "aime")
        self.assertEqual(lanes_again, lanes)

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
        # 2 samples, one correct: resample means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4 -> [0, 1]
        self.assertEqual([lanes[k][6] for k in ("reference", "alpha/free_running", "beta/free_running")],
                         [(0.0, 1.0), (1.0, 1.0), (0.0, 0.0)])


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
    def test_bootstrap_interval(self):
        flags = [1] * 30 + [0] * 10
        correct, scored, accuracy, low, high = score.accuracy_summary(flags)
        self.assertEqual((correct, scored, accuracy), (30, 40, 0.75))
        # about the normal approximation 0.75 -+ 1.96 sqrt(0.75 * 0.25 / 40) = [0.616, 0.884]
        self.assertAlmostEqual(low, 0.616, delta=0.03)
        self.assertAlmostEqual(high, 0.884, delta=0.03)
        self.assertEqual(score.accuracy_summary(flags), (correct, scored, accuracy, low, high))  # seeded
        self.assertEqual(score.accuracy_summary([1] * 7)[2:], (1.0, 1.0, 1.0))
        self.assertEqual(score.accuracy_summary([0] * 7)[2:], (0.0, 0.0, 0.0))

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

    def test_unknown_task_option(self):
        path = scored_run(os.path.join(self.dir, "any.h5"), "/data/math500/test.jsonl", MATH_TEXTS)
        result = support.run_script("score.py", path, "--task", "mmlu")
        self.assertEqual(result.returncode, 2)
        self.assertTrue(re.search(r"argument --task: invalid choice: 'mmlu'", result.stderr), result.stderr)


if __name__ == "__main__":
    unittest.main()
