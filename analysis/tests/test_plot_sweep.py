"""plot_sweep.py on hand-made sweep summaries (the agreed summary.h5 format): means and error bars
over seeds per method, rows of points not done left out and counted, and bad input refused."""
import math
import os
import unittest

import h5py
import numpy as np

from analysis.tests import support
from analysis.tests.support import num, read_csv

NAN = float("nan")
BITS = "quantizers.0.params.k_bits"
SEED = "decoding.seed"


def write_summary(path, rows, grid_keys=(BITS, SEED), string_columns=(), version=1):
    """rows: dicts with point, status, quantizer, method, the grid keys and metric columns."""
    metrics = sorted({k for r in rows for k in r} - {"point", "status", "quantizer", "method", *grid_keys})
    columns = ["point", "status", "quantizer", "method", *grid_keys, *metrics]
    text = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.attrs["sweep_schema_version"] = np.int64(version)
        f.attrs["sweep_name"] = "bits-sweep"
        f.attrs["grid_keys"] = "\n".join(grid_keys)
        group = f.create_group("rows")
        group.attrs["columns"] = "\n".join(columns)
        for column in columns:
            values = [r.get(column, "" if column in ("quantizer", "method") else NAN) for r in rows]
            if column in ("point", "status", "quantizer", "method") or column in string_columns:
                group.create_dataset(column, data=[str(v) for v in values], dtype=text)
            else:
                group.create_dataset(column, data=np.array(values, dtype=np.float64))
    return path


def point(pid, bits, seed, status="done", **by_quantizer):
    """Rows of one point: one per quantizer (name -> (method, kl)), or one empty row when not done."""
    if status != "done":
        return [{"point": pid, "status": status, BITS: bits, SEED: seed}]
    return [{"point": pid, "status": status, "quantizer": name, "method": method, BITS: bits, SEED: seed,
             "teacher_forced.kl_mean": kl, "samples": 5.0} for name, (method, kl) in by_quantizer.items()]


ROWS = (point("p0", 2, 0, kivi=("kivi", 1.0), kvarn=("kvarn", 0.5))
        + point("p1", 2, 1, kivi=("kivi", 3.0), kvarn=("kvarn", 0.75))
        + point("p2", 4, 0, kivi=("kivi", 0.25), kvarn=("kvarn", 0.125))
        + point("p3", 4, 1, status="failed")
        + point("p4", 4, 2, status="pending"))


def by_series(rows):
    return {(r["series"], num(r["x"])): r for r in rows}


class PlotSweep(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = support.scratch_dir("plot_sweep")
        cls.summary = write_summary(os.path.join(cls.dir, "summary.h5"), ROWS)

    def test_mean_and_std_over_seeds_per_method(self):
        out = os.path.join(self.dir, "std")
        result = support.run_script("plot_sweep.py", self.summary, "-o", out)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr, "plot_sweep.py: skipped 2 row(s) of points not done (failed 1, pending 1)\n")
        stem = os.path.join(out, f"sweep_teacher_forced.kl_mean_vs_{BITS}")
        for ext in ("png", "pdf", "csv"):
            self.assertGreater(os.path.getsize(f"{stem}.{ext}"), 100)
        rows = by_series(read_csv(stem + ".csv"))
        self.assertEqual(sorted(rows), [("kivi", 2.0), ("kivi", 4.0), ("kvarn", 2.0), ("kvarn", 4.0)])
        kivi2 = rows["kivi", 2.0]
        self.assertEqual((kivi2["n"], num(kivi2["mean"])), ("2", 2.0))  # kl 1 and 3
        self.assertAlmostEqual(num(kivi2["low"]), 2.0 - math.sqrt(2.0), places=12)  # sample std of 1, 3
        self.assertAlmostEqual(num(kivi2["high"]), 2.0 + math.sqrt(2.0), places=12)
        kvarn2 = rows["kvarn", 2.0]
        self.assertAlmostEqual(num(kvarn2["high"]) - num(kvarn2["mean"]), math.sqrt(2 * 0.125 ** 2), places=12)
        kivi4 = rows["kivi", 4.0]
        self.assertEqual((kivi4["n"], num(kivi4["mean"]), num(kivi4["low"]), num(kivi4["high"])),
                         ("1", 0.25, 0.25, 0.25))

    def test_min_max_and_another_metric(self):
        out = os.path.join(self.dir, "minmax")
        result = support.run_script("plot_sweep.py", self.summary, "-o", out, "--errorbar", "minmax",
                                    "--metric", "samples", "--x", SEED, "--over", BITS)
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = by_series(read_csv(os.path.join(out, f"sweep_samples_vs_{SEED}.csv")))
        self.assertEqual([(k, r["n"], num(r["mean"])) for k, r in sorted(rows.items())],
                         [(("kivi", 0.0), "2", 5.0), (("kivi", 1.0), "1", 5.0),
                          (("kvarn", 0.0), "2", 5.0), (("kvarn", 1.0), "1", 5.0)])
        out = os.path.join(self.dir, "minmax_kl")
        result = support.run_script("plot_sweep.py", self.summary, "-o", out, "--errorbar", "minmax")
        table = os.path.join(out, f"sweep_teacher_forced.kl_mean_vs_{BITS}.csv")
        rows = by_series(read_csv(table))
        self.assertEqual((num(rows["kivi", 2.0]["low"]), num(rows["kivi", 2.0]["high"])), (1.0, 3.0))
        # the same plot again replaces the earlier one only when asked
        again = support.run_script("plot_sweep.py", self.summary, "-o", out)
        self.assertEqual((again.returncode, again.stderr.splitlines()[-1]),
                         (1, f"plot_sweep.py: error: {table} exists (an earlier plot?); pass --overwrite to "
                             "replace it"))
        self.assertEqual(by_series(read_csv(table)), rows)
        again = support.run_script("plot_sweep.py", self.summary, "-o", out, "--overwrite")
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertEqual(num(by_series(read_csv(table))["kivi", 2.0]["low"]), 2 - 2 ** 0.5)

    def test_two_quantizers_of_one_method_are_separate_lines(self):
        rows = (point("p0", 2, 0, **{"kvarn-a": ("kvarn", 1.0), "kvarn-b": ("kvarn", 2.0)})
                + point("p1", 2, 1, **{"kvarn-a": ("kvarn", 3.0), "kvarn-b": ("kvarn", 4.0)}))
        summary = write_summary(os.path.join(self.dir, "same_method.h5"), rows)
        out = os.path.join(self.dir, "same_method")
        result = support.run_script("plot_sweep.py", summary, "-o", out)
        self.assertEqual(result.returncode, 0, result.stderr)
        csv_rows = by_series(read_csv(os.path.join(out, f"sweep_teacher_forced.kl_mean_vs_{BITS}.csv")))
        self.assertEqual({k: num(r["mean"]) for k, r in csv_rows.items()},
                         {("kvarn-a", 2.0): 2.0, ("kvarn-b", 2.0): 3.0})

    def test_other_varying_grid_keys_split_the_lines(self):
        rows = [dict(r, **{"decoding.temperature": t}) for r, t in zip(
            point("p0", 2, 0, kivi=("kivi", 1.0)) + point("p1", 2, 0, kivi=("kivi", 5.0))
            + point("p2", 2, 1, kivi=("kivi", 3.0)), ("0", "0.7", "0"))]
        summary = write_summary(os.path.join(self.dir, "temperature.h5"), rows,
                                grid_keys=(BITS, SEED, "decoding.temperature"),
                                string_columns=("decoding.temperature",))
        out = os.path.join(self.dir, "temperature")
        result = support.run_script("plot_sweep.py", summary, "-o", out)
        self.assertEqual(result.returncode, 0, result.stderr)
        csv_rows = by_series(read_csv(os.path.join(out, f"sweep_teacher_forced.kl_mean_vs_{BITS}.csv")))
        self.assertEqual({k: (r["n"], num(r["mean"])) for k, r in csv_rows.items()},
                         {("kivi, decoding.temperature=0", 2.0): ("2", 2.0),
                          ("kivi, decoding.temperature=0.7", 2.0): ("1", 5.0)})

    def test_keys_that_vary_with_the_method_do_not_split_its_line(self):
        rows = [dict(r, **{"quantizers.1.method": r["method"]})
                for r in point("p0", 2, 0, kivi=("kivi", 1.0)) + point("p1", 2, 0, quarot=("quarot", 2.0))]
        summary = write_summary(os.path.join(self.dir, "zip.h5"), rows,
                                grid_keys=(BITS, SEED, "quantizers.1.method"),
                                string_columns=("quantizers.1.method",))
        out = os.path.join(self.dir, "zip")
        result = support.run_script("plot_sweep.py", summary, "-o", out)
        self.assertEqual(result.returncode, 0, result.stderr)
        csv_rows = by_series(read_csv(os.path.join(out, f"sweep_teacher_forced.kl_mean_vs_{BITS}.csv")))
        self.assertEqual(sorted(csv_rows), [("kivi", 2.0), ("quarot", 2.0)])


class PlotSweepErrors(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = support.scratch_dir("plot_sweep_errors")

    def assert_error(self, path, message, *extra):
        out = os.path.join(self.dir, "out")
        result = support.run_script("plot_sweep.py", path, "-o", out, *extra)
        self.assertEqual(result.returncode, 1)
        self.assertTrue(result.stderr.endswith(f"plot_sweep.py: error: {message}\n"), result.stderr)
        self.assertFalse(os.path.exists(out))

    def test_not_hdf5(self):
        path = os.path.join(self.dir, "summary.csv")
        with open(path, "w") as f:
            f.write("point,status\n")
        self.assert_error(path, f"{path}: not an HDF5 file")

    def test_a_run_log_is_not_a_sweep_summary(self):
        path = support.write_run(os.path.join(self.dir, "run.h5"), [("a", "rtn", {})], [])
        self.assert_error(path, f"{path}: not a kvdrift sweep summary (no sweep_schema_version attribute)")

    def test_unknown_version(self):
        path = write_summary(os.path.join(self.dir, "v2.h5"), ROWS, version=2)
        self.assert_error(path, f"{path}: sweep_schema_version 2 is not supported (this analysis reads version 1)")

    def test_unknown_metric(self):
        path = write_summary(os.path.join(self.dir, "ok.h5"), ROWS)
        self.assert_error(path, f"{path}: no column 'teacher_forced.kl_p50' for --metric (columns: point, status, "
                                f"quantizer, method, {BITS}, {SEED}, samples, teacher_forced.kl_mean)",
                          "--metric", "teacher_forced.kl_p50")

    def test_no_bits_key(self):
        path = write_summary(os.path.join(self.dir, "seeds.h5"), [dict(r) for r in ROWS], grid_keys=(SEED, BITS))
        with h5py.File(path, "r+") as f:
            f.attrs["grid_keys"] = SEED
        self.assert_error(path, f"{path}: no grid key ends in 'bits'; choose the x axis with --x (grid keys: {SEED})")

    def test_nothing_done(self):
        path = write_summary(os.path.join(self.dir, "none_done.h5"), point("p0", 2, 0, status="running"))
        self.assert_error(path, f"{path}: no done rows to plot")


if __name__ == "__main__":
    unittest.main()
