"""configs/demo.yaml run by the kvdrift CLI (32 new tokens), then plot_drift.py: every figure is
produced, the report's table carries the engine's own /summary of the same file, and the survival
figure's Kaplan-Meier curve has the engine's median."""
import math
import os
import subprocess
import unittest

import h5py

from analysis.tests import support
from analysis.tests.support import num, read_csv

FIGURES = ("drift_curves", "token_scale", "attention_heatmap", "survival")
# summary_table.csv columns by their /summary/<quantizer> subgroup ("" = the group itself)
SUMMARY_SOURCES = {
    "": ["first_step", "bits_per_element_mean", "attn_gap_mean", "attn_gap_slope"],
    "teacher_forced": ["kl_mean", "final_kl_mean", "kl_slope", "top1_disagreement_mean",
                       "key_quant_worst5_magnitude_share_mean"],
    "free_running": ["first_divergence_km_median", "first_divergence_at_risk", "first_divergence_censored",
                     "outcome_identical"],
}


class Demo(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = support.scratch_dir("demo")
        cls.run_path = os.path.join(cls.dir, "demo.h5")
        result = subprocess.run([support.CLI, "run", os.path.join(support.SOURCE_DIR, "configs", "demo.yaml"),
                                 "--set", "decoding.max_new_tokens=32", "--output", cls.run_path, "--overwrite"],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise AssertionError(f"kvdrift run failed ({support.CLI}): {result.stderr}")
        cls.out = os.path.join(cls.dir, "figures")

    def test_plot_drift_on_the_demo_run(self):
        result = support.run_script("plot_drift.py", self.run_path, "-o", self.out)
        self.assertEqual(result.returncode, 0, result.stderr)
        for figure in FIGURES:
            for ext in ("png", "pdf", "csv"):
                self.assertGreater(os.path.getsize(os.path.join(self.out, f"{figure}.{ext}")), 1000, figure)
        table = {r["quantizer"]: r for r in read_csv(os.path.join(self.out, "summary_table.csv"))}
        self.assertEqual(list(table), ["none", "kivi-2bit", "quarot-2bit", "kvarn-k2v2"])
        survival = read_csv(os.path.join(self.out, "survival.csv"))
        with h5py.File(self.run_path, "r") as f:
            self.assertEqual(int(f.attrs["complete"]), 1)
            for quantizer, row in table.items():
                summary = f[f"summary/{quantizer}"]
                # the table carries /summary/<q> as written, intervals included
                for group, names in SUMMARY_SOURCES.items():
                    attrs = summary[group].attrs if group else summary.attrs
                    for column in [c for name in names for c in (name, f"{name}_ci_low", f"{name}_ci_high")
                                   if c in row]:
                        with self.subTest(quantizer=quantizer, column=column):
                            engine, shown = float(attrs[column]), num(row[column])
                            self.assertTrue(shown == engine or (math.isnan(shown) and math.isnan(engine)),
                                            (row[column], engine))
                # the survival figure's Kaplan-Meier curve first reaches 0.5 at the engine's median
                curve = [(int(r["step"]), num(r["survival"])) for r in survival if r["quantizer"] == quantizer]
                median = min((step for step, value in curve if value <= 0.5), default=math.inf)
                self.assertEqual(median, float(summary["free_running"].attrs["first_divergence_km_median"]),
                                 quantizer)
        none = [r for r in survival if r["quantizer"] == "none"]
        self.assertEqual(len(none), 32)
        self.assertEqual({num(r["survival"]) for r in none}, {1.0})

    @unittest.skipUnless(os.environ.get("KVDRIFT_CLI"), "the kvdrift built with `plot` (set KVDRIFT_CLI)")
    def test_kvdrift_plot_subcommand(self):
        out = os.path.join(self.dir, "via_cli")
        result = subprocess.run([support.CLI, "plot", self.run_path, "-o", out, "--quantizer", "kvarn-k2v2"],
                                capture_output=True, text=True, timeout=120, env=dict(os.environ, MPLBACKEND="Agg"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual({r["quantizer"] for r in read_csv(os.path.join(out, "drift_curves.csv"))}, {"kvarn-k2v2"})
        bad = subprocess.run([support.CLI, "plot", self.run_path, "-o", out, "--quantizer", "nope"],
                             capture_output=True, text=True, timeout=120)
        self.assertEqual(bad.returncode, 1)
        self.assertIn("plot_drift.py: error: ", bad.stderr)
        self.assertIn("no quantizer 'nope' (available: none, kivi-2bit, quarot-2bit, kvarn-k2v2)", bad.stderr)


if __name__ == "__main__":
    unittest.main()
