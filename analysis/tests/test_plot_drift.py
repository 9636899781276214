"""plot_drift.py on hand-made run logs: every figure file is written, and the CSV behind each figure
holds the numbers worked out by hand below from the fixture's values."""
import math
import os
import unittest

import h5py
import numpy as np

from analysis.tests import support
from analysis.tests.drift_fixture import FIGURES, QUANTIZERS, fixture_samples, rows_of
from analysis.tests.support import num, read_csv


class PlotDriftFixture(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = support.scratch_dir("plot_drift")
        cls.run_path = support.write_run(os.path.join(cls.dir, "run.h5"), QUANTIZERS, fixture_samples(),
                                         max_new_tokens=4)
        with h5py.File(cls.run_path, "r+") as f:  # scored as score.py would write it
            scores = f.create_group("scores")
            scores.attrs.update({"task": "math", "scored_utc": "2026-01-01T00:00:00Z"})
            scores.create_group("reference").attrs.update(
                {"correct": np.int64(2), "scored": np.int64(3), "accuracy": 2 / 3})
            scores.create_group("alpha/free_running").attrs.update(
                {"correct": np.int64(1), "scored": np.int64(3), "accuracy": 1 / 3})
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

    def test_survival_counts_identical_and_censored_samples_as_surviving(self):
        rows = self.csv("survival.csv")
        alpha = [num(r["identical_fraction"]) for r in rows_of(rows, quantizer="alpha")]
        # diverge at: s0 step 2 (mismatch), s1 never (identical), s2 step 1 (length only)
        self.assertEqual(alpha, [1.0, 2 / 3, 1 / 3, 1 / 3])
        beta = [num(r["identical_fraction"]) for r in rows_of(rows, quantizer="beta")]
        self.assertEqual(beta, [1.0, 1.0, 1.0, 1.0])

    def test_report_table_and_scores(self):
        table = {r["quantizer"]: r for r in self.csv("summary_table.csv")}
        alpha = table["alpha"]
        pooled = [0.5, 1, 2, 4, 1, 2, 8, 0.25, 4, 4, 2]
        self.assertEqual(alpha["samples"], "3")
        self.assertAlmostEqual(num(alpha["kl_mean"]), 28.75 / 11, places=12)
        self.assertEqual(num(alpha["kl_median"]), 2.0)
        self.assertEqual(sum(pooled), 28.75)
        self.assertAlmostEqual(num(alpha["final_kl_mean"]), (4 + 8 + 2) / 3, places=12)
        self.assertEqual(num(alpha["first_divergence_median"]), 2.0)
        self.assertEqual(num(alpha["bits_per_element_mean"]), 3.0)
        self.assertAlmostEqual(num(alpha["accuracy_free_running"]), 1 / 3, places=12)
        self.assertAlmostEqual(num(alpha["accuracy_reference"]), 2 / 3, places=12)
        self.assertEqual(num(table["beta"]["bits_per_element_mean"]), 5.0)
        self.assertTrue(math.isnan(num(table["beta"]["accuracy_free_running"])))
        with open(os.path.join(self.out, "report.md")) as f:
            report = f.read()
        self.assertIn("model tiny.bin (llama2c) · data inline prompts · 3 samples · max 4 new tokens", report)
        self.assertIn("| alpha (rtn k_bits=2) | 3.000 | 2.61 | 2 | 4.67 | 2.0 | 0.333 (1/3) |", report)
        self.assertIn("reference accuracy 0.667 (2/3)", report)
        self.assertIn("1 sample(s) not finished yet are left out", report)
        for figure in FIGURES:
            self.assertIn(f"]({figure}.png)", report)


if __name__ == "__main__":
    unittest.main()
