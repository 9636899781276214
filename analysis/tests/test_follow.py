"""plot_drift.py --follow against a run that a background process writes in HDF5 SWMR mode: it
renders the finished samples while the run grows, skips the sample being written, and exits after
the render that follows the root `complete` = 1."""
import json
import os
import subprocess
import textwrap
import time
import unittest

from analysis.tests import support
from analysis.tests.support import num, read_csv

# The writer creates every group and attribute first (SWMR forbids creating them later), then
# switches to SWMR and grows the per-step arrays, flushing after every step.
WRITER = textwrap.dedent('''
    import os, sys, time
    import h5py, numpy as np
    path, out_dir, config, metrics = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    KL = {0: [0.5, 1.0, 2.0], 1: [4.0, 8.0, 16.0, 32.0]}
    f = h5py.File(path, "w", libver="latest")
    f.attrs["schema_version"] = np.int64(1)
    f.attrs["kvdrift_version"] = "0.1.0"
    f.attrs["complete"] = np.int64(0)
    f.create_dataset("config/yaml", data=config, dtype=h5py.string_dtype("utf-8"))
    f.create_dataset("schema/metrics", data=metrics, dtype=h5py.string_dtype("utf-8"))
    f.create_group("model").attrs.update({"path": "/models/tiny.bin", "format": "llama2c"})
    f.create_group("quantizers/alpha")
    arrays = {}
    for index in KL:
        sample = f.create_group(f"samples/{index}")
        sample.attrs["complete"] = np.int64(0)
        lane = sample.create_group("alpha/teacher_forced")
        lane.attrs["bits_per_element"] = 2.0
        for name, dtype in (("reference_tokens", "i8"),):
            arrays[index, name] = sample.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
        for name in ("kl", "top1_agree"):
            arrays[index, name] = lane.create_dataset(name, shape=(0,), maxshape=(None,), dtype="f4", chunks=(256,))
            arrays[index, name].attrs["axes"] = "step"
    f.swmr_mode = True
    open(os.path.join(out_dir, "..", "swmr_on"), "w").close()

    def write_sample(index):
        for step, value in enumerate(KL[index]):
            for name, v in (("reference_tokens", step), ("kl", value), ("top1_agree", 1.0)):
                arrays[index, name].resize((step + 1,))
                arrays[index, name][step] = v
                arrays[index, name].flush()
            time.sleep(0.05)
        f[f"samples/{index}"].attrs["complete"] = np.int64(1)
        f.flush()

    write_sample(0)
    # let the follower render sample 0 alone while sample 1 has not started
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(out_dir, "drift_curves.csv")):
        if time.monotonic() > deadline:
            sys.exit("the follower never rendered")
        time.sleep(0.05)
    write_sample(1)
    f.attrs["complete"] = np.int64(1)
    f.flush()
    f.close()
''')


class Follow(unittest.TestCase):
    def test_follow_a_swmr_run_until_complete(self):
        directory = support.scratch_dir("follow")
        path = os.path.join(directory, "live.h5")
        out = os.path.join(directory, "out")
        os.makedirs(out)
        config = support.config_yaml([("alpha", "rtn", {"k_bits": 2})], max_new_tokens=4,
                                     lanes=("teacher_forced",))
        writer = subprocess.Popen([support.PYTHON, "-c", WRITER, path, out, config,
                                   json.dumps(support.metric_table())], stderr=subprocess.PIPE,
                                  text=True)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(os.path.join(directory, "swmr_on")):
                self.assertIsNone(writer.poll(), writer.stderr.read() if writer.poll() is not None else "")
                self.assertLess(time.monotonic(), deadline, "the writer did not start")
                time.sleep(0.05)
            follower = support.run_script("plot_drift.py", "--follow", path, "-o", out, "--interval", "0.2",
                                          timeout=90)
            self.assertEqual(writer.wait(timeout=30), 0, writer.stderr.read())
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
            writer.stderr.close()
        self.assertEqual(follower.returncode, 0, follower.stderr)
        renders = [line for line in follower.stderr.splitlines() if " rendered " in line]
        counts = [int(line.split(" rendered ")[1].split()[0]) for line in renders]
        self.assertIn(1, counts, follower.stderr)
        self.assertEqual(counts[-1], 2, follower.stderr)
        self.assertEqual(counts, sorted(counts))
        rows = [r for r in read_csv(os.path.join(out, "drift_curves.csv")) if r["metric"] == "kl"]
        # step 0: 0.5 and 4 -> median 2.25; step 3: only sample 1's 32
        self.assertEqual([(int(r["step"]), r["samples"], num(r["center"])) for r in rows],
                         [(0, "2", 2.25), (1, "2", 4.5), (2, "2", 9.0), (3, "1", 32.0)])
        with open(os.path.join(out, "report.md")) as f:
            self.assertIn("· 2 samples ·", f.read())


if __name__ == "__main__":
    unittest.main()
