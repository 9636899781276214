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
        # Two samples (< 8): no percentile interval; each sample's own fraction removed and their range
        # instead. Per-sample slope differences -0.75 and -1.5 (kvarn-ts): of the 4 sign patterns two reach
        # |mean| 1.125, p = 0.5; the same for every row. Holm over the 4 rows: 1.
        for (wrapped, _), row in rows.items():
            removed = 0.75 if wrapped == "kvarn-ts" else 0.1
            for column in ("fraction_removed", "per_sample_min", "per_sample_max"):
                self.assertAlmostEqual(float(row[column]), removed, places=5, msg=(wrapped, column))
            self.assertEqual([round(float(v), 5) for v in row["per_sample_values"].split()], [removed] * 2)
            for column in ("fraction_removed_ci_low", "difference_ci_high", "base_ci_low", "wrapped_ci_high"):
                self.assertEqual(row[column], "", column)
            self.assertEqual((row["interval"], row["reported_as"], row["p_value"], row["test_samples"], row["p_holm"]),
                             ("per-sample", "fraction", "0.5", "2", "1.0"))
        self.assertAlmostEqual(float(rows["kvarn-ts", "kl_slope"]["difference"]), 0.3 - 1.2, places=6)
        self.assertIn("kvarn            kvarn-ts", result.stdout)
        self.assertIn("removed 75% (n=2 < 8: per-sample values [75%, 75%], range [75%, 75%]) · p = 0.5", result.stdout)
        self.assertIn("note: kl_slope_post_onset: not computed, the runs did not log onset_step", result.stdout)

    def test_eight_samples_get_bootstrap_intervals(self):
        directory = support.scratch_dir("causal-eight")
        path = os.path.join(directory, "run.h5")
        # sample i from step 1: i+1, 2(i+1), 3(i+1) (slope i+1); the wrappers scale every value, so every
        # resample removes the same fraction and the difference is -0.75 (kvarn-ts) times kvarn's value
        hand_run(path, [[9, i + 1, 2 * (i + 1), 3 * (i + 1)] for i in range(8)],
                 {"kvarn": 1.0, "kvarn-ts": 0.25, "kvarn-td": 0.9})
        out = os.path.join(directory, "effect.csv")
        result = support.run_script("causal_effect.py", path, "-o", out, "--claim", "kvarn:kvarn-ts:kl_slope")
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = {(r["wrapped"], r["statistic"]): r for r in support.read_csv(out)}
        row = rows["kvarn-ts", "kl_slope"]
        self.assertEqual((row["interval"], row["reported_as"], row["per_sample_values"]), ("bootstrap", "fraction", ""))
        for column in ("fraction_removed", "fraction_removed_ci_low", "fraction_removed_ci_high"):
            self.assertAlmostEqual(float(row[column]), 0.75, places=5)
        low, high = float(row["base_ci_low"]), float(row["base_ci_high"])
        self.assertTrue(1 < low < 4.5 < high < 8, (low, high))
        self.assertAlmostEqual(float(row["difference_ci_low"]), -0.75 * high, places=5)
        self.assertAlmostEqual(float(row["wrapped_ci_high"]), 0.25 * high, places=5)
        # every per-sample difference negative: 2 of the 2^8 sign patterns; only this claim is adjusted
        self.assertEqual(float(row["p_value"]), 2 / 256)
        self.assertEqual(float(row["p_holm"]), 2 / 256)
        self.assertEqual(rows["kvarn-td", "kl_slope"]["p_holm"], "")
        self.assertIn("claims (Holm's step-down adjustment over 1):\n  kvarn:kvarn-ts:kl_slope  p = 0.007812, "
                      "Holm-adjusted p = 0.007812", result.stdout)

    def test_a_base_interval_containing_0_gives_a_difference(self):
        directory = support.scratch_dir("causal-sign")
        path = os.path.join(directory, "run.h5")
        # per-sample slopes -1, 2, -3, 4, -5, 6, -7, 8 around a level of 30: kvarn's slope interval
        # contains 0, so its change is reported as a difference; its mean KL (about 30) as a fraction
        slopes = [(-1) ** (i + 1) * (i + 1) for i in range(8)]
        hand_run(path, [[9, 30, 30 + s, 30 + 2 * s] for s in slopes], {"kvarn": 1.0, "kvarn-ts": 0.25, "kvarn-td": 0.9})
        out = os.path.join(directory, "effect.csv")
        result = support.run_script("causal_effect.py", path, "-o", out, "--pair", "kvarn:kvarn-ts")
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = {r["statistic"]: r for r in support.read_csv(out)}
        self.assertLess(float(rows["kl_slope"]["base_ci_low"]), 0)
        self.assertGreater(float(rows["kl_slope"]["base_ci_high"]), 0)
        self.assertEqual((rows["kl_slope"]["reported_as"], rows["kl_mean"]["reported_as"]), ("difference", "fraction"))
        self.assertAlmostEqual(float(rows["kl_slope"]["difference"]), -0.75 * 0.5, places=6)
        self.assertIn("kl_slope                   0.5 [", result.stdout)
        self.assertIn("difference (wrapped − base) -0.375 [", result.stdout)

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
        # the max-t band: steps 0 and 3 have no spread (zero width); steps 1 and 2 resample the same two
        # samples alike, so their studentized deviations agree and each band runs between the two samples
        for column in ("simultaneous_low", "simultaneous_high"):
            self.assertEqual([curve("base", column)[i] for i in (0, 3)], [9.0, 2.5])
        for step, (low, high) in ((1, (5.0, 7.0)), (2, (1.5, 6.0))):
            self.assertAlmostEqual(curve("base", "simultaneous_low")[step], low, places=9)
            self.assertAlmostEqual(curve("base", "simultaneous_high")[step], high, places=9)
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
        number (a run counted twice, unpaired samples, a one-sample 'interval', two dtypes or prefills pooled,
        a sample counted without a step) or fail half-way."""
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
        other_dtype, chunked = os.path.join(directory, "other-dtype.h5"), os.path.join(directory, "chunked.h5")
        for other, attrs in ((other_dtype, {"dtype": "bfloat16"}), (chunked, {"prefill": "chunked",
                                                                              "prefill_chunk": np.int64(128)})):
            hand_run(other, [[0, 1, 2], [0, 2, 3]], factors)
            with h5py.File(other, "r+") as f:
                f.attrs.update(attrs)
        empty = os.path.join(directory, "empty.h5")
        hand_run(empty, [[0, 1, 2], []], factors)
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
            ((path, other_dtype), f"pooled runs: {path} computes in float32 but {other_dtype} in bfloat16; pool only "
                                  "runs of one dtype"),
            ((path, chunked), f"pooled runs: {path} has prefill full but {chunked} has prefill chunked (prefill_chunk "
                              "128); pool only runs of one prefill"),
            ((empty,), f"{empty}: /samples/1/kvarn/teacher_forced/kl has shape (0,), not one value per step (a "
                       "finished sample has at least one step: a damaged file)"),
        ]
        for args, message in cases:
            result = support.run_script("causal_effect.py", *args)
            self.assertEqual((result.returncode, result.stderr), (1, f"causal_effect.py: error: {message}\n"), args)
        self.assertEqual(sorted(os.listdir(directory)), ["broken.h5", "chunked.h5", "empty.h5", "link.h5", "one.h5",
                                                         "other-dtype.h5", "other-model.h5", "run.h5"])


# Equal-error wrappers of one method; per sample, steps 0..5: (x-ees teacher-forced KL, x-ees one_step KL,
# x-eed KL in both lanes, onset_step of x-ees, of x-eed). The teacher-forced attention error is 3 (x-ees)
# and 1 (x-eed) times the static one, which is 1 at logged steps 1 and 2.
EQUAL_ERROR = [("x-ees", "kvarn", {"wrap": "equal_error_scale"}), ("x-eed", "kvarn", {"wrap": "equal_error_direction"})]
ACCUMULATION = [([0, 1, 2, 3, 4, 5], [0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], 1, 2),
                ([0, 2, 4, 6, 8, 10], [0, 2, 2, 2, 2, 2], [0, 2, 2, 2, 2, 2], 2, 1),
                ([0, 2, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], 1, -1)]


def accumulation_run(path, **write_args):
    samples = []
    for index, (ees, ees_one_step, eed, ees_onset, eed_onset) in enumerate(ACCUMULATION):
        static = {"attn_rel_l2": np.ones((2, 2))}
        lanes = {}
        for name, tf, one_step, onset, tf_attn in (("x-ees", ees, ees_one_step, ees_onset, [[2, 2], [4, 4]]),
                                                    ("x-eed", eed, eed, eed_onset, np.ones((2, 2)))):
            lanes[name, "teacher_forced"] = {"attrs": {"onset_step": float(onset)},
                                             "data": {"kl": tf, "attn_rel_l2": tf_attn}}
            lanes[name, "one_step"] = {"attrs": {"onset_step": float(onset)}, "data": {"kl": one_step}}
            lanes[name, "static"] = {"attrs": {"onset_step": float(onset)}, "data": static}
        samples.append({"index": index, "reference_tokens": np.arange(6), "logged_steps": [1, 2], "lanes": lanes})
    return support.write_run(path, EQUAL_ERROR, samples, **write_args)


class Accumulation(unittest.TestCase):
    """Post-onset slopes, amplification over the one_step and static lanes, and Holm's adjustment."""

    @classmethod
    def setUpClass(cls):
        cls.dir = support.scratch_dir("causal-accumulation")
        cls.path = accumulation_run(os.path.join(cls.dir, "run.h5"))
        cls.out = os.path.join(cls.dir, "effect.csv")
        cls.result = support.run_script(
            "causal_effect.py", cls.path, "-o", cls.out, "--onset-margin", "1", "--min-post-onset-steps", "2",
            "--claim", "x-ees:x-eed:kl_amplification_one_step", "--claim", "x-ees:x-eed:attn_amplification_static")
        cls.rows = {r["statistic"]: r for r in support.read_csv(cls.out)} if cls.result.returncode == 0 else {}

    def check(self, statistic, **expected):
        row = self.rows[statistic]
        for column, value in expected.items():
            if isinstance(value, str):
                self.assertEqual(row[column], value, (statistic, column))
            else:
                self.assertAlmostEqual(float(row[column]), value, places=6, msg=(statistic, column))

    def test_default_pair_is_equal_error_scale_against_direction(self):
        self.assertEqual(self.result.returncode, 0, self.result.stderr)
        self.assertEqual({(r["base"], r["wrapped"]) for r in self.rows.values()}, {("x-ees", "x-eed")})
        self.assertEqual(list(self.rows), ["kl_slope", "kl_mean", "kl_slope_post_onset", "kl_amplification_one_step",
                                           "attn_amplification_static"])

    def test_post_onset_slope_from_the_later_onset(self):
        # later onsets 2, 2 and never (sample 2): steps 3..5, three each (>= 2): x-ees 3, 4, 5 and 6, 8, 10
        # (slopes 1 and 2, pooled 1.5), x-eed flat; per-sample differences -1, -2: p = 2/4
        self.check("kl_slope_post_onset", samples=2, base_value=1.5, wrapped_value=0.0, difference=-1.5,
                   fraction_removed=1.0, reported_as="fraction", per_sample_values="1.0 1.0", p_value=0.5)
        self.assertIn("post-onset slopes: steps from onset + 1 on, samples with at least 2 such steps", self.result.stdout)

    def test_whole_run_slope_is_a_difference_when_a_sample_has_none(self):
        # from step 1: x-ees slopes 1, 2, 0 (pooled 30 / 30), x-eed 0; the per-sample range [0, 2] of the
        # base holds 0, so the change is a difference: -1, -2, 0 (p: 4 of 8 patterns)
        self.check("kl_slope", samples=3, base_value=1.0, wrapped_value=0.0, reported_as="difference",
                   per_sample_values="-1.0 -2.0 0.0", per_sample_min=-2.0, p_value=0.5)
        # means 3, 6, 2 against 1, 2, 1: pooled 55/15 and 20/15, removed 1 - 20/55
        self.check("kl_mean", base_value=55 / 15, wrapped_value=20 / 15, fraction_removed=1 - 20 / 55,
                   reported_as="fraction", p_value=0.25)

    def test_amplification_over_one_step_and_static(self):
        # teacher-forced / one_step mean KL: x-ees 55/20 pooled (3, 3, 2 per sample), x-eed 1: differences
        # -2, -2, -1 (all one sign: 2 of 8 patterns)
        self.check("kl_amplification_one_step", base_value=2.75, wrapped_value=1.0, difference=-1.75,
                   reported_as="difference", per_sample_values="-2.0 -2.0 -1.0", p_value=0.25)
        # teacher-forced / static attention error: 3 against 1 in every sample
        self.check("attn_amplification_static", base_value=3.0, wrapped_value=1.0, difference=-2.0,
                   reported_as="difference", p_value=0.25)

    def test_holm_over_the_claims(self):
        # two claims at p = 0.25: 0.25 x 2 = 0.5 for both; rows not claimed are not adjusted
        self.check("kl_amplification_one_step", p_holm=0.5)
        self.check("attn_amplification_static", p_holm=0.5)
        self.check("kl_mean", p_holm="")
        self.assertIn("x-ees:x-eed:attn_amplification_static  p = 0.25, Holm-adjusted p = 0.5", self.result.stdout)
        self.assertIn("claims (Holm's step-down adjustment over 2):", self.result.stdout)
        refused = support.run_script("causal_effect.py", self.path, "--claim", "x-ees:x-eed:kl_slopes")
        self.assertEqual((refused.returncode, refused.stderr),
                         (1, "causal_effect.py: error: --claim x-ees:x-eed:kl_slopes: no such row (rows: "
                             "x-ees:x-eed:kl_slope, x-ees:x-eed:kl_mean, x-ees:x-eed:kl_amplification_one_step, "
                             "x-ees:x-eed:attn_amplification_static)\n"))

    def test_onset_settings_from_the_run(self):
        # no option: /summary's attributes, else the config's analysis section, else 16 and 64
        extra = "analysis:\n  onset_margin: 4\n  min_post_onset_steps: 8\n"
        summary = {name: {"": {"onset_margin": 1, "min_post_onset_steps": 2, "first_step": 1}}
                   for name, _, _ in EQUAL_ERROR}
        cases = [({}, {"onset_margin": 16, "min_post_onset_steps": 64}),
                 ({"config_extra": extra}, {"onset_margin": 4, "min_post_onset_steps": 8}),
                 ({"config_extra": extra, "summary": summary}, {"onset_margin": 1, "min_post_onset_steps": 2})]
        for i, (write_args, expected) in enumerate(cases):
            path = accumulation_run(os.path.join(self.dir, f"settings-{i}.h5"), **write_args)
            self.assertEqual(causal_effect.log.load_run_info(path).onset_settings(), expected)
        result = support.run_script("causal_effect.py", path)  # the summary's 1 and 2: as with the options
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("x-ees            x-eed              kl_slope_post_onset        1.5 · 0 · removed 100%", result.stdout)
        default = support.run_script("causal_effect.py", os.path.join(self.dir, "settings-0.h5"))
        self.assertIn("note: kl_slope_post_onset: not computed, 0 of 3 samples have at least 64 steps from onset + 16 "
                      "on (a paired interval needs 2)", default.stdout)
        mixed = support.run_script("causal_effect.py", os.path.join(self.dir, "settings-0.h5"), path)
        self.assertEqual(mixed.stderr, f"causal_effect.py: error: pooled runs: onset_margin is 16 in "
                                       f"{self.dir}/settings-0.h5 but 1 in {path}; pass --onset-margin\n")
        bad = support.run_script("causal_effect.py", path, "--min-post-onset-steps", "1")
        self.assertIn("--min-post-onset-steps must be at least 2, got 1", bad.stderr)


class FirstStep(unittest.TestCase):
    def test_read_from_the_summary(self):
        # /summary's first_step decides; the prefill rule only where a run has no summary yet
        dir = support.scratch_dir("causal-first-step")
        summary = {n: {"": {"first_step": 0}} for n, _, _ in EQUAL_ERROR}
        cases = [({}, 1), ({"complete": False}, 1), ({"complete": False, "root_attrs": {"prefill": "chunked"}}, 0),
                 ({"summary": summary}, 0),
                 ({"summary": {"x-ees": {"": {"first_step": 0}}, "x-eed": {"": {"first_step": 1}}}}, None)]
        for i, (write_args, expected) in enumerate(cases):
            path = accumulation_run(os.path.join(dir, f"run-{i}.h5"), **write_args)
            seen = []
            visit = lambda info, path, index, sample, first_step, logged: seen.append(first_step)
            if expected is None:
                with self.assertRaisesRegex(causal_effect.log.LogError, r"records first_step \[0, 1\]"):
                    causal_effect.log.visit_finished_samples([path], ["x-ees"], visit)
                continue
            causal_effect.log.visit_finished_samples([path], ["x-ees"], visit)
            self.assertEqual(seen, [expected] * len(ACCUMULATION), write_args)


class PostOnsetSlope(unittest.TestCase):
    def test_by_hand(self):
        kl = [[0, 0, 0, 1, 2, 3, 4], [0, 0, 5, 5, 7, 9], [0, 1, 2, 3], [1, 2, 3]]
        onsets = [2, 1, -1, 0]
        # margin 1: sample 0 from step 3 (1, 2, 3, 4: centred sums xy 5, xx 5), sample 1 from step 2
        # (5, 5, 7, 9: xy 7, xx 5), sample 2 never read a quantized position, sample 3 has 2 steps (< 3)
        self.assertEqual(causal_effect.post_onset_slope(kl, onsets, 1, 3), (12 / 10, 2))
        # with 2 steps enough sample 3 enters (2, 3 at steps 1, 2: xy 0.5, xx 0.5)
        slope, count = causal_effect.post_onset_slope(kl, onsets, 1, 2)
        self.assertEqual(count, 3)
        self.assertAlmostEqual(slope, 12.5 / 10.5, places=12)
        # onsets 1 and no margin: the whole-run within-sample slope from step 1
        samples = [causal_effect.Sample(np.asarray(k, dtype=float), 1, 1, None, {}) for k in kl]
        whole = causal_effect.slope(causal_effect.sums_of(samples), np.ones(4))
        self.assertAlmostEqual(causal_effect.post_onset_slope(kl, [1] * 4, 0, 2)[0], whole, places=12)


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
lanes: [teacher_forced, one_step]
analysis: {{onset_margin: 2, min_post_onset_steps: 4}}
output: {{path: {directory}/run.h5}}
""")
        subprocess.run([support.CLI, "run", config], check=True, capture_output=True)
        path = os.path.join(directory, "run.h5")
        samples = causal_effect.read_kl([path], ["kivi", "kivi-ts"], 10.0)[0]
        with h5py.File(path, "r") as f:
            for name in ("kivi", "kivi-ts"):
                sums = causal_effect.sums_of(samples[name])
                summary = f[f"summary/{name}/teacher_forced"].attrs
                ones = np.ones(len(sums))
                for value, attribute in ((causal_effect.slope(sums, ones), "kl_slope"),
                                         (causal_effect.mean(sums, ones), "kl_mean")):
                    self.assertAlmostEqual(value, summary[attribute], delta=1e-9 * abs(summary[attribute]) + 1e-15)
                # the post-onset slope and the amplification over one_step: the summary's too
                kl, onsets = [s.kl for s in samples[name]], [s.onset for s in samples[name]]
                slope, count = causal_effect.post_onset_slope(kl, onsets, 2, 4)
                self.assertEqual(count, summary["post_onset_samples"])
                self.assertGreater(count, 0)
                self.assertAlmostEqual(slope, summary["post_onset_kl_slope"],
                                       delta=1e-9 * abs(summary["post_onset_kl_slope"]) + 1e-15)
                one_step = np.array([causal_effect.sample_sums(s.one_step, s.first_step) for s in samples[name]])
                ratio = causal_effect.ratio_of_means(sums, one_step)(ones)
                expected = f[f"summary/{name}"].attrs["tf_over_one_step_kl_ratio"]
                self.assertAlmostEqual(ratio, expected, delta=1e-9 * abs(expected))


if __name__ == "__main__":
    unittest.main()
