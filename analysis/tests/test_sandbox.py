"""The HumanEval sandbox (analysis/humaneval.py, analysis/sandbox_guard.py; docs/analysis.md,
*HumanEval*).

Escapes: the one- and two-line programs of issue 26 (writing through dir_fd, fchmod of an outside file,
the guard switched off through sys.modules['__main__'] to fork, a setsid child that writes later, the
scorer killed through pidfd_send_signal, a wrong solution that prints the pass token it read from the
guard's stack) and SIGTERM or SIGKILL to score.py, all through score.py on a run file: nothing outside
changes, no process is left, the scorer lives and the wrong solution fails.
KernelConfinement: the same kinds of attempt with the audit hook left out (hook=False), so that the
kernel's layers alone must hold: read-only file system but /tmp, no new process or thread, no signal
to anything outside, the checker beyond the solution's reach, values as plain data only.
Sandbox: what the audit hook refuses, with its messages, and what programs can do (the time limit,
resource limits, /tmp, loopback only); canonical solutions pass, wrong ones fail.
"""
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import unittest

import h5py

from analysis.tests import support

sys.path.insert(0, support.ANALYSIS_DIR)
import humaneval  # noqa: E402

HUMANEVAL = os.path.join(support.SHARED_DATA, "humaneval", "HumanEval.jsonl.gz")
SCORE = os.path.join(support.ANALYSIS_DIR, "score.py")


def records():
    if not os.path.isfile(HUMANEVAL):
        raise AssertionError(f"{HUMANEVAL} missing (the shared data beside the checkout)")
    return humaneval.load_records(HUMANEVAL)


def humaneval_run(path, continuations, task_id="HumanEval/0"):
    """A finished run file whose samples' reference continuations are `continuations` (one program
    each) for HumanEval task `task_id`."""
    samples = [{"index": i, "reference_tokens": [1], "attrs": {"answer": "", "reference_continuation": text}}
               for i, text in enumerate(continuations)]
    support.write_run(path, [("alpha", "rtn", {})], samples, prompts={"source": "jsonl", "path": HUMANEVAL})
    with h5py.File(path, "r+") as f:  # the ids the engine takes from task_id
        for index in range(len(continuations)):
            f[f"samples/{index}"].attrs["prompt_id"] = task_id
    return path


def reference_scores(path):
    with h5py.File(path, "r") as f:
        lane = f["scores/reference"]
        return list(zip(lane["correct"][:].tolist(), [x.decode() for x in lane["extracted"][:]]))


# The guard of the attack switched off through the module it runs as, written against the
# guard that read its sets from module globals (today's guard binds them in the hook instead).
GUARD_OFF = ("    import sys\n    g = sys.modules['__main__']\n"
             "    g._REFUSED, g._REFUSED_IMPORTS, g._REFUSED_PREFIXES, g._WRITE_FLAGS = set(), set(), ('-',), 0\n")

# Runs score.py as a child subreaper's child (so that whatever score.py leaves behind becomes this
# driver's child rather than init's), with TMPDIR in the test's folder, optionally sends it a signal
# once a sandbox program has run for a second, and reports score.py's exit status, every process
# still alive below the driver after up to 5 s (then kills them) and the folders left in TMPDIR.
DRIVER = r"""
import ctypes, json, os, signal, subprocess, sys, time
assert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
argv, name, directory = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]

def descendants(pid):
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for child in children:
            found += [child] + descendants(child)
    return found

def read(pid, name):
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""

os.makedirs(os.path.join(directory, "tmp"))
with open(os.path.join(directory, "stdout"), "wb") as out, open(os.path.join(directory, "stderr"), "wb") as err:
    scorer = subprocess.Popen(argv, stdout=out, stderr=err, env=dict(os.environ, TMPDIR=os.path.join(directory, "tmp")))
if name:
    deadline = time.monotonic() + 30
    while not any("sandbox_guard" in read(p, "cmdline") for p in descendants(scorer.pid)):
        if scorer.poll() is not None or time.monotonic() > deadline:
            print(json.dumps({"error": "no sandbox program started"}))
            sys.exit(0)
        time.sleep(0.02)
    time.sleep(1.0)
    os.kill(scorer.pid, getattr(signal, name))
scorer.wait(timeout=60)
deadline = time.monotonic() + 5
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    alive = [p for p in descendants(os.getpid()) if read(p, "stat").rsplit(")", 1)[-1].split()[:1] != ["Z"]]
    if not alive or time.monotonic() > deadline:
        break
    time.sleep(0.05)
report = {"returncode": scorer.returncode,
          "survivors": [read(p, "cmdline").replace("\0", " ").strip() for p in alive],
          "folders": sorted(os.listdir(os.path.join(directory, "tmp")))}
for p in alive:
    try:
        os.kill(p, signal.SIGKILL)
    except OSError:
        pass
print(json.dumps(report))
"""


class Escapes(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.task = records()["HumanEval/0"]
        cls.canonical = cls.task["canonical_solution"]

    def score(self, path, *extra):
        return subprocess.run([support.PYTHON, SCORE, path, "--timeout", "5", *extra], capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, MPLBACKEND="Agg"))

    def test_escapes_change_nothing_outside_and_a_wrong_solution_cannot_pass(self):
        directory = support.scratch_dir("escapes")
        outside = os.path.join(directory, "outside")
        os.makedirs(outside)
        victim = os.path.join(outside, "victim.txt")
        with open(victim, "w") as f:
            f.write("keep")
        os.chmod(victim, 0o600)
        forked, late = os.path.join(outside, "forked"), os.path.join(outside, "late")
        attacks = {
            "os.open with dir_fd": "    import os\n    os.close(os.open('dirfd.txt', os.O_CREAT | os.O_WRONLY, "
                                   f"dir_fd=os.open({outside!r}, os.O_RDONLY)))\n",
            "fchmod": f"    import os\n    os.fchmod(os.open({victim!r}, os.O_RDONLY), 0o777)\n",
            "guard off, fork through ctypes": GUARD_OFF + "    import ctypes\n    if ctypes.CDLL(None).fork() == 0:\n"
                                              f"        open({forked!r}, 'w').close()\n"
                                              "        ctypes.CDLL(None)._exit(0)\n",
            "setsid child writes later": GUARD_OFF + "    import os, time\n    if os.fork() == 0:\n        os.setsid()\n"
                                         f"        time.sleep(1.5)\n        open({late!r}, 'w').close()\n"
                                         "        os._exit(0)\n",
        }
        # A wrong solution that prints a pass token found in any caller's frame and exits 0.
        thief = ("    import os, sys\n    f = sys._getframe()\n    while f is not None:\n"
                 "        if isinstance(f.f_locals.get('token'), str):\n"
                 "            sys.stdout.write('\\n' + f.f_locals['token'] + '\\n')\n"
                 "            sys.stdout.flush()\n            os._exit(0)\n        f = f.f_back\n    return False\n")
        continuations = [a + self.canonical for a in attacks.values()] + [thief]
        path = humaneval_run(os.path.join(directory, "run.h5"), continuations)
        result = self.score(path, "--jobs", "2")
        self.assertEqual(result.returncode, 0, result.stderr)
        time.sleep(2.0)  # a child left behind would write `late` 1.5 s after its fork
        scores = reference_scores(path)
        harm = {"os.open with dir_fd": lambda: os.path.exists(os.path.join(outside, "dirfd.txt")),
                "fchmod": lambda: stat.S_IMODE(os.stat(victim).st_mode) != 0o600,
                "guard off, fork through ctypes": lambda: os.path.exists(forked),
                "setsid child writes later": lambda: os.path.exists(late)}
        for (name, done), (correct, extracted) in zip(harm.items(), scores):
            with self.subTest(attack=name):
                self.assertFalse(done())
                self.assertEqual(correct, 0, extracted)
        with self.subTest(attack="token thief"):
            self.assertEqual(scores[-1], (0, "failed: AssertionError"))
        self.assertEqual(sorted(os.listdir(outside)), ["victim.txt"])
        with open(victim) as f:
            self.assertEqual(f.read(), "keep")

    def test_pidfd_signal_does_not_kill_the_scorer(self):
        directory = support.scratch_dir("escapes_pidfd")
        attack = "    import os, signal\n    signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)\n"
        path = humaneval_run(os.path.join(directory, "run.h5"), [attack + self.canonical])
        result = self.score(path)
        self.assertEqual(result.returncode, 0, result.stderr)
        # The solution's parent is the checker, pid 1 of the sandbox's namespace: the signal is dropped
        # and the (correct) solution passes.
        self.assertEqual(reference_scores(path), [(1, "passed")])

    def drive(self, name, continuations):
        """score.py on `continuations` under the DRIVER, signalled with `name` (or not): its report."""
        directory = support.scratch_dir(f"escapes_{name or 'none'}")
        path = humaneval_run(os.path.join(directory, "run.h5"), continuations)
        argv = [support.PYTHON, SCORE, path, "--timeout", "30", "--jobs", "2"]
        result = subprocess.run([support.PYTHON, "-c", DRIVER, json.dumps(argv), name, directory],
                                capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        report = json.loads(result.stdout)
        self.assertNotIn("error", report)
        return report, path

    def sleepers(self):
        sleep = "    import time\n    time.sleep(30)\n"
        fork_and_sleep = (GUARD_OFF + "    import os, time\n    if os.fork() == 0:\n        os.setsid()\n"
                          "        time.sleep(30)\n    time.sleep(30)\n")
        return [sleep + self.canonical, fork_and_sleep + self.canonical]

    def test_sigterm_to_the_scorer_leaves_no_program_running(self):
        report, path = self.drive("SIGTERM", self.sleepers())
        self.assertEqual(report["survivors"], [])
        self.assertEqual(report["returncode"], -signal.SIGTERM)
        self.assertEqual(report["folders"], [])  # the sandboxes' folders on this side, removed on the way out
        with h5py.File(path, "r") as f:
            self.assertNotIn("scores", f)

    def test_sigint_to_the_scorer_leaves_no_program_running(self):
        report, _ = self.drive("SIGINT", self.sleepers())
        self.assertEqual(report["survivors"], [])
        self.assertEqual(report["returncode"], -signal.SIGINT)
        self.assertEqual(report["folders"], [])

    def test_sigkill_to_the_scorer_leaves_no_program_running(self):
        report, _ = self.drive("SIGKILL", self.sleepers())
        self.assertEqual(report["survivors"], [])
        self.assertEqual(report["returncode"], -signal.SIGKILL)


class KernelConfinement(unittest.TestCase):
    """hook=False: the solution runs without the audit hook, so only the kernel's layers stop it."""

    def run_one(self, solution, checker, hook=False, timeout=8.0):
        outcome, = humaneval.run_programs([humaneval.Program(solution, checker, "f")], timeout=timeout, hook=hook)
        return outcome

    def test_the_file_system_is_read_only_but_tmp(self):
        probe = f"kvdrift-probe-{os.getpid()}"
        solution = (
            "import os, sys\n"
            "def f():\n"
            "    results = {}\n"
            "    for d in ['/', '/usr', '/dev', '/kvdrift', '/etc', os.path.dirname(sys.executable), sys.prefix,\n"
            "              os.path.dirname(os.__file__), '/tmp']:\n"
            "        try:\n"
            f"            os.close(os.open(os.path.join(d, {probe!r}), os.O_CREAT | os.O_WRONLY | os.O_EXCL))\n"
            "            results[d] = 'written'\n"
            "        except OSError as e:\n"
            "            results[d] = e.errno\n"
            "    for name, act in [('fchmod', lambda: os.fchmod(os.open(sys.executable, os.O_RDONLY), 0o777)),\n"
            "                      ('chmod', lambda: os.chmod(os.__file__, 0o777)),\n"
            "                      ('utime', lambda: os.utime(os.__file__)),\n"
            "                      ('append', lambda: open(os.__file__, 'a').close())]:\n"
            "        try:\n"
            "            act()\n"
            "            results[name] = 'done'\n"
            "        except OSError as e:\n"
            "            results[name] = e.errno\n"
            "    return results\n")
        checker = ("import errno\n"
                   "def check(candidate):\n"
                   "    results = candidate()\n"
                   "    assert results.pop('/tmp') == 'written', results\n"
                   "    assert all(v in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT) for v in results.values()), "
                   "results\n")
        try:
            outcome = self.run_one(solution, checker)
            self.assertEqual((outcome.status, outcome.detail), ("passed", ""))
        finally:  # should the view ever be writable, leave nothing on this machine
            for d in ("/", "/usr", "/etc", os.path.dirname(os.__file__)):
                try:
                    os.remove(os.path.join(d, probe))
                except OSError:
                    pass

    def test_no_process_or_thread_can_start(self):
        solution = (
            "import ctypes, os, subprocess, threading\n"
            "def f():\n"
            "    results = {}\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "        if pid == 0:\n"
            "            os._exit(0)\n"
            "        results['fork'] = 'forked'\n"
            "    except OSError as e:\n"
            "        results['fork'] = e.errno\n"
            "    libc = ctypes.CDLL(None, use_errno=True)\n"
            "    pid = libc.fork()\n"
            "    if pid == 0:\n"
            "        libc._exit(0)\n"
            "    results['libc fork'] = ctypes.get_errno() if pid < 0 else 'forked'\n"
            "    try:\n"
            "        subprocess.run(['/bin/true'])\n"
            "        results['subprocess'] = 'ran'\n"
            "    except OSError as e:\n"
            "        results['subprocess'] = e.errno\n"
            "    try:\n"
            "        threading.Thread(target=lambda: None).start()\n"
            "        results['thread'] = 'started'\n"
            "    except RuntimeError:\n"
            "        results['thread'] = 'refused'\n"
            "    results['unshare'] = 0 if libc.unshare(0x10000000) == 0 else ctypes.get_errno()\n"
            "    return results\n")
        checker = ("import errno\n"
                   "def check(candidate):\n"
                   "    results = candidate()\n"
                   "    assert results == {'fork': errno.EAGAIN, 'libc fork': errno.EAGAIN, 'subprocess': errno.EAGAIN,\n"
                   "                       'thread': 'refused', 'unshare': results['unshare']}, results\n"
                   "    assert results['unshare'] in (errno.EPERM, errno.ENOSPC, errno.EUSERS), results\n")
        outcome = self.run_one(solution, checker)
        self.assertEqual((outcome.status, outcome.detail), ("passed", ""))

    def test_no_signal_reaches_outside(self):
        sleeper = subprocess.Popen(["sleep", "60"])
        try:
            solution = (
                "import os, signal\n"
                "def f():\n"
                "    results = {}\n"
                f"    for name, act in [('kill', lambda: os.kill({sleeper.pid}, signal.SIGKILL)),\n"
                f"                      ('pidfd', lambda: signal.pidfd_send_signal(os.pidfd_open({sleeper.pid}), 9)),\n"
                f"                      ('scorer', lambda: os.pidfd_open({os.getpid()})),\n"
                "                      ('any process', lambda: os.kill(-1, 0))]:\n"
                "        try:\n"
                "            act()\n"
                "            results[name] = 'sent'\n"
                "        except OSError as e:\n"
                "            results[name] = e.errno\n"
                "    return results\n")
            checker = ("import errno\n"
                       "def check(candidate):\n"
                       "    results = candidate()\n"
                       "    assert set(results.values()) == {errno.ESRCH}, results\n")
            outcome = self.run_one(solution, checker)
            self.assertEqual((outcome.status, outcome.detail), ("passed", ""))
            self.assertIsNone(sleeper.poll())
        finally:
            sleeper.kill()
            sleeper.wait()

    def test_the_checker_is_out_of_the_solutions_reach(self):
        # The checker is pid 1 of the namespace (signals without a handler are dropped) and not dumpable
        # (no ptrace, no reading its memory, no taking its descriptors, such as the verdict's stdout).
        solution = (
            "import ctypes, os, signal\n"
            "def f():\n"
            "    results = {}\n"
            "    libc = ctypes.CDLL(None, use_errno=True)\n"
            "    checker = os.getppid()\n"
            "    results['parent'] = checker\n"
            "    for sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM, signal.SIGINT):\n"
            "        os.kill(checker, sig)\n"
            "    signal.pidfd_send_signal(os.pidfd_open(checker), signal.SIGKILL)\n"
            "    results['ptrace'] = 0 if libc.ptrace(16, checker, None, None) == 0 else ctypes.get_errno()\n"
            "    pidfd = os.pidfd_open(checker)\n"
            "    results['pidfd_getfd'] = 0 if libc.syscall(438, pidfd, 1, 0) >= 0 else ctypes.get_errno()\n"
            "    results['/proc'] = os.path.exists('/proc/1/mem')\n"
            "    return results\n")
        checker = ("import errno\n"
                   "def check(candidate):\n"
                   "    results = candidate()\n"
                   "    assert results == {'parent': 1, 'ptrace': errno.EPERM, 'pidfd_getfd': errno.EPERM,\n"
                   "                       '/proc': False}, results\n")
        outcome = self.run_one(solution, checker)
        self.assertEqual((outcome.status, outcome.detail), ("passed", ""))

    def test_early_exits_do_not_pass(self):
        checker = "def check(candidate):\n    assert candidate() == 1\n"
        for exit_line, detail in [("import sys; sys.exit(0)", "SystemExit: 0"),
                                  ("import os; os._exit(0)", "the solution's process ended (exit status 0)"),
                                  ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
                                   "the solution's process was killed by signal SIGKILL"),
                                  ("raise KeyboardInterrupt", "KeyboardInterrupt")]:
            for hook in (False, True):
                if hook and "os.kill" in exit_line:
                    detail = "PermissionError: kvdrift sandbox: os.kill refused"
                with self.subTest(exit=exit_line, hook=hook):
                    for solution in (f"{exit_line}\ndef f():\n    return 1\n", f"def f():\n    {exit_line}\n"):
                        outcome = self.run_one(solution, checker, hook=hook)
                        self.assertEqual((outcome.status, outcome.detail), ("failed", detail))

    def test_values_cross_as_plain_data(self):
        value = ("(1, -2**70, 2.5, float('inf'), 'x\\u00e9', b'\\x00\\xff', [None, True, False], "
                 "{'k': (1,), (2, 3): [4]}, {1, 2}, frozenset({'a'}), 1j, [])")
        solution = f"def f(*args, **kwargs):\n    assert args == (3, [4]) and kwargs == {{'z': {{5: 6}}}}\n    return {value}\n"
        checker = (f"import math\ndef check(candidate):\n    got = candidate(3, [4], z={{5: 6}})\n    assert got == {value}, got\n"
                   "    assert [type(v) for v in got] == [type(v) for v in " + value + "]\n")
        outcome = self.run_one(solution, checker)
        self.assertEqual((outcome.status, outcome.detail), ("passed", ""))
        # An object equal to everything is not a value: it cannot make a wrong solution pass.
        liar = "class Any:\n    def __eq__(self, other):\n        return True\n\ndef f():\n    return Any()\n"
        outcome = self.run_one(liar, "def check(candidate):\n    assert candidate() == [1, 2]\n")
        self.assertEqual(outcome.status, "failed")
        self.assertTrue(outcome.detail.startswith("TypeError: a Any cannot cross the sandbox"), outcome.detail)
        # Exceptions keep their builtin type and message, so tests that expect one see it.
        raiser = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return 1 // x\n"
        expects = ("def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError as e:\n"
                   "        assert str(e) == 'negative'\n    else:\n        assert False\n    candidate(0)\n")
        outcome = self.run_one(raiser, expects)
        self.assertEqual((outcome.status, outcome.detail), ("failed", "ZeroDivisionError: integer division or modulo by zero"))


class Sandbox(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.records = records()
        cls.task = cls.records["HumanEval/0"]
        cls.dir = support.scratch_dir("sandbox")
        cls.canonical = cls.task["canonical_solution"]

    def program(self, body_first_lines):
        """The task's program whose completion runs `body_first_lines`, then the correct solution: it
        passes exactly when those lines do not raise."""
        return humaneval.program(self.task, body_first_lines + self.canonical)

    def test_canonical_solutions_pass_and_wrong_ones_fail(self):
        # Tasks whose answers are bools, ints, floats, strings, lists, tuples and dicts, and whose tests
        # use the prompt's helpers (32: poly, 38: encode_cyclic, 50: encode_shift). All 164 canonical
        # solutions pass (about 13 s on two cores); these are a quick sample.
        ids = [f"HumanEval/{n}" for n in (0, 2, 8, 12, 20, 32, 38, 50, 53, 107, 111, 136, 148, 155, 158, 163)]
        tasks = [self.records[i] for i in ids]
        right = humaneval.run_programs([humaneval.program(t, t["canonical_solution"]) for t in tasks],
                                       timeout=8, jobs=2)
        self.assertEqual({i: (o.status, o.detail) for i, o in zip(ids, right)}, {i: ("passed", "") for i in ids})
        wrong = humaneval.run_programs([humaneval.program(self.task, "    return False\n"),
                                        humaneval.program(self.task, "    return 1 / 0\n")], timeout=8, jobs=2)
        self.assertEqual([(o.status, o.detail) for o in wrong],
                         [("failed", "AssertionError"), ("failed", "ZeroDivisionError: division by zero")])

    def test_infinite_loop_is_killed_at_the_time_limit(self):
        start = time.monotonic()
        outcome, = humaneval.run_programs([humaneval.program(self.task, "    while True:\n        pass\n")],
                                          timeout=1.5)
        elapsed = time.monotonic() - start
        self.assertEqual(outcome.status, "timeout")
        self.assertGreaterEqual(elapsed, 1.5)
        self.assertLess(elapsed, 6.0)

    def test_writes_outside_the_temporary_directory_fail(self):
        # The hook refuses, with its message, writes outside the sandbox's /tmp (paths as the sandbox
        # sees them); this machine's own folders are not in the sandbox at all.
        refused = {
            "open": "    open('/usr/kvdrift-new.txt', 'w').write('x')\n",
            "append": "    import os\n    open(os.__file__, 'a').write('x')\n",
            "os.open": "    import os\n    os.open('/kvdrift/fd.txt', os.O_CREAT | os.O_WRONLY)\n",
            "remove": "    import os\n    os.remove(os.__file__)\n",
            "mkdir": "    import os\n    os.mkdir('/usr/kvdrift-sub')\n",
            "rename": "    import os\n    os.rename(os.__file__, 'stolen.py')\n",
            "symlink": "    import os\n    os.symlink('/usr', 'link')\n",
            "dir_fd remove": "    import os\n    os.remove('os.py', dir_fd=os.open(os.path.dirname(os.__file__), os.O_RDONLY))\n",
        }
        outside = os.path.join(self.dir, "outside")
        os.makedirs(outside, exist_ok=True)
        victim = os.path.join(outside, "keep.txt")
        with open(victim, "w") as f:
            f.write("keep")
        host = {
            "host open": f"    open({os.path.join(outside, 'new.txt')!r}, 'w').write('x')\n",
            "host append": f"    open({victim!r}, 'a').write('x')\n",
            "host remove": f"    import os\n    os.remove({victim!r})\n",
            "host dir_fd open": f"    import os\n    os.open('x', os.O_CREAT | os.O_WRONLY, dir_fd=os.open({outside!r}, os.O_RDONLY))\n",
        }
        outcomes = humaneval.run_programs([self.program(a) for a in list(refused.values()) + list(host.values())],
                                          timeout=8, jobs=2)
        for name, outcome in zip(list(refused) + list(host), outcomes):
            with self.subTest(attempt=name):
                self.assertEqual(outcome.status, "failed")
                if name in refused:
                    self.assertTrue(outcome.detail.startswith("PermissionError: kvdrift sandbox: "), outcome.detail)
        self.assertEqual(sorted(os.listdir(outside)), ["keep.txt"])
        with open(victim) as f:
            self.assertEqual(f.read(), "keep")

    def test_writes_inside_the_temporary_directory_work(self):
        solution = ("import os, tempfile\nos.mkdir('d')\nopen('d/f.txt', 'w').write('x')\n"
                    "os.rename('d/f.txt', 'g.txt')\nos.remove('g.txt')\ntempfile.NamedTemporaryFile('w').close()\n"
                    "def f():\n    return os.getcwd()\n")
        checker = "def check(c):\n    print('tests may print')\n    assert c() == '/tmp'\n"
        outcome, = humaneval.run_programs([humaneval.Program(solution, checker, "f")], timeout=8)
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
            for hook in (True, False):
                outcomes = humaneval.run_programs([self.program(a) for a in attempts], timeout=8, jobs=2, hook=hook)
                for attempt, outcome in zip(attempts, outcomes):
                    with self.subTest(attempt=attempt, hook=hook):
                        self.assertEqual(outcome.status, "failed")
                        if hook:
                            self.assertRegex(outcome.detail, r"kvdrift sandbox: socket\.\w+ refused")
                        else:  # a network namespace of its own: nothing listens, no route, no names
                            self.assertRegex(outcome.detail, r"^(ConnectionRefusedError|urllib\.error\.URLError|OSError)")
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
            "guard off, then ctypes": GUARD_OFF + "    import ctypes\n",
        }
        outcomes = humaneval.run_programs([self.program(a) for a in attempts.values()], timeout=8, jobs=2)
        for name, outcome in zip(attempts, outcomes):
            with self.subTest(attempt=name):
                self.assertEqual(outcome.status, "failed")
                self.assertTrue(outcome.detail.startswith("PermissionError: kvdrift sandbox: "), outcome.detail)
        os.kill(os.getpid(), 0)  # still here

    def test_resource_limits(self):
        outcomes = humaneval.run_programs([
            self.program("    x = bytearray(2 << 30)\n"),
            self.program("    open('big', 'wb').write(b'x' * (32 << 20))\n")], timeout=8)
        self.assertEqual([(o.status, o.detail) for o in outcomes],
                         [("failed", "MemoryError"), ("failed", "OSError: [Errno 27] File too large")])

    def test_network_namespace_has_only_loopback(self):
        solution = "import socket\ndef f():\n    return [n for _, n in socket.if_nameindex()]\n"
        outcome, = humaneval.run_programs([humaneval.Program(solution, "def check(c):\n    assert c() == ['lo']\n",
                                                             "f")], timeout=8)
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

    def test_no_sandbox_no_scoring(self):
        # Where bubblewrap is missing, or cannot make namespaces (non-root without user namespaces, a
        # container that forbids them), score.py refuses in one line and writes nothing.
        directory = support.scratch_dir("score_humaneval_nosandbox")
        # The stand-in bwrap runs as the sandbox's user (nobody, under root): in the system's temporary
        # folder, which that user can reach (KVDRIFT_TEST_TMP may be under /root).
        fake = tempfile.mkdtemp(prefix="kvdrift-fake-bwrap-")
        self.addCleanup(shutil.rmtree, fake, ignore_errors=True)
        os.chmod(fake, 0o755)
        reason = ("bwrap: No permissions to create a new namespace, likely because the kernel does not allow "
                  "non-privileged user namespaces.")
        with open(os.path.join(fake, "bwrap"), "w") as f:
            f.write(f"#!/bin/sh\necho '{reason}' >&2\nexit 1\n")
        os.chmod(os.path.join(fake, "bwrap"), 0o755)
        empty = os.path.join(directory, "empty")
        os.makedirs(empty)
        path = humaneval_run(os.path.join(directory, "run.h5"), [records()["HumanEval/0"]["canonical_solution"]])
        for search, why in ((fake, f"bwrap cannot make the sandbox here: {reason}"),
                            (empty, "bubblewrap is not installed (no bwrap on PATH; scripts/setup.sh installs it)")):
            with self.subTest(path=search):
                result = subprocess.run([support.PYTHON, SCORE, path], capture_output=True, text=True, timeout=120,
                                        env=dict(os.environ, MPLBACKEND="Agg", PATH=search))
                self.assertEqual(result.returncode, 1)
                self.assertEqual(result.stderr, f"score.py: error: {path}: cannot score HumanEval: {why} (its "
                                                "programs run only in a sandbox, never unconfined; docs/analysis.md)\n")
                with h5py.File(path, "r") as f:
                    self.assertNotIn("scores", f)


if __name__ == "__main__":
    unittest.main()
