"""The HumanEval sandbox (analysis/humaneval.py): a correct program passes, an infinite loop is
killed at the time limit, writes outside the temporary directory, sockets and signals to this
process fail, with and without a network namespace, and score.py survives all of them."""
import os
import socket
import sys
import time
import unittest

import h5py

from analysis.tests import support

sys.path.insert(0, support.ANALYSIS_DIR)
import humaneval  # noqa: E402

HUMANEVAL = os.path.join(support.SHARED_DATA, "humaneval", "HumanEval.jsonl.gz")
NETNS_FLAGS = humaneval.network_namespace_flags()


def records():
    if not os.path.isfile(HUMANEVAL):
        raise AssertionError(f"{HUMANEVAL} missing (the shared data beside the checkout)")
    return humaneval.load_records(HUMANEVAL)


class Sandbox(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.task = records()["HumanEval/0"]
        cls.dir = support.scratch_dir("sandbox")
        cls.canonical = cls.task["canonical_solution"]

    def program(self, body_first_lines):
        """The task's program whose completion runs `body_first_lines`, then the correct solution: it
        passes exactly when those lines do not raise."""
        return humaneval.program_text(self.task, body_first_lines + self.canonical)

    def run_each(self, programs, timeout=5.0):
        """Outcomes of `programs` with the namespace (when this machine allows one) and without."""
        results = {}
        for flags in sorted({NETNS_FLAGS, 0}):
            results[flags] = humaneval.run_programs(programs, timeout=timeout, jobs=2, netns_flags=flags)
        return results

    def test_canonical_solution_passes_and_wrong_one_fails(self):
        for flags, (right, wrong) in self.run_each([humaneval.program_text(self.task, self.canonical),
                                                    humaneval.program_text(self.task, "    return False\n")]).items():
            with self.subTest(netns_flags=flags):
                self.assertEqual((right.status, right.detail), ("passed", ""))
                self.assertEqual((wrong.status, wrong.detail), ("failed", "AssertionError"))

    def test_infinite_loop_is_killed_at_the_time_limit(self):
        start = time.monotonic()
        outcome, = humaneval.run_programs([humaneval.program_text(self.task, "    while True:\n        pass\n")],
                                          timeout=1.5)
        elapsed = time.monotonic() - start
        self.assertEqual(outcome.status, "timeout")
        self.assertGreaterEqual(elapsed, 1.5)
        self.assertLess(elapsed, 6.0)

    def test_writes_outside_the_temporary_directory_fail(self):
        outside = os.path.join(self.dir, "outside")
        os.makedirs(outside, exist_ok=True)
        victim = os.path.join(outside, "keep.txt")
        with open(victim, "w") as f:
            f.write("keep")
        attempts = {
            "open": f"    open({os.path.join(outside, 'new.txt')!r}, 'w').write('x')\n",
            "append": f"    open({victim!r}, 'a').write('x')\n",
            "os.open": f"    import os\n    os.open({os.path.join(outside, 'fd.txt')!r}, os.O_CREAT | os.O_WRONLY)\n",
            "remove": f"    import os\n    os.remove({victim!r})\n",
            "mkdir": f"    import os\n    os.mkdir({os.path.join(outside, 'sub')!r})\n",
            "rename": f"    import os\n    os.rename({victim!r}, 'stolen.txt')\n",
            "symlink then write": f"    import os\n    os.symlink({outside!r}, 'link')\n",
            "dir_fd remove": f"    import os\n    os.remove('keep.txt', dir_fd=os.open({outside!r}, os.O_RDONLY))\n",
        }
        for flags, outcomes in self.run_each([self.program(a) for a in attempts.values()]).items():
            for name, outcome in zip(attempts, outcomes):
                with self.subTest(attempt=name, netns_flags=flags):
                    self.assertEqual(outcome.status, "failed")
                    self.assertTrue(outcome.detail.startswith("PermissionError: kvdrift sandbox: "), outcome.detail)
        self.assertEqual(sorted(os.listdir(outside)), ["keep.txt"])
        with open(victim) as f:
            self.assertEqual(f.read(), "keep")

    def test_writes_inside_the_temporary_directory_work(self):
        program = ("import os, tempfile\nos.mkdir('d')\nopen('d/f.txt', 'w').write('x')\n"
                   "os.rename('d/f.txt', 'g.txt')\nos.remove('g.txt')\ntempfile.NamedTemporaryFile('w').close()\n")
        outcome, = humaneval.run_programs([program], timeout=5)
        self.assertEqual((outcome.status, outcome.detail), ("passed", ""))

    def test_sockets_do_not_connect(self):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        attempts = [
            f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n",
            f"    import socket\n    s = socket.socket()\n    s.connect(('127.0.0.1', {port}))\n",
            "    import urllib.request\n    urllib.request.urlopen('http://example.com', timeout=2)\n",
        ]
        try:
            for flags, outcomes in self.run_each([self.program(a) for a in attempts]).items():
                for attempt, outcome in zip(attempts, outcomes):
                    with self.subTest(attempt=attempt, netns_flags=flags):
                        self.assertEqual(outcome.status, "failed")
                        self.assertRegex(outcome.detail, r"kvdrift sandbox: socket\.\w+ refused")
            with self.assertRaises(socket.timeout):
                listener.accept()
        finally:
            listener.close()

    def test_processes_and_signals_are_refused(self):
        attempts = {
            "kill parent": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n",
            "kill group 0": "    import os, signal\n    os.killpg(os.getpgid(os.getppid()), signal.SIGTERM)\n",
            "subprocess": "    import subprocess\n    subprocess.run(['true'])\n",
            "os.system": "    import os\n    os.system('true')\n",
            "fork": "    import os\n    os.fork()\n",
            "ctypes": "    import ctypes\n",
        }
        for flags, outcomes in self.run_each([self.program(a) for a in attempts.values()]).items():
            for name, outcome in zip(attempts, outcomes):
                with self.subTest(attempt=name, netns_flags=flags):
                    self.assertEqual(outcome.status, "failed")
                    self.assertTrue(outcome.detail.startswith("PermissionError: kvdrift sandbox: "), outcome.detail)
        os.kill(os.getpid(), 0)  # still here

    def test_early_exit_is_not_a_pass(self):
        outcomes = humaneval.run_programs([
            humaneval.program_text(self.task, "    import sys\n    sys.exit(0)\n"),
            humaneval.program_text(self.task, "    import os\n    os._exit(0)\n")], timeout=5)
        self.assertEqual([(o.status, o.detail) for o in outcomes],
                         [("failed", "SystemExit: 0"), ("failed", "exit status 0")])

    def test_resource_limits(self):
        outcomes = humaneval.run_programs([
            self.program("    x = bytearray(2 << 30)\n"),
            self.program("    open('big', 'wb').write(b'x' * (32 << 20))\n")], timeout=5)
        self.assertEqual([(o.status, o.detail) for o in outcomes],
                         [("failed", "MemoryError"), ("failed", "OSError: [Errno 27] File too large")])

    @unittest.skipUnless(NETNS_FLAGS, "this machine gives no network namespace to unprivileged children")
    def test_network_namespace_has_only_loopback(self):
        program = "import socket\nassert [n for _, n in socket.if_nameindex()] == ['lo']\n"
        outcome, = humaneval.run_programs([program], timeout=5, netns_flags=NETNS_FLAGS)
        self.assertEqual((outcome.status, outcome.detail), ("passed", ""))


class ScoreHumanEval(unittest.TestCase):
    def test_score_survives_hostile_completions(self):
        tasks = records()
        directory = support.scratch_dir("score_humaneval")
        sentinel = os.path.join(directory, "sentinel")
        loop = "    while True:\n        pass\n"
        kill = "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n"
        write = f"    open({sentinel!r}, 'w').write('x')\n"
        plan = [  # (task, reference continuation, alpha continuation, beta continuation)
            ("HumanEval/0", tasks["HumanEval/0"]["canonical_solution"], loop, "    return False\n"),
            ("HumanEval/2", tasks["HumanEval/2"]["canonical_solution"] + "\n\ndef unrelated():\n    pass\n",
             kill + tasks["HumanEval/2"]["canonical_solution"], write + tasks["HumanEval/2"]["canonical_solution"]),
        ]
        samples = []
        for index, (task_id, reference, alpha, beta) in enumerate(plan):
            lanes = {(name, "free_running"): {"attrs": {"continuation": text, "first_divergence": 0,
                                                        "outcome": "token_mismatch"}, "data": {"tokens": [1]}}
                     for name, text in (("alpha", alpha), ("beta", beta))}
            samples.append({"index": index, "reference_tokens": [1], "lanes": lanes,
                            "attrs": {"answer": "", "reference_continuation": reference}})
        path = support.write_run(os.path.join(directory, "humaneval.h5"),
                                 [("alpha", "rtn", {}), ("beta", "kivi", {})], samples,
                                 prompts={"source": "jsonl", "path": HUMANEVAL})
        with h5py.File(path, "r+") as f:  # the ids the engine takes from task_id
            for index, (task_id, *_) in enumerate(plan):
                f[f"samples/{index}"].attrs["prompt_id"] = task_id
        result = support.run_script("score.py", path, "--timeout", "2")
        self.assertEqual(result.returncode, 0, result.stderr)
        with h5py.File(path, "r") as f:
            scores = f["scores"]
            self.assertEqual(scores.attrs["task"], "humaneval")
            reference = scores["reference"]
            self.assertEqual((int(reference.attrs["correct"]), int(reference.attrs["scored"])), (2, 2))
            alpha = scores["alpha/free_running"]
            self.assertEqual(alpha["correct"][:].tolist(), [0, 0])
            self.assertEqual([x.decode() for x in alpha["extracted"][:]],
                             ["timeout: killed at the time limit",
                              "failed: PermissionError: kvdrift sandbox: os.kill refused"])
            beta = scores["beta/free_running"]
            self.assertEqual(beta["correct"][:].tolist(), [0, 0])
            self.assertEqual(beta["extracted"][0].decode(), "failed: AssertionError")
        self.assertFalse(os.path.exists(sentinel))
        self.assertIn("reference                                       2       2     1.000", result.stdout)

    def test_unknown_task_id(self):
        directory = support.scratch_dir("score_humaneval_bad")
        path = support.write_run(os.path.join(directory, "run.h5"), [("alpha", "rtn", {})],
                                 [{"index": 0, "reference_tokens": [1],
                                   "attrs": {"answer": "", "reference_continuation": "pass"}}],
                                 prompts={"source": "jsonl", "path": HUMANEVAL})
        result = support.run_script("score.py", path)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, f"score.py: error: {path}: samples/0 has prompt_id 'inline:0', which is "
                                        f"not a task_id of {HUMANEVAL}\n")


if __name__ == "__main__":
    unittest.main()
