"""plot_drift.py on hand-made run logs: every figure file is written, the CSV behind each figure
holds the numbers worked out by hand below from the fixture's values, and the report table carries
the run's /summary as written."""
import math
import os
import sys
import unittest

import h5py
import numpy as np

from analysis.tests import support
from analysis.tests.drift_fixture import FIGURES, QUANTIZERS, SUMMARY, fixture_samples, rows_of
from analysis.tests.support import num, read_csv

sys.path.insert(0, support.ANALYSIS_DIR)
import kvdrift_log  # noqa: E402
import plot_drift  # noqa: E402  (sets the Agg backend)
import matplotlib.pyplot as plt  # noqa: E402

# summary_table.csv's columns, in order
TABLE_COLUMNS = (
    "run quantizer method samples first_step bits_per_element_mean "
    "kl_mean kl_mean_ci_low kl_mean_ci_high final_kl_mean final_kl_mean_ci_low final_kl_mean_ci_high "
    "kl_slope kl_slope_ci_low kl_slope_ci_high "
    "top1_disagreement_mean top1_disagreement_mean_ci_low top1_disagreement_mean_ci_high "
    "first_divergence_km_median first_divergence_km_median_ci_low first_divergence_km_median_ci_high "
    "first_divergence_at_risk first_divergence_censored outcome_identical "
    "key_quant_worst5_magnitude_share_mean key_quant_worst5_magnitude_share_mean_ci_low "
    "key_quant_worst5_magnitude_share_mean_ci_high "
    "attn_gap_mean attn_gap_mean_ci_low attn_gap_mean_ci_high attn_gap_slope attn_gap_slope_ci_low "
    "attn_gap_slope_ci_high accuracy_free_running accuracy_free_running_ci_low accuracy_free_running_ci_high "
    "accuracy_reference accuracy_reference_ci_low accuracy_reference_ci_high").split()
SUMMARY_COLUMNS = TABLE_COLUMNS[4:-6]


class PlotDriftFixture(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = support.scratch_dir("plot_drift")
        cls.run_path = support.write_run(os.path.join(cls.dir, "run.h5"), QUANTIZERS, fixture_samples(),
                                         max_new_tokens=4, summary=SUMMARY)
        with h5py.File(cls.run_path, "r+") as f:  # scored as score.py would write it
            scores = f.create_group("scores")
            scores.attrs.update({"task": "math", "scored_utc": "2026-01-01T00:00:00Z"})
            scores.create_group("reference").attrs.update(
                {"correct": np.int64(2), "scored": np.int64(3), "accuracy": 2 / 3, "accuracy_ci_low": 1 / 3,
                 "accuracy_ci_high": 1.0})
            scores.create_group("alpha/free_running").attrs.update(
                {"correct": np.int64(1), "scored": np.int64(3), "accuracy": 1 / 3, "accuracy_ci_low": 0.0,
                 "accuracy_ci_high": 2 / 3})
        cls.out = os.path.join(cls.dir, "out")
        cls.result = support.run_script("plot_drift.py", cls.run_path, "-o", cls.out, "--window", "2")

    def csv(self, name):
        return read_csv(os.path.join(self.out, name))

    def test_every_figure_file_is_written_and_not_empty(self):
        self.assertEqual(self.result.returncode, 0, self.result.stderr)
        for figure in FIGURES:
            for ext in ("png", "pdf", "csv"):
                path = os.path.join(self.out, f"{figure}.{ext}")
                self.assertTrue(os.path.isfile(path), path)
                self.assertGreater(os.path.getsize(path), 100, path)
        with open(os.path.join(self.out, "drift_curves.png"), "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        with open(os.path.join(self.out, "drift_curves.pdf"), "rb") as f:
            self.assertEqual(f.read(5), b"%PDF-")

    def test_kl_curve_is_median_and_quartiles_over_finished_samples(self):
        rows = rows_of(self.csv("drift_curves.csv"), quantizer="alpha", metric="kl")
        self.assertEqual([int(r["step"]) for r in rows], [0, 1, 2, 3])
        # step 0: alpha KL of samples 0,1,2 = 0.5, 1, 0.25 -> median 0.5, quartiles 0.375 and 0.75
        self.assertEqual((num(rows[0]["center"]), num(rows[0]["low"]), num(rows[0]["high"])), (0.5, 0.375, 0.75))
        self.assertEqual(rows[0]["samples"], "3")
        # step 3: sample 1 has ended -> 4 and 2: median 3, quartiles 2.5 and 3.5 (the cut-short
        # sample's 1000 is not there)
        self.assertEqual((num(rows[3]["center"]), num(rows[3]["low"]), num(rows[3]["high"])), (3.0, 2.5, 3.5))
        self.assertEqual(rows[3]["samples"], "2")
        self.assertEqual(rows[3]["lane"], "teacher_forced")
        self.assertEqual(rows[3]["run"], self.run_path)

    def test_top1_disagreement_is_a_trailing_window_mean(self):
        rows = rows_of(self.csv("drift_curves.csv"), quantizer="alpha", metric="top1_disagreement")
        # disagreement (1 - agree): s0 0,1,0,1  s1 1,1,0  s2 0,0,0,0; window 2
        expected = [1 / 3, 3 / 6, 2 / 6, 1 / 5]
        for row, value in zip(rows, expected):
            self.assertAlmostEqual(num(row["center"]), value, places=12)
            self.assertTrue(math.isnan(num(row["low"])))
        self.assertEqual([r["samples"] for r in rows], ["3", "3", "3", "2"])
        beta = rows_of(self.csv("drift_curves.csv"), quantizer="beta", metric="top1_disagreement")
        self.assertEqual([num(r["center"]) for r in beta], [0.0, 0.0, 0.0, 0.0])

    def test_attention_curves_static_and_teacher_forced(self):
        rows = self.csv("drift_curves.csv")
        static = rows_of(rows, quantizer="alpha", lane="static", metric="attn_rel_l2")
        # layer means: s0 1, 1, 2; s1 2, 1; s2 0.5, 3, 1 at logged steps 1, 2, 3
        self.assertEqual([int(r["step"]) for r in static], [1, 2, 3])
        self.assertEqual((num(static[0]["center"]), num(static[0]["low"]), num(static[0]["high"])), (1.0, 0.75, 1.5))
        self.assertEqual((num(static[1]["center"]), num(static[1]["low"]), num(static[1]["high"])), (1.0, 1.0, 2.0))
        self.assertEqual((num(static[2]["center"]), num(static[2]["low"]), num(static[2]["high"])), (1.5, 1.25, 1.75))
        forced = rows_of(rows, quantizer="alpha", lane="teacher_forced", metric="attn_rel_l2")
        # layer means: s0 1, 2, 4; s1 2, 2; s2 2, 2, 2
        self.assertEqual([num(r["center"]) for r in forced], [2.0, 2.0, 3.0])
        beta = rows_of(rows, quantizer="beta", lane="static", metric="attn_rel_l2")
        self.assertEqual([num(r["center"]) for r in beta], [0.25, 0.25, 0.25])

    def test_heatmap_is_the_mean_over_samples_per_layer_and_step(self):
        rows = rows_of(self.csv("attention_heatmap.csv"), quantizer="alpha", lane="static")
        cell = {(int(r["step"]), int(r["layer"])): (num(r["attn_rel_l2_mean"]), int(r["samples"])) for r in rows}
        self.assertEqual(len(cell), 6)
        self.assertAlmostEqual(cell[1, 0][0], (0.5 + 1 + 0.5) / 3, places=12)
        self.assertAlmostEqual(cell[1, 1][0], (1.5 + 3 + 0.5) / 3, places=12)
        self.assertEqual(cell[2, 0], ((1 + 0 + 4) / 3, 3))
        self.assertEqual(cell[3, 0], (1.5, 2))
        self.assertEqual(cell[3, 1], (1.5, 2))
        forced = rows_of(self.csv("attention_heatmap.csv"), quantizer="alpha", lane="teacher_forced", step=3)
        self.assertEqual([num(r["attn_rel_l2_mean"]) for r in forced], [2.5, 3.5])

    def test_token_scale_parts_per_position_and_worst5_share(self):
        rows = rows_of(self.csv("token_scale.csv"), quantizer="alpha", tensor="key")
        self.assertEqual({(r["lane"], r["kind"]) for r in rows}, {("teacher_forced", "quant")})
        # E_M layer means: s0 2, 2, 2; s1 4, 1; s2 0, 1, 2. E_D: s0 1, 0, 2; s1 2, 1; s2 0, 0, 0
        self.assertEqual([(num(r["E_M"]), num(r["E_D"]), r["samples"]) for r in rows],
                         [(2.0, 1.0, "3"), (4 / 3, 1 / 3, "3"), (2.0, 1.0, "2")])
        value = rows_of(self.csv("token_scale.csv"), quantizer="alpha", tensor="value")
        self.assertEqual([num(r["E_M"]) for r in value], [1.0, 2 / 3, 1.0])
        shares = {(r["quantizer"], r["tensor"]): (num(r["worst5_magnitude_share"]), r["samples"])
                  for r in self.csv("token_scale_worst5.csv")}
        self.assertEqual(shares[("alpha", "key")], (0.5, "3"))  # mean of 0.5, 0.25, 0.75
        self.assertEqual(shares[("alpha", "value")], (0.125, "3"))

    def test_survival_is_kaplan_meier(self):
        rows = self.csv("survival.csv")
        alpha = rows_of(rows, quantizer="alpha")
        # s0 event at 2 (mismatch), s1 censored at 3 (identical), s2 event at 1 (length only):
        # step 1: 1 event of 3 at risk -> 2/3; step 2: 1 of 2 (s0, s1) -> 1/3; at step 3 s1 is censored
        for row, expected in zip(alpha, [1.0, 2 / 3, 1 / 3, 1 / 3]):
            self.assertAlmostEqual(num(row["survival"]), expected, places=15)
        self.assertEqual([(r["at_risk"], r["samples"]) for r in alpha],
                         [("3", "3"), ("3", "3"), ("2", "3"), ("0", "3")])
        beta = rows_of(rows, quantizer="beta")  # all censored (at 4, 3, 4): survival stays 1
        self.assertEqual([num(r["survival"]) for r in beta], [1.0, 1.0, 1.0, 1.0])
        self.assertEqual([r["at_risk"] for r in beta], ["3", "3", "3", "2"])

    def test_summary_table_is_the_runs_summary(self):
        with open(os.path.join(self.out, "summary_table.csv")) as f:
            self.assertEqual(f.readline().strip().split(","), TABLE_COLUMNS)
        table = {r["quantizer"]: r for r in self.csv("summary_table.csv")}
        alpha, beta = table["alpha"], table["beta"]
        self.assertEqual((alpha["run"], alpha["method"], alpha["samples"]), (self.run_path, "rtn", "3"))
        self.assertEqual([num(alpha[c]) for c in SUMMARY_COLUMNS],
                         [1, 3.0, 0.138, 0.112, 0.161, 4.5, 2.0, 8.0, 0.0125, 0.003, 0.025, 0.375, 0.125, 0.625,
                          2.0, 1.0, math.inf, 2, 1, 1, 0.5, 0.25, 0.75, 0.75, 0.5, 1.25, 0.125, -0.0625, 0.25])
        self.assertEqual([alpha[c] for c in ("first_step", "first_divergence_at_risk", "outcome_identical")],
                         ["1", "2", "1"])  # integers stay integers
        self.assertEqual([num(beta[c]) for c in SUMMARY_COLUMNS],
                         [1, 5.0, 0.0625, 0.05, 0.075, 0.25, 0.125, 0.5, -0.001, -0.002, 0.0005, 0.0, 0.0, 0.0,
                          math.inf, math.inf, math.inf, 0, 3, 0, 0.5, 0.375, 0.625, 0.25, 0.25, 0.25, 0.0, 0.0, 0.0])
        self.assertEqual([num(alpha[c]) for c in TABLE_COLUMNS[-6:]], [1 / 3, 0.0, 2 / 3, 2 / 3, 1 / 3, 1.0])
        self.assertTrue(all(math.isnan(num(beta[c])) for c in TABLE_COLUMNS[-6:-3]))  # beta not scored
        with open(os.path.join(self.out, "report.md")) as f:
            report = f.read()
        self.assertIn("model tiny.bin (llama2c) · data inline prompts · 3 samples · max 4 new tokens", report)
        self.assertIn("| alpha (rtn k_bits=2) | 3.000 | 0.138 [0.112, 0.161] | 4.5 [2, 8] | 0.0125 [0.003, 0.025] "
                      "| 0.375 [0.125, 0.625] | 2 [1, not reached] | 2 / 1 / 1 | 0.500 [0.250, 0.750] "
                      "| 0.75 [0.5, 1.25] | 0.125 [-0.0625, 0.25] | 0.333 [0.000, 0.667] (1/3) |", report)
        self.assertIn("| beta (kivi k_bits=4 group_size=8) | 5.000 | 0.0625 [0.05, 0.075] | 0.25 [0.125, 0.5] "
                      "| -0.001 [-0.002, 0.0005] | 0.000 [0.000, 0.000] | not reached | 0 / 3 / 0 "
                      "| 0.500 [0.375, 0.625] | 0.25 [0.25, 0.25] | 0 [0, 0] | – |", report)
        self.assertIn("  - summary (`/summary`): means over decode steps from step 1 on; intervals: 95% percentile "
                      "bootstrap over samples (1000 resamples, seed 7)", report)
        self.assertIn("as the ratio of sums ΣE_M / ΣE_T over the worst 5% of rows by E_T", report)
        # scores without an `interval` attribute were written by score.py's earlier bootstrap
        self.assertIn("  - task `math` (95% percentile bootstrap intervals), reference accuracy 0.667 [0.333, 1.000] "
                      "(2/3)", report)
        self.assertIn("1 sample(s) not finished yet are left out", report)
        for figure in FIGURES:
            self.assertIn(f"]({figure}.png)", report)

    def test_run_not_complete_has_no_summary_figures(self):
        # a /summary present but the root `complete` still 0 (cut short while finishing): not used
        path = support.write_run(os.path.join(self.dir, "partial.h5"), QUANTIZERS, fixture_samples(),
                                 max_new_tokens=4, summary=SUMMARY, complete=False)
        out = os.path.join(self.dir, "partial")
        result = support.run_script("plot_drift.py", path, "-o", out)
        self.assertEqual(result.returncode, 0, result.stderr)
        table = read_csv(os.path.join(out, "summary_table.csv"))
        self.assertEqual([(r["quantizer"], r["samples"]) for r in table], [("alpha", "3"), ("beta", "3")])
        self.assertEqual({r[c] for r in table for c in TABLE_COLUMNS[4:]}, {""})
        with open(os.path.join(out, "report.md")) as f:
            report = f.read()
        self.assertIn("| alpha (rtn k_bits=2) | – | – | – | – | – | – | – | – | – | – |\n", report)
        self.assertIn("  - run not finished: its summary columns stay empty (–) until kvdrift writes `/summary` "
                      "when the run finishes", report)
        self.assertIn("3 samples, run not complete", report)


class Pooled(unittest.TestCase):
    """--pool: the figures hold one series per quantizer over the samples of every run."""

    @classmethod
    def setUpClass(cls):
        cls.dir = support.scratch_dir("plot_drift_pool")
        # two runs of the fixture (3 finished samples each) and one whose alpha has other settings
        cls.runs = [support.write_run(os.path.join(cls.dir, f"{name}.h5"), QUANTIZERS, fixture_samples(),
                                      max_new_tokens=4, summary=SUMMARY) for name in ("a", "b")]
        cls.out = os.path.join(cls.dir, "out")
        cls.result = support.run_script("plot_drift.py", *cls.runs, "-o", cls.out, "--pool")

    def test_one_series_per_quantizer_over_both_runs(self):
        self.assertEqual(self.result.returncode, 0, self.result.stderr)
        rows = read_csv(os.path.join(self.out, "drift_curves.csv"))
        pooled_run = " + ".join(self.runs)
        self.assertEqual({r["run"] for r in rows}, {pooled_run})
        kl = rows_of(rows, quantizer="alpha", metric="kl")
        # step 0: 0.5, 1, 0.25 twice -> median 0.5; quartiles at positions 1.25 and 3.75 of the sorted
        # 0.25, 0.25, 0.5, 0.5, 1, 1: 0.3125 and 0.875
        self.assertEqual((num(kl[0]["center"]), num(kl[0]["low"]), num(kl[0]["high"]), kl[0]["samples"]),
                         (0.5, 0.3125, 0.875, "6"))
        survival = rows_of(read_csv(os.path.join(self.out, "survival.csv")), quantizer="alpha")
        # each run's Kaplan–Meier steps with twice the samples at risk: the same curve
        for row, expected in zip(survival, [1.0, 2 / 3, 1 / 3, 1 / 3]):
            self.assertAlmostEqual(num(row["survival"]), expected, places=15)
        self.assertEqual([r["at_risk"] for r in survival], ["6", "6", "4", "0"])
        heat = rows_of(read_csv(os.path.join(self.out, "attention_heatmap.csv")), quantizer="alpha",
                       lane="static", step=3, layer=0)
        self.assertEqual((num(heat[0]["attn_rel_l2_mean"]), heat[0]["samples"]), (1.5, "4"))
        shares = rows_of(read_csv(os.path.join(self.out, "token_scale_worst5.csv")), quantizer="alpha", tensor="key")
        self.assertEqual((num(shares[0]["worst5_magnitude_share"]), shares[0]["samples"]), (0.5, "6"))
        # the report's table stays per run: 2 runs x 2 quantizers
        table = read_csv(os.path.join(self.out, "summary_table.csv"))
        self.assertEqual([(r["run"], r["quantizer"], r["samples"]) for r in table],
                         [(run, q, "3") for run in self.runs for q in ("alpha", "beta")])
        with open(os.path.join(self.out, "report.md")) as f:
            self.assertIn("The figures pool each quantizer's samples over every run (`--pool`)", f.read())

    def test_a_name_with_other_settings_is_refused(self):
        other = [("alpha", "rtn", {"k_bits": 4}), QUANTIZERS[1]]
        path = support.write_run(os.path.join(self.dir, "c.h5"), other, fixture_samples(), max_new_tokens=4)
        out = os.path.join(self.dir, "refused")
        result = support.run_script("plot_drift.py", self.runs[0], path, "-o", out, "--pool")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, f"plot_drift.py: error: --pool: quantizer 'alpha' is alpha (rtn k_bits=2) in "
                                        f"{self.runs[0]} but alpha (rtn k_bits=4) in {path}; pool only runs of the "
                                        "same quantizers\n")
        self.assertFalse(os.path.exists(out))

    def test_series_are_labelled_with_their_sample_and_run_counts(self):
        only_alpha = support.write_run(os.path.join(self.dir, "alpha-only.h5"), QUANTIZERS[:1], fixture_samples(),
                                       max_new_tokens=4)
        _, series = kvdrift_log.read_runs([*self.runs, only_alpha], [], "teacher_forced", "quant")
        self.assertEqual([data.label for data in kvdrift_log.pool_series(series)],
                         ["alpha (rtn k_bits=2) · 9 samples of 3 runs",
                          "beta (kivi k_bits=4 group_size=8) · 6 samples of 2 runs"])

    def test_a_run_twice_or_another_model_is_refused(self):
        """Either would pool into a plausible figure: a run's samples counted twice, or two models' drift
        as one."""
        link = os.path.join(self.dir, "link.h5")
        if not os.path.exists(link):
            os.symlink(self.runs[0], link)
        other = support.write_run(os.path.join(self.dir, "other-model.h5"), QUANTIZERS, fixture_samples(),
                                  max_new_tokens=4)
        with h5py.File(other, "r+") as f:
            f["model"].attrs.update({"path": "/models/big.bin", "sha256": "cd" * 32})
        out = os.path.join(self.dir, "refused-twice")
        for runs, message in (((self.runs[0], link), f"{link}: the same file as {self.runs[0]}; give each run once"),
                              ((self.runs[0], other), f"--pool: {self.runs[0]} decodes tiny.bin (sha256 ?) but {other} "
                                                      "decodes big.bin (sha256 cdcdcdcdcdcd); pool only runs of one "
                                                      "model")):
            result = support.run_script("plot_drift.py", *runs, "-o", out, "--pool")
            self.assertEqual((result.returncode, result.stderr), (1, f"plot_drift.py: error: {message}\n"))
            self.assertFalse(os.path.exists(out))

    def test_another_dtype_or_prefill_is_refused(self):
        """Each would pool two protocols' drift into one curve: another compute dtype, a chunked prefill
        (which quantizes the prompt) against a full one, or chunks of another size."""
        chunked = {"prefill": "chunked", "prefill_chunk": np.int64(64)}
        runs = {name: support.write_run(os.path.join(self.dir, f"{name}.h5"), QUANTIZERS, fixture_samples(),
                                        max_new_tokens=4, root_attrs=attrs)
                for name, attrs in (("bf16", {"dtype": "bfloat16"}), ("chunked-64", chunked),
                                    ("chunked-128", dict(chunked, prefill_chunk=np.int64(128))))}
        out = os.path.join(self.dir, "refused-protocol")
        for first, second, message in (
                (self.runs[0], runs["bf16"], "computes in float32 but {second} in bfloat16; pool only runs of one "
                                             "dtype"),
                (self.runs[0], runs["chunked-64"], "has prefill full but {second} has prefill chunked (prefill_chunk "
                                                   "64); pool only runs of one prefill"),
                (runs["chunked-128"], runs["chunked-64"], "has prefill chunked (prefill_chunk 128) but {second} has "
                                                          "prefill chunked (prefill_chunk 64); pool only runs of one "
                                                          "prefill")):
            result = support.run_script("plot_drift.py", first, second, "-o", out, "--pool")
            self.assertEqual((result.returncode, result.stderr),
                             (1, f"plot_drift.py: error: --pool: {first} {message.format(second=second)}\n"))
            self.assertFalse(os.path.exists(out))


class KaplanMeier(unittest.TestCase):
    def test_curve_ties_and_censoring(self):
        # (first_divergence, outcome): events at 1, 2, 4; censored at 2 (tie with the event at 2),
        # 4 (identical; tie with the event at 4) and 6
        samples = [(2, "token_mismatch"), (2, "censored"), (4, "identical"), (1, "length_only"),
                   (4, "token_mismatch"), (6, "censored")]
        curve, at_risk = kvdrift_log.survival_curve(*zip(*samples), 7)
        # at risk at an event step d: time > d, plus the events at d; censored at d is not:
        # d=1: 5 + 1 = 6 -> 5/6; d=2: 3 (times 4, 4, 6) + 1 = 4 -> 5/6 * 3/4 = 5/8;
        # d=4: 1 (time 6) + 1 = 2 -> 5/8 * 1/2 = 5/16 (median: step 4, the first with S <= 1/2)
        self.assertEqual(at_risk.tolist(), [6, 6, 4, 3, 2, 1, 0])
        for value, expected in zip(curve, [1, 5 / 6, 5 / 8, 5 / 8, 5 / 16, 5 / 16, 5 / 16]):
            self.assertAlmostEqual(value, expected, places=15)

    def test_times_past_the_last_step_count_as_at_risk_throughout(self):
        # a time of 10^12 once sized the counts (8 TB); it counts as any time past the last step shown
        curve, at_risk = kvdrift_log.survival_curve([10 ** 12, 5, 1], ["token_mismatch", "censored", "length_only"],
                                                    3)
        self.assertEqual(at_risk.tolist(), [3, 3, 2])
        for value, expected in zip(curve, [1, 2 / 3, 2 / 3]):
            self.assertAlmostEqual(value, expected, places=15)

    def test_no_event_and_no_sample(self):
        curve, at_risk = kvdrift_log.survival_curve([3, 0], ["identical", "censored"], 4)
        self.assertEqual((curve.tolist(), at_risk.tolist()), ([1.0] * 4, [1, 1, 1, 0]))
        curve, at_risk = kvdrift_log.survival_curve([], [], 2)
        self.assertEqual((curve.tolist(), at_risk.tolist()), ([1.0, 1.0], [0, 0]))


class Layout(unittest.TestCase):
    def test_legend_and_caption_never_cover_the_panels(self):
        # The legend under the panels grows with the series: with 34 long labels (two runs of 17
        # quantizers) it once covered the axes. The figure must grow instead, leaving the panels'
        # height as it was.
        for series in (4, 34):
            fig, ax = plt.subplots(figsize=(10, 6.5))
            for i in range(series):
                ax.plot([0, 1], [i, i], label=f"run-{i % 2}: quantizer-{i} (kvarn k_bits=2 scale_dtype="
                                              f"float8_e4m3 tile_size=128 v_bits=2 wrap=true_direction)")
            ax.set_xlabel("decoding step [tokens]")
            plot_drift.finish_figure(fig, "model m · data d · 16 samples · max 512 new tokens " * 4)
            renderer = fig.canvas.get_renderer()
            panel = ax.get_tightbbox(renderer)  # with its tick labels and axis label
            legend = fig.legends[0].get_window_extent(renderer)
            caption = fig.texts[-1].get_window_extent(renderer)
            self.assertLessEqual(legend.y1, panel.y0, f"{series} series: the legend reaches into the panel")
            self.assertLessEqual(caption.y1, legend.y0, f"{series} series: the caption reaches into the legend")
            self.assertGreaterEqual(caption.y0, 0, f"{series} series: the caption is cut off")
            self.assertGreater(ax.get_window_extent(renderer).height, 4 * fig.dpi, f"{series} series")
            plt.close(fig)


if __name__ == "__main__":
    unittest.main()
