"""plot_drift.py --align onset: drift curves against the steps since each lane's first read of a
quantized position (onset_step), with the number of samples behind each point; a log without onset
arrays is refused with one line that names the kvdrift that wrote it."""
import os
import unittest

from analysis.tests import support
from analysis.tests.drift_fixture import QUANTIZERS, fixture_samples, rows_of, with_onsets
from analysis.tests.support import num, read_csv


class AlignOnset(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = support.scratch_dir("plot_align")
        cls.run_path = support.write_run(os.path.join(cls.dir, "run.h5"), QUANTIZERS, with_onsets(fixture_samples()),
                                         max_new_tokens=4)
        cls.out = os.path.join(cls.dir, "onset")
        cls.result = support.run_script("plot_drift.py", cls.run_path, "-o", cls.out, "--window", "2",
                                        "--align", "onset")

    def curve(self, **where):
        rows = rows_of(read_csv(os.path.join(self.out, "drift_curves.csv")), **where)
        return [(int(r["steps_since_onset"]), int(r["samples"]), num(r["center"]), num(r["low"]), num(r["high"]))
                for r in rows]

    def test_kl_counts_steps_from_each_samples_onset(self):
        self.assertEqual(self.result.returncode, 0, self.result.stderr)
        # alpha's teacher-forced KL from its onsets (1, never, 2): sample 0 gives 1, 2, 4 and sample 2
        # gives 4, 2; sample 1 never read a quantized position and is left out
        self.assertEqual(self.curve(quantizer="alpha", metric="kl"),
                         [(0, 2, 2.5, 1.75, 3.25), (1, 2, 2.0, 2.0, 2.0), (2, 1, 4.0, 4.0, 4.0)])
        # beta's onsets are 0: its curve is the unaligned one (step 0: 0.25, 0.5, 0.125)
        self.assertEqual(self.curve(quantizer="beta", metric="kl")[0], (0, 3, 0.25, 0.1875, 0.375))

    def test_top1_window_and_attention_are_aligned_per_lane(self):
        # disagreement from the onsets: sample 0 1, 0, 1; sample 2 0, 0; trailing 2-step windows
        self.assertEqual([(x, n, c) for x, n, c, _, _ in self.curve(quantizer="alpha", metric="top1_disagreement")],
                         [(0, 2, 0.5), (1, 2, 0.25), (2, 1, 1 / 3)])
        # teacher-forced attention (layer means at logged steps 1, 2, 3) from onsets 1 and 2
        self.assertEqual([(x, n, c) for x, n, c, _, _ in
                          self.curve(quantizer="alpha", lane="teacher_forced", metric="attn_rel_l2")],
                         [(0, 2, 1.5), (1, 2, 2.0), (2, 1, 4.0)])
        # the static lane by its own onsets (2, 1, 1): 1, 2 · 2, 1 · 0.5, 3, 1
        self.assertEqual(self.curve(quantizer="alpha", lane="static", metric="attn_rel_l2"),
                         [(0, 3, 1.0, 0.75, 1.5), (1, 3, 2.0, 1.5, 2.5), (2, 1, 1.0, 1.0, 1.0)])

    def test_figure_and_report_say_so(self):
        self.assertTrue(os.path.getsize(os.path.join(self.out, "drift_curves.png")) > 1000)
        with open(os.path.join(self.out, "report.md")) as f:
            self.assertIn("aligned at each lane's first read of a quantized position (`--align onset`)", f.read())

    def test_align_step_is_the_default_and_unchanged(self):
        plain = support.write_run(os.path.join(self.dir, "plain.h5"), QUANTIZERS, fixture_samples(), max_new_tokens=4)
        outputs = []
        for path, extra in ((self.run_path, ["--align", "step"]), (plain, [])):
            out = os.path.join(self.dir, f"step-{len(outputs)}")
            result = support.run_script("plot_drift.py", path, "-o", out, *extra)
            self.assertEqual(result.returncode, 0, result.stderr)
            outputs.append([{k: v for k, v in r.items() if k != "run"}
                            for r in read_csv(os.path.join(out, "drift_curves.csv"))])
        self.assertEqual(outputs[0], outputs[1])
        self.assertIn("step", outputs[0][0])

    def test_a_log_without_onset_arrays_is_refused(self):
        path = support.write_run(os.path.join(self.dir, "old.h5"), QUANTIZERS, fixture_samples(),
                                 root_attrs={"git_revision": "0123456789ab"})
        out = os.path.join(self.dir, "refused")
        result = support.run_script("plot_drift.py", path, "-o", out, "--align", "onset")
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (1, "", f"plot_drift.py: error: {path}: written by kvdrift 0.1.0 (git 0123456789ab), which "
                                 "did not log onset arrays (onset_step); rerun it with this kvdrift to get them: "
                                 "`kvdrift run CONFIG --overwrite`\n"))
        self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
    unittest.main()
