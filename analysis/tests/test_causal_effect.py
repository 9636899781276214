"""causal_effect.py: on hand-made runs the fractions removed are the ones worked out by hand, and on a
real stories260K run its slope and mean are the run log summary's own (one definition)."""
import os
import subprocess
import sys
import unittest

import h5py
import numpy as np

from analysis.tests import support

sys.path.insert(0, support.ANALYSIS_DIR)
import causal_effect  # noqa: E402

QUANTIZERS = [("kvarn", "kvarn", {}), ("kvarn-ts", "kvarn", {"wrap": "true_scale"}),
              ("kvarn-td", "kvarn", {"wrap": "true_direction"})]


def hand_run(path, base_kl, factors):
    """Each sample's teacher-forced KL: base_kl[i] for kvarn, times factors[q] for the wrappers."""
    samples = []
    for index, kl in enumerate(base_kl):
        lanes = {(name, "teacher_forced"): {"data": {"kl": np.asarray(kl, dtype=np.float32) * factors[name]}}
                 for name, _, _ in QUANTIZERS}
        samples.append({"index": index, "reference_tokens": np.arange(len(kl)), "lanes": lanes})
    support.write_run(path, QUANTIZERS, samples, max_new_tokens=8)


class HandMade(unittest.TestCase):
    def test_fractions_removed_by_hand(self):
        directory = support.scratch_dir("causal")
        path = os.path.join(directory, "run.h5")
        # Step 0 (the shared prefill) is left out. Sample 0 from step 1: 1, 2, 3 (slope 1, mean 2);
        # sample 1: 5, 7 (slope 2, mean 6). Pooled within-sample slope: (2 * 1 + 0.5 * 2) / (2 + 0.5)
        # = 1.2 (sums of centred x*y and x*x: 2 and 0.5 for sample 1's two points); pooled mean 18 / 5.
        # true_scale scales every KL by 0.25 (removes 75%), true_direction by 0.9 (removes 10%), in
        # every resample alike, so the intervals are the point values.
        hand_run(path, [[9, 1, 2, 3], [9, 5, 7]], {"kvarn": 1.0, "kvarn-ts": 0.25, "kvarn-td": 0.9})
        out = os.path.join(directory, "effect.csv")
        result = support.run_script("causal_effect.py", path, "-o", out)
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = {(r["wrapped"], r["statistic"]): r for r in support.read_csv(out)}
        self.assertEqual(set(rows), {("kvarn-ts", "kl_slope"), ("kvarn-ts", "kl_mean"), ("kvarn-td", "kl_slope"),
                                     ("kvarn-td", "kl_mean")})
        self.assertAlmostEqual(float(rows["kvarn-ts", "kl_slope"]["base_value"]), 1.2, places=6)
        self.assertAlmostEqual(float(rows["kvarn-ts", "kl_mean"]["base_value"]), 18 / 5, places=6)
        for (wrapped, _), row in rows.items():
            removed = 0.75 if wrapped == "kvarn-ts" else 0.1
            for column in ("fraction_removed", "fraction_removed_ci_low", "fraction_removed_ci_high"):
                self.assertAlmostEqual(float(row[column]), removed, places=5, msg=(wrapped, column))
        self.assertIn("kvarn            kvarn-ts", result.stdout)

    def test_paired_figure_by_hand(self):
        directory = support.scratch_dir("causal-figure")
        path = os.path.join(directory, "run.h5")
        hand_run(path, [[9, 1, 2, 3], [9, 5, 7]], {"kvarn": 1.0, "kvarn-ts": 0.25, "kvarn-td": 0.9})
        stem = os.path.join(directory, "paired")
        result = support.run_script("causal_effect.py", path, "--pair", "kvarn:kvarn-ts", "--figure", stem,
                                    "--window", "2")
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(stem + ".png", "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        with open(stem + ".pdf", "rb") as f:
            self.assertEqual(f.read(5), b"%PDF-")
        rows = support.read_csv(stem + ".csv")
        curve = lambda series, column: [support.num(r[column]) for r in rows if r["series"] == series]
        # trailing 2-step means: sample 0 9, 5, 1.5, 2.5; sample 1 9, 7, 6 -> mean 9, 6, 3.75, 2.5
        self.assertEqual(curve("base", "center"), [9.0, 6.0, 3.75, 2.5])
        self.assertEqual([r["samples"] for r in rows if r["series"] == "base"], ["2", "2", "2", "1"])
        self.assertEqual(curve("other", "center"), [2.25, 1.5, 0.9375, 0.625])
        self.assertEqual(curve("difference", "center"), [-6.75, -4.5, -2.8125, -1.875])
        # step 1's resampled means are 5, 6 or 7 (a quarter each at the ends): the band is [5, 7];
        # step 0 (both 9) and step 3 (one sample) have no spread
        self.assertEqual(curve("base", "low")[:2] + curve("base", "low")[3:], [9.0, 5.0, 2.5])
        self.assertEqual(curve("base", "high")[:2] + curve("base", "high")[3:], [9.0, 7.0, 2.5])
        self.assertEqual({(r["base"], r["other"]) for r in rows}, {("kvarn", "kvarn-ts")})
        result = support.run_script("causal_effect.py", path, "--figure", stem)  # never replaced
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, f"causal_effect.py: error: {stem}.png exists; remove it or choose another path\n")

    def test_figure_wording(self):
        # a negative fraction removed is an increase, said as one with its interval turned round
        self.assertEqual(causal_effect._lower((0.29, 0.22, 0.35)), "29% [22, 35] lower")
        self.assertEqual(causal_effect._lower((-0.05, -0.21, 0.12)), "5% [-12, 21] higher")
        self.assertEqual(causal_effect._lower((0.10, -0.004, 0.21)), "10% [0, 21] lower")
        self.assertEqual(causal_effect._lower((float("nan"),) * 3), "n/a (a zero or undefined base)")
        # the caption names the pooling when the samples come from more than one run
        self.assertEqual(causal_effect.plot_drift.runs_caption(["model m · 4 samples"] * 3, 12),
                         "pooled over 3 runs (12 samples): model m · 4 samples")
        self.assertEqual(causal_effect.plot_drift.runs_caption(["a", "b"], 5),
                         "pooled over 2 runs (5 samples): a | b")
        self.assertEqual(causal_effect.plot_drift.runs_caption(["model m · 4 samples"], 4), "model m · 4 samples")
        self.assertEqual(causal_effect.plot_drift.runs_caption(["a", "b", "a"]), "a | b")  # not pooled

    def test_bad_input_is_one_line(self):
        directory = support.scratch_dir("causal-bad")
        path = os.path.join(directory, "run.h5")
        hand_run(path, [[0, 1, 2]], {"kvarn": 1.0, "kvarn-ts": 0.5, "kvarn-td": 1.0})
        result = support.run_script("causal_effect.py", path, "--pair", "kvarn:kivi")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, f"causal_effect.py: error: {path}: no quantizer 'kivi' "
                                        f"(available: kvarn, kvarn-ts, kvarn-td)\n")
        existing = os.path.join(directory, "exists.csv")
        open(existing, "w").close()
        result = support.run_script("causal_effect.py", path, "-o", existing)
        self.assertEqual(result.stderr, f"causal_effect.py: error: {existing} exists; remove it or choose another path\n")

    def test_inputs_that_would_give_a_wrong_figure_are_refused(self):
        """Each case: one error line, exit 1, nothing written; each would otherwise print a plausible
        number (a run counted twice, unpaired samples, a one-sample 'interval') or fail half-way."""
        directory = support.scratch_dir("causal-refused")
        path = os.path.join(directory, "run.h5")
        factors = {"kvarn": 1.0, "kvarn-ts": 0.5, "kvarn-td": 1.0}
        hand_run(path, [[0, 1, 2], [0, 2, 3]], factors)
        link = os.path.join(directory, "link.h5")
        os.symlink(path, link)
        one = os.path.join(directory, "one.h5")
        hand_run(one, [[0, 1, 2]], factors)
        broken = os.path.join(directory, "broken.h5")
        hand_run(broken, [[0, 1, 2], [0, float("nan"), 3]], factors)
        other_model = os.path.join(directory, "other-model.h5")
        hand_run(other_model, [[0, 1, 2], [0, 2, 3]], factors)
        with h5py.File(other_model, "r+") as f:
            f["model"].attrs["sha256"] = "ab" * 32
        stem, table = os.path.join(directory, "fig"), os.path.join(directory, "fig.csv")
        cases = [
            ((path, link), f"{link}: the same file as {path}; give each run once"),
            ((path, "--pair", "kvarn:kvarn"), "--pair kvarn:kvarn: a quantizer against itself"),
            ((path, "--pair", "kvarn:kvarn-ts", "--pair", "kvarn:kvarn-ts"), "--pair kvarn:kvarn-ts: given twice"),
            ((path, "-o", table, "--figure", stem),
             f"{table}: both the table (-o) and the figure's CSV; choose another path"),
            ((path, "-o", os.path.join(directory, "no", "t.csv")), f"{directory}/no/t.csv: no directory {directory}/no"),
            ((one,), f"{one}: 1 finished sample in all; a paired bootstrap interval needs at least 2"),
            ((broken,), f"{broken}: samples/1/kvarn/teacher_forced/kl is nan at step 1: a broken run, not a "
                        "measurement"),
            ((path, other_model), f"pooled runs: {path} decodes tiny.bin (sha256 ?) but {other_model} decodes "
                                  "tiny.bin (sha256 abababababab); pool only runs of one model"),
        ]
        for args, message in cases:
            result = support.run_script("causal_effect.py", *args)
            self.assertEqual((result.returncode, result.stderr), (1, f"causal_effect.py: error: {message}\n"), args)
        self.assertEqual(sorted(os.listdir(directory)), ["broken.h5", "link.h5", "one.h5", "other-model.h5", "run.h5"])


class AgreesWithTheRunLogSummary(unittest.TestCase):
    def test_slope_and_mean_are_the_summary_ones(self):
        directory = support.scratch_dir("causal-real")
        model = subprocess.run([os.path.join(support.SOURCE_DIR, "scripts", "find-model.sh"), "stories260K"],
                               check=True, capture_output=True, text=True).stdout.strip()
        config = os.path.join(directory, "run.yaml")
        with open(config, "w") as f:
            f.write(f"""model: {{path: {model}/stories260K.bin, tokenizer: {model}/tok512.bin}}
prompts: {{source: inline, texts: ["Once upon a time", "The cat sat on the mat. It was a sunny day"]}}
decoding: {{max_new_tokens: 24, stop_at_eos: false}}
quantizers:
  - {{name: kivi, method: kivi, params: {{group_size: 8, residual_length: 8}}}}
  - {{name: kivi-ts, method: kivi, params: {{group_size: 8, residual_length: 8, wrap: true_scale}}}}
lanes: [teacher_forced]
output: {{path: {directory}/run.h5}}
""")
        subprocess.run([support.CLI, "run", config], check=True, capture_output=True)
        path = os.path.join(directory, "run.h5")
        sums = {q: causal_effect.sums_of(samples)
                for q, samples in causal_effect.read_kl([path], ["kivi", "kivi-ts"], 10.0)[0].items()}
        with h5py.File(path, "r") as f:
            for name in ("kivi", "kivi-ts"):
                summary = f[f"summary/{name}/teacher_forced"].attrs
                ones = np.ones(len(sums[name]))
                self.assertAlmostEqual(causal_effect.slope(sums[name], ones), summary["kl_slope"],
                                       delta=1e-9 * abs(summary["kl_slope"]) + 1e-15)
                self.assertAlmostEqual(causal_effect.mean(sums[name], ones), summary["kl_mean"],
                                       delta=1e-9 * abs(summary["kl_mean"]) + 1e-15)


if __name__ == "__main__":
    unittest.main()
