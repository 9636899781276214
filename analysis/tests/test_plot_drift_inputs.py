"""plot_drift.py options (quantizer selection, token-scale lane and kind, several runs, runs that
lack lanes), its errors for bad input, and SIGTERM while it draws."""
import glob
import os
import re
import resource
import signal
import subprocess
import sys
import time
import unittest

import h5py
import numpy as np

from analysis.tests import support
from analysis.tests.drift_fixture import QUANTIZERS, fixture_samples, rows_of
from analysis.tests.support import num, read_csv


class PlotDriftOptions(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = support.scratch_dir("plot_drift_options")
        cls.run_path = support.write_run(os.path.join(cls.dir, "run.h5"), QUANTIZERS, fixture_samples())

    def test_quantizer_selection_and_token_scale_kind(self):
        out = os.path.join(self.dir, "only_alpha")
        result = support.run_script("plot_drift.py", self.run_path, "-o", out, "--quantizer", "alpha",
                                    "--token-scale-kind", "drift")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual({r["quantizer"] for r in read_csv(os.path.join(out, "drift_curves.csv"))}, {"alpha"})
        self.assertEqual([r["quantizer"] for r in read_csv(os.path.join(out, "summary_table.csv"))], ["alpha"])
        rows = rows_of(read_csv(os.path.join(out, "token_scale.csv")), tensor="key")
        self.assertEqual({(r["quantizer"], r["lane"], r["kind"]) for r in rows},
                         {("alpha", "teacher_forced", "drift")})
        # drift arrays hold twice the quantization error: E_M at position 0 is 2 x 2
        self.assertEqual([num(r["E_M"]) for r in rows], [4.0, 8 / 3, 4.0])

    def test_two_runs_are_separate_series(self):
        second = support.write_run(os.path.join(self.dir, "other.h5"), QUANTIZERS[:1], fixture_samples()[:1])
        out = os.path.join(self.dir, "two")
        result = support.run_script("plot_drift.py", self.run_path, second, "-o", out)
        self.assertEqual(result.returncode, 0, result.stderr)
        table = read_csv(os.path.join(out, "summary_table.csv"))
        self.assertEqual([(r["run"], r["quantizer"], r["samples"]) for r in table],
                         [(self.run_path, "alpha", "3"), (self.run_path, "beta", "3"), (second, "alpha", "1")])
        with open(os.path.join(out, "report.md")) as f:
            report = f.read()
        self.assertIn("| run: alpha (rtn k_bits=2) |", report)
        self.assertIn("| other: alpha (rtn k_bits=2) |", report)

    def test_run_without_per_step_lanes_draws_what_it_has(self):
        samples = fixture_samples()[:3]
        for sample in samples:
            sample["lanes"] = {k: v for k, v in sample["lanes"].items() if k[1] == "free_running"}
        run = support.write_run(os.path.join(self.dir, "free_only.h5"), QUANTIZERS, samples)
        out = os.path.join(self.dir, "free_only")
        result = support.run_script("plot_drift.py", run, "-o", out)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(os.path.isfile(os.path.join(out, "survival.png")))
        for figure in ("drift_curves", "token_scale", "attention_heatmap"):
            self.assertFalse(os.path.exists(os.path.join(out, f"{figure}.png")), figure)
        with open(os.path.join(out, "report.md")) as f:
            report = f.read()
        self.assertIn("- `attention_heatmap` not drawn: no attention-output errors (metrics.attention_error) "
                      "in the selected runs", report)

    def test_an_earlier_plot_is_replaced_only_when_asked(self):
        out = os.path.join(self.dir, "again")
        os.makedirs(out)
        with open(os.path.join(out, "notes.txt"), "w") as f:
            f.write("mine\n")
        self.assertEqual(support.run_script("plot_drift.py", self.run_path, "-o", out).returncode, 0)
        with open(os.path.join(out, "report.md"), "rb") as f:
            report = f.read()
        # a second plot into the same directory is refused, and changes nothing
        refused = support.run_script("plot_drift.py", self.run_path, "-o", out, "--quantizer", "alpha")
        self.assertEqual((refused.returncode, refused.stderr),
                         (1, f"plot_drift.py: error: {out}/report.md exists (an earlier plot?); pass --overwrite to "
                             f"replace the plot's files in {out}\n"))
        with open(os.path.join(out, "report.md"), "rb") as f:
            self.assertEqual(f.read(), report)
        # with --overwrite a run of free-running lanes only replaces the plot: no figure of the earlier one
        # is left beside its report, and files that are not the plot's stay
        samples = fixture_samples()[:3]
        for sample in samples:
            sample["lanes"] = {k: v for k, v in sample["lanes"].items() if k[1] == "free_running"}
        free_only = support.write_run(os.path.join(self.dir, "free_only_again.h5"), QUANTIZERS, samples)
        result = support.run_script("plot_drift.py", free_only, "-o", out, "--overwrite")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(sorted(os.listdir(out)), ["notes.txt", "report.md", "summary_table.csv", "survival.csv",
                                                   "survival.pdf", "survival.png"])
        # a directory where the plot writes a file is refused before anything is replaced
        os.makedirs(os.path.join(out, "drift_curves.png"))
        blocked = support.run_script("plot_drift.py", self.run_path, "-o", out, "--overwrite")
        self.assertEqual((blocked.returncode, blocked.stderr),
                         (1, f"plot_drift.py: error: {out}/drift_curves.png is a directory, where the plot writes "
                             "a file\n"))
        self.assertEqual(len(os.listdir(out)), 7)


class PlotDriftErrors(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = support.scratch_dir("plot_drift_errors")

    def assert_error(self, args, message, returncode=1, **run_args):
        out = os.path.join(self.dir, "out")
        result = support.run_script("plot_drift.py", *args, "-o", out, **run_args)
        self.assertEqual(result.returncode, returncode)
        self.assertEqual(result.stderr, f"plot_drift.py: error: {message}\n")
        self.assertFalse(os.path.exists(out), "nothing is written for bad input")

    def test_output_that_is_a_file(self):
        path = support.write_run(os.path.join(self.dir, "ok.h5"), QUANTIZERS, fixture_samples()[:1])
        target = os.path.join(self.dir, "a-file")
        with open(target, "w") as f:
            f.write("kept\n")
        result = support.run_script("plot_drift.py", path, "-o", target)
        self.assertEqual((result.returncode, result.stderr), (1, f"plot_drift.py: error: {target}: not a directory\n"))
        with open(target) as f:
            self.assertEqual(f.read(), "kept\n")

    def test_not_hdf5(self):
        path = os.path.join(self.dir, "notes.h5")
        with open(path, "w") as f:
            f.write("not hdf5\n")
        self.assert_error([path], f"{path}: not an HDF5 file")

    def test_missing_file(self):
        path = os.path.join(self.dir, "absent.h5")
        self.assert_error([path], f"{path}: no such file")

    def test_hdf5_that_is_not_a_run_log(self):
        path = os.path.join(self.dir, "other.h5")
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=[1, 2])
        self.assert_error([path], f"{path}: not a kvdrift run log (no schema_version attribute)")

    def test_unknown_schema_version(self):
        path = support.write_run(os.path.join(self.dir, "v2.h5"), QUANTIZERS, fixture_samples()[:1],
                                 schema_version=2)
        self.assert_error([path], f"{path}: schema_version 2 is not supported (this analysis reads version 1)")

    def test_log_without_or_with_another_metric_table(self):
        """The axes the analysis reads by come from the log's own metric table: a log without one
        (written before it) or whose metrics changed fails with one line, not a wrong figure."""
        old = support.write_run(os.path.join(self.dir, "old.h5"), QUANTIZERS, fixture_samples()[:1],
                                metrics=None)
        self.assert_error([old], f"{old}: has no /schema/metrics (written by a kvdrift before the metric table): "
                                 "resume its run with this kvdrift (`kvdrift run` on the same config) to add it")
        changed = support.write_run(os.path.join(self.dir, "changed.h5"), QUANTIZERS, fixture_samples()[:1],
                                    metrics=support.metric_table({"attn_rel_l2": ["layer", "logged_step"]}))
        self.assert_error([changed], f"{changed}: metric 'attn_rel_l2' has axes [layer, logged_step]; this "
                                     "analysis reads [logged_step, layer]")

    def test_quantizer_not_in_the_file(self):
        path = support.write_run(os.path.join(self.dir, "run.h5"), QUANTIZERS, fixture_samples()[:1])
        self.assert_error([path, "--quantizer", "gamma"],
                          f"{path}: no quantizer 'gamma' (available: alpha, beta)")

    def test_damaged_files_fail_fast_with_one_line(self):
        """A flipped byte in a checksummed object header, the root group's (read at open) or the last
        one written (read while plotting): one line naming the file, promptly (a SWMR open retries a
        bad checksum for minutes), no traceback."""
        path = support.write_run(os.path.join(self.dir, "good.h5"), QUANTIZERS, fixture_samples()[:2],
                                 libver="latest")
        with open(path, "rb") as f:
            data = f.read()
        headers = [m.start() for m in re.finditer(b"OHDR", data)]
        self.assertGreater(len(headers), 10)
        for name, offset in (("root", headers[0]), ("last", headers[-1])):
            damaged_path = os.path.join(self.dir, f"damaged-{name}.h5")
            with open(damaged_path, "wb") as f:
                f.write(support.flip_in_object_header(data, offset))
            out = os.path.join(self.dir, f"damaged-{name}")
            start = time.monotonic()
            result = support.run_script("plot_drift.py", damaged_path, "-o", out, timeout=120)
            self.assertLess(time.monotonic() - start, 30, name)
            self.assertEqual(result.returncode, 1, name)
            self.assertNotIn("Traceback", result.stderr)
            self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
            self.assertTrue(result.stderr.startswith(f"plot_drift.py: error: {damaged_path}: "), result.stderr)
            self.assertIn("checksum", result.stderr)

    def test_a_damaged_sample_is_named(self):
        """A flipped byte in one sample's object header once ended in a traceback (h5py's items() handed the
        group over as None: AttributeError); it, and an attribute of the wrong type, fail in one line naming
        the file and the sample."""
        path = support.write_run(os.path.join(self.dir, "sample-header.h5"), QUANTIZERS, fixture_samples(),
                                 libver="latest")
        with h5py.File(path, "r") as f:
            offset = h5py.h5o.get_info(f["samples/1"].id).addr
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(support.flip_in_object_header(data, offset))
        wrong_type = support.write_run(os.path.join(self.dir, "sample-attribute.h5"), QUANTIZERS, fixture_samples())
        with h5py.File(wrong_type, "r+") as f:
            f["samples/1"].attrs["complete"] = "yes"
        for damaged, detail in ((path, "checksum"), (wrong_type, "invalid literal for int()")):
            out = os.path.join(self.dir, "out")
            result = support.run_script("plot_drift.py", damaged, "-o", out)
            self.assertEqual(result.returncode, 1, damaged)
            self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
            self.assertTrue(result.stderr.startswith(f"plot_drift.py: error: {damaged}: /samples/1: "), result.stderr)
            self.assertIn(detail, result.stderr)
            self.assertFalse(os.path.exists(out))

    def test_a_step_past_the_samples_end_is_refused_not_allocated(self):
        """first_divergence 10^9 once sized the survival curve's counts (7.5 GiB), and a logged step of 10^9
        would size the heatmap's rows: each is refused in one line naming the sample and the value, by a
        plot that may not allocate 4 GiB."""
        def limit_memory():
            resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

        for name, value in (("first_divergence", 10 ** 9), ("first_divergence", -1), ("logged_steps", [1, 10 ** 9])):
            path = support.write_run(os.path.join(self.dir, f"huge-{name}.h5"), QUANTIZERS, fixture_samples())
            with h5py.File(path, "r+") as f:
                if name == "first_divergence":
                    f["samples/1/beta/free_running"].attrs[name] = np.int64(value)
                else:
                    del f["samples/1/logged_steps"]
                    f["samples/1"].create_dataset(name, data=np.asarray(value, dtype=np.int64))
            if name == "first_divergence":
                message = (f"{path}: /samples/1/beta/free_running has first_divergence {value}; the common prefix "
                           "of its 3 tokens and the reference's 3 lies in 0..3 (a damaged file)")
            else:
                message = (f"{path}: /samples/1/logged_steps holds step 1000000000, outside the sample's steps 0..2 "
                           "(a damaged file)")
            self.assert_error([path], message, preexec_fn=limit_memory)

    def test_a_finished_sample_with_an_empty_per_step_array_is_damage(self):
        """Every finished sample has step 0: an empty teacher-forced kl or top1_agree once left the sample out
        of the figures while the report counted it."""
        for name in ("kl", "top1_agree"):
            path = support.write_run(os.path.join(self.dir, f"empty-{name}.h5"), QUANTIZERS, fixture_samples())
            with h5py.File(path, "r+") as f:
                group = f["samples/1/beta/teacher_forced"]
                del group[name]
                group.create_dataset(name, data=np.zeros(0, np.float32))
            self.assert_error([path], f"{path}: /samples/1/beta/teacher_forced/{name} has shape (0,), not one value "
                                      "per step (a finished sample has at least one step: a damaged file)")

    def test_interval_is_a_number_of_seconds_up_to_a_day(self):
        """nan once reached time.sleep (ValueError) and inf or 1e10 its range (OverflowError) between two
        renders of a running run."""
        path = support.write_run(os.path.join(self.dir, "interval.h5"), QUANTIZERS, fixture_samples()[:1],
                                 complete=False)
        for value in ("nan", "inf", "-inf", "0", "-1", "1e10"):
            self.assert_error([path, "--follow", f"--interval={value}"],
                              f"argument --interval: '{value}' is not a number of seconds above 0 and at most 86400 "
                              "(a day)", returncode=2)

    def test_an_error_inside_a_read_names_its_kind_and_line(self):
        """reading() turns what a damaged file raises into one line, which names the error and the
        line that raised it: a bug of the analysis turned into that line can still be found."""
        from analysis import kvdrift_log
        with self.assertRaises(kvdrift_log.LogError) as caught:
            with kvdrift_log.reading("run.h5"):
                line = sys._getframe().f_lineno + 1
                [][0]
        self.assertEqual(str(caught.exception), "run.h5: list index out of range (IndexError at "
                         f"test_plot_drift_inputs.py:{line}; a damaged file, or not one kvdrift wrote)")

    def test_no_finished_samples(self):
        samples = fixture_samples()[3:]
        path = support.write_run(os.path.join(self.dir, "empty.h5"), QUANTIZERS, samples, complete=False)
        self.assert_error([path], f"{path}: no finished samples to plot")
        # --follow waits for a running run's first sample, but a complete one with none has nothing to wait for
        done = support.write_run(os.path.join(self.dir, "empty-done.h5"), QUANTIZERS, samples)
        self.assert_error([done, "--follow", "--interval", "0.1"], f"{done}: no finished samples to plot")

    def test_a_finished_sample_without_its_arrays_is_damage(self):
        """Skipping the sample would leave the figures one sample short of the report's count."""
        for lane, name, is_attribute in (("teacher_forced", "kl", False), ("free_running", "first_divergence", True)):
            path = support.write_run(os.path.join(self.dir, f"no-{name}.h5"), QUANTIZERS, fixture_samples())
            with h5py.File(path, "r+") as f:
                group = f[f"samples/1/beta/{lane}"]
                del (group.attrs if is_attribute else group)[name]
            self.assert_error([path], f"{path}: /samples/1/beta/{lane} has no {'attribute ' if is_attribute else ''}"
                                      f"{name} (a finished sample always has it: a damaged file)")


class PlotDriftSignals(unittest.TestCase):
    def test_sigterm_removes_the_staging_folder(self):
        """SIGTERM while the figures are drawn once left the staging folder (.stage-*) behind: now the plot
        unwinds, removing it and the output folder it made, and dies of the signal without a traceback."""
        directory = support.scratch_dir("plot_drift_sigterm")
        path = support.write_run(os.path.join(directory, "run.h5"), QUANTIZERS, fixture_samples())
        out = os.path.join(directory, "out")
        plot = subprocess.Popen([support.PYTHON, os.path.join(support.ANALYSIS_DIR, "plot_drift.py"), path, "-o", out],
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ, MPLBACKEND="Agg"))
        try:
            deadline = time.monotonic() + 60
            while not glob.glob(os.path.join(out, ".stage-*")):
                self.assertIsNone(plot.poll(), "the plot ended before its staging folder was seen")
                self.assertLess(time.monotonic(), deadline, "no staging folder")
                time.sleep(0.002)
            plot.send_signal(signal.SIGTERM)
            _, stderr = plot.communicate(timeout=60)
        finally:
            if plot.poll() is None:
                plot.kill()
                plot.communicate()
        self.assertEqual((plot.returncode, stderr), (-signal.SIGTERM, ""))
        self.assertFalse(os.path.exists(out), os.listdir(out) if os.path.isdir(out) else out)


if __name__ == "__main__":
    unittest.main()
