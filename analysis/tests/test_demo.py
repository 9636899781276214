"""configs/demo.yaml run by the kvdrift CLI (32 new tokens), then plot_drift.py: every figure is
produced, and the report's numbers agree with the engine's own /summary of the same file."""
import math
import os
import subprocess
import unittest

import h5py

from analysis.tests import support
from analysis.tests.support import num, read_csv

FIGURES = ("drift_curves", "token_scale", "attention_heatmap", "survival")


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
        with h5py.File(self.run_path, "r") as f:
            for quantizer, row in table.items():
                summary = f[f"summary/{quantizer}"]
                pairs = [("samples", summary.attrs["samples"]),
                         ("bits_per_element_mean", summary.attrs["bits_per_element_mean"]),
                         ("kl_mean", summary["teacher_forced"].attrs["kl_mean"]),
                         ("kl_median", summary["teacher_forced"].attrs["kl_median"]),
                         ("final_kl_mean", summary["teacher_forced"].attrs["final_kl_mean"]),
                         ("first_divergence_median", summary["free_running"].attrs["first_divergence_median"])]
                for column, engine in pairs:
                    with self.subTest(quantizer=quantizer, column=column):
                        self.assertTrue(math.isclose(num(row[column]), float(engine), rel_tol=1e-9, abs_tol=1e-15),
                                        (row[column], engine))
        survival = [r for r in read_csv(os.path.join(self.out, "survival.csv")) if r["quantizer"] == "none"]
        self.assertEqual(len(survival), 32)
        self.assertEqual({num(r["identical_fraction"]) for r in survival}, {1.0})

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
