"""HumanEval scoring: each program runs in a kernel sandbox of its own (bubblewrap), never in the
scoring process (docs/analysis.md, *HumanEval*).

A program is the task's prompt + the model's completion (the solution) and the task's prompt + tests
(the checker). Inside one sandbox (`bwrap`: new user, mount, pid, network, IPC and UTS namespaces; a
read-only view of /usr and the interpreter's prefix; one writable 64 MiB tmpfs at /tmp; an
unprivileged user; no capabilities), sandbox_guard.py runs the checker as pid 1 and the solution as
its child, which cannot fork (RLIMIT_NPROC 0). The checker calls the solution's entry point through
a proxy that passes plain data only, and the verdict is the checker's exit status and stdout: 0 and
`passed` only when `check(...)` returned. Nothing outlives scoring: the sandbox leader gets SIGKILL
when this process dies (PR_SET_PDEATHSIG, set after the switch to the sandbox user, which would clear
it), the checker when bwrap dies (--die-with-parent), and everything else when the checker, pid 1 of
the namespace, dies. Where the sandbox cannot be made (no bubblewrap, no user namespaces), scoring is
refused (SandboxUnavailable) rather than run unconfined.
"""
import collections
import ctypes
import gzip
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

GUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_guard.py")
GUARD_INSIDE = "/kvdrift/sandbox_guard.py"
# Codex paper (Chen et al. 2021): a completion ends where the model starts a new top-level block.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
SANDBOX_USER = 65534  # nobody: the sandbox's user when scoring runs as root
TMPFS_BYTES = 64 << 20  # the one writable folder, /tmp (and the cwd) of the sandbox
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
# Top-level links or folders of the system's libraries and programs (usrmerge: links into /usr).
SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class Program(collections.namedtuple("Program", "solution checker entry_point")):
    """solution: model-written code that defines entry_point (runs confined, no fork); checker: trusted
    code (the data set's prompt and tests) that defines check(candidate), run against a proxy of it."""


class SandboxUnavailable(Exception):
    """This machine cannot confine HumanEval programs; the message says why, in one line."""


def truncate_completion(completion):
    cut = min((i for i in (completion.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(completion))
    return completion[:cut]


def program(record, completion):
    """The HumanEval program of a completion: solution prompt + completion, checker prompt + test, whose
    check(candidate) gets the entry point."""
    return Program(record["prompt"] + truncate_completion(completion) + "\n",
                   record["prompt"] + "\n\n" + record["test"] + "\n", record["entry_point"])


def load_records(path):
    """HumanEval records by task_id from a .jsonl or .jsonl.gz file."""
    opener = gzip.open if path.endswith(".gz") else open
    records = {}
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = [k for k in ("task_id", "prompt", "test", "entry_point") if k not in record]
            if missing:
                raise ValueError(f"{path} line {number}: not a HumanEval record (no {', '.join(missing)})")
            records[record["task_id"]] = record
    return records


def _reachable(path, uid):
    """Whether `uid` (None: this process's) may execute `path`: as another user than ours, by the
    'other' permission bits of the file and of every folder above it."""
    if uid is None:
        return os.access(path, os.X_OK)
    parts = path.split(os.sep)
    for depth in range(1, len(parts)):
        folder = os.sep.join(parts[:depth]) or os.sep
        try:
            mode = os.stat(folder).st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return bool(mode & stat.S_IXOTH and mode & stat.S_IROTH)


class Sandbox:
    """The bubblewrap command line and credentials of this machine's sandboxes."""

    def __init__(self):
        self.bwrap = shutil.which("bwrap")
        if not self.bwrap:
            raise SandboxUnavailable("bubblewrap is not installed (no bwrap on PATH; scripts/setup.sh installs it)")
        self.uid = SANDBOX_USER if os.geteuid() == 0 else None
        base = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        candidates = [base, os.path.realpath("/usr/bin/python3")]
        self.python = next((c for c in candidates if os.path.isfile(c) and _reachable(c, self.uid)), None)
        if self.python is None:
            who = f"user {self.uid}" if self.uid is not None else "this user"
            raise SandboxUnavailable(f"no Python interpreter that the sandbox's {who} may run "
                                     f"(tried {', '.join(candidates)})")
        # The interpreter's installation: PREFIX/bin/python3.X beside PREFIX/lib/python3.X.
        self.prefix = os.path.dirname(os.path.dirname(self.python))

    def command(self, guard_fd):
        args = [self.bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                "--unshare-cgroup-try", "--disable-userns", "--hostname", "kvdrift-sandbox",
                "--die-with-parent", "--new-session", "--as-pid-1", "--cap-drop", "ALL", "--clearenv",
                "--ro-bind", "/usr", "/usr"]
        for path in SYSTEM_DIRS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        if self.prefix not in ("/", "/usr") + SYSTEM_DIRS and not self.prefix.startswith("/usr/"):
            args += ["--ro-bind", self.prefix, self.prefix]  # /opt/python, ~/.pyenv/versions/X, ...
        args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        for device in DEVICES:
            args += ["--dev-bind", device, device]
        args += ["--size", str(TMPFS_BYTES), "--tmpfs", "/tmp", "--ro-bind-data", str(guard_fd), GUARD_INSIDE,
                 "--remount-ro", "/", "--chdir", "/tmp", "--", self.python, "-I", "-S", "-B", GUARD_INSIDE, "check"]
        return args


class Outcome:
    def __init__(self, status, detail):
        self.status = status   # "passed", "failed" or "timeout"
        self.detail = detail   # the checker's one line on why it failed, or why it was stopped

    @property
    def passed(self):
        return self.status == "passed"

    def __repr__(self):
        return f"Outcome({self.status!r}, {self.detail!r})"


def _leader_setup(scorer):
    """In the sandbox leader (bwrap), after the switch to the sandbox's user and before exec: die with
    the scorer, and not start at all if it is already gone."""
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != scorer:
        os._exit(126)


class _Job:
    def __init__(self, sandbox, program, timeout, hook):
        self.directory = tempfile.mkdtemp(prefix="kvdrift-humaneval-")  # this side's files, not visible inside
        job = {"solution": program.solution, "checker": program.checker, "entry_point": program.entry_point,
               "cpu_seconds": int(timeout) + 1, "hook": bool(hook)}
        with open(os.path.join(self.directory, "job.json"), "w", encoding="utf-8") as out:
            json.dump(job, out)
        self.process = None
        guard = os.open(GUARD, os.O_RDONLY | os.O_CLOEXEC)  # bwrap copies it in; its path may be out of reach
        try:
            with open(os.path.join(self.directory, "job.json"), "rb") as stdin, \
                    open(os.path.join(self.directory, "stdout"), "wb") as stdout, \
                    open(os.path.join(self.directory, "stderr"), "wb") as stderr:
                scorer = os.getpid()
                ids = {} if sandbox.uid is None else {"user": sandbox.uid, "group": sandbox.uid, "extra_groups": []}
                self.process = subprocess.Popen(
                    sandbox.command(guard), stdin=stdin, stdout=stdout, stderr=stderr, env={}, cwd="/",
                    pass_fds=(guard,), start_new_session=True, preexec_fn=lambda: _leader_setup(scorer), **ids)
        except BaseException as error:
            shutil.rmtree(self.directory, ignore_errors=True)
            if isinstance(error, OSError):  # bwrap missing, or out of the sandbox user's reach
                raise SandboxUnavailable(f"cannot start {sandbox.bwrap}: {error.strerror or error}") from None
            raise
        finally:
            os.close(guard)
        self.deadline = time.monotonic() + timeout

    def finish(self, timed_out):
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # bwrap; the checker and the namespace follow it
        except ProcessLookupError:
            pass
        self.process.wait()
        output = _tail(os.path.join(self.directory, "stdout"))
        errors = _tail(os.path.join(self.directory, "stderr")).strip().splitlines()
        shutil.rmtree(self.directory, ignore_errors=True)
        if timed_out:
            return Outcome("timeout", "killed at the time limit")
        if self.process.returncode == 0 and output == "passed\n":
            return Outcome("passed", "")
        if errors:
            return Outcome("failed", errors[-1])
        if self.process.returncode < 0:
            return Outcome("failed", f"killed by signal {signal.Signals(-self.process.returncode).name}")
        return Outcome("failed", f"exit status {self.process.returncode}")


def _tail(path, size=4096):
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - size))
        return f.read().decode("utf-8", "replace")


_PROBE = Program("def probe():\n    return (1, [2.5], {'x': None})\n",
                 "def check(candidate):\n    assert candidate() == (1, [2.5], {'x': None})\n", "probe")
_sandboxes = {}


def sandbox():
    """This machine's Sandbox, tried once per process on a program that must pass; SandboxUnavailable
    (one line: bwrap's own reason where it gives one) where it cannot confine programs."""
    key = shutil.which("bwrap")
    if key not in _sandboxes:
        try:
            box = Sandbox()
            outcome, = _run(box, [_PROBE], timeout=30.0, jobs=1, hook=True)
            if not outcome.passed:
                raise SandboxUnavailable(f"bwrap cannot make the sandbox here: {outcome.detail}")
            _sandboxes[key] = box
        except SandboxUnavailable as error:
            _sandboxes[key] = error
    if isinstance(_sandboxes[key], SandboxUnavailable):
        raise _sandboxes[key]
    return _sandboxes[key]


def run_programs(programs, timeout=10.0, jobs=1, hook=True):
    """Runs each Program in its own sandbox, `jobs` at a time; returns one Outcome per program.

    All children are started and watched from this thread (subprocess's preexec_fn is unsafe with
    threads, and PR_SET_PDEATHSIG follows the thread that started them). `hook` False leaves out the
    solution's audit hook, for tests of the kernel's confinement alone. SandboxUnavailable where this
    machine cannot confine the programs.
    """
    return _run(sandbox(), programs, timeout, jobs, hook)


def _run(box, programs, timeout, jobs, hook):
    outcomes = [None] * len(programs)
    waiting = list(enumerate(programs))
    running = {}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                index, program = waiting.pop(0)
                running[index] = _Job(box, program, timeout, hook)
            for index, job in list(running.items()):
                ended = job.process.poll() is not None
                if ended or time.monotonic() >= job.deadline:
                    outcomes[index] = job.finish(timed_out=not ended)
                    del running[index]
            time.sleep(0.005)
    finally:
        for job in running.values():  # interrupted: leave no child behind
            job.finish(timed_out=True)
    return outcomes
