"""HumanEval scoring: each program runs in its own sandboxed Python process (docs/analysis.md).

The child is `python3 -I -B sandbox_guard.py program.py` in a fresh temporary directory
(its cwd), with an empty environment, stdin carrying only the pass token, stdout/stderr in files of
that directory, its own session (so a timeout kills the whole process group), resource limits set
before exec (CPU time, address space, file size, processes, open files, no core dumps) and, where
the kernel lets this process create one, a network namespace of its own with no interfaces up.
The guard's audit hook refuses network, process creation, signals, ctypes and writes outside the
directory whether or not the namespace could be made.
"""
import ctypes
import gzip
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

PYTHON = sys.executable  # stdlib only is needed; -I keeps the venv's site-packages out
GUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_guard.py")
# Codex paper (Chen et al. 2021): a completion ends where the model starts a new top-level block.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MEMORY_LIMIT_BYTES = 1 << 30
FILE_SIZE_LIMIT_BYTES = 16 << 20
OPEN_FILES_LIMIT = 64

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def truncate_completion(completion):
    cut = min((i for i in (completion.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(completion))
    return completion[:cut]


def program_text(record, completion):
    """The HumanEval program: prompt + completion + the task's tests + check(entry_point)."""
    return (record["prompt"] + truncate_completion(completion) + "\n\n" + record["test"] + "\n\n"
            + f"check({record['entry_point']})\n")


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


def _unshare_network(flags):
    if _libc.unshare(flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def network_namespace_flags():
    """unshare(2) flags that give a child its own network namespace here, or 0 when none work
    (no CAP_SYS_ADMIN and no unprivileged user namespaces, as in many containers)."""
    for flags in (_CLONE_NEWNET, _CLONE_NEWUSER | _CLONE_NEWNET):
        try:
            subprocess.run([PYTHON, "-I", "-c", "pass"], preexec_fn=lambda: _unshare_network(flags),
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={}, check=True, timeout=30)
            return flags
        except (subprocess.SubprocessError, OSError):
            continue
    return 0


class Outcome:
    def __init__(self, status, detail):
        self.status = status   # "passed", "failed" or "timeout"
        self.detail = detail   # last line of the child's stderr, or why it was stopped

    @property
    def passed(self):
        return self.status == "passed"


class _Job:
    def __init__(self, program, timeout, netns_flags):
        self.directory = tempfile.mkdtemp(prefix="kvdrift-humaneval-")
        self.token = secrets.token_hex(16)
        path = os.path.join(self.directory, "program.py")
        with open(path, "w") as out:
            out.write(program)
        self.stdout = open(os.path.join(self.directory, "stdout"), "wb")
        self.stderr = open(os.path.join(self.directory, "stderr"), "wb")
        cpu_seconds = int(timeout) + 1

        def limit():
            if netns_flags:
                _unshare_network(netns_flags)
            for kind, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, MEMORY_LIMIT_BYTES),
                                (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT_BYTES), (resource.RLIMIT_NPROC, 0),
                                (resource.RLIMIT_NOFILE, OPEN_FILES_LIMIT), (resource.RLIMIT_CORE, 0)):
                resource.setrlimit(kind, (value, value))

        self.process = subprocess.Popen(
            [PYTHON, "-I", "-B", GUARD, path], cwd=self.directory, env={}, stdin=subprocess.PIPE,
            stdout=self.stdout, stderr=self.stderr, start_new_session=True, preexec_fn=limit)
        try:
            self.process.stdin.write(self.token.encode() + b"\n")
            self.process.stdin.close()
        except BrokenPipeError:
            pass  # the child died before reading; its exit status tells
        self.deadline = time.monotonic() + timeout

    def finish(self, timed_out):
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the child and anything it left behind
        except ProcessLookupError:
            pass
        self.process.wait()
        self.stdout.close()
        self.stderr.close()
        output = _tail(os.path.join(self.directory, "stdout"))
        errors = _tail(os.path.join(self.directory, "stderr")).strip().splitlines()
        shutil.rmtree(self.directory, ignore_errors=True)
        if timed_out:
            return Outcome("timeout", "killed at the time limit")
        if self.process.returncode == 0 and output.rstrip().endswith(self.token):
            return Outcome("passed", "")
        if self.process.returncode < 0:
            return Outcome("failed", f"killed by signal {signal.Signals(-self.process.returncode).name}")
        return Outcome("failed", errors[-1] if errors else f"exit status {self.process.returncode}")


def _tail(path, size=4096):
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - size))
        return f.read().decode("utf-8", "replace")


def run_programs(programs, timeout=10.0, jobs=1, netns_flags=None):
    """Runs each program in its own sandbox, `jobs` at a time; returns one Outcome per program.

    All children are started and watched from this thread (subprocess's preexec_fn is unsafe with
    threads). `netns_flags` None probes network_namespace_flags().
    """
    if netns_flags is None:
        netns_flags = network_namespace_flags()
    outcomes = [None] * len(programs)
    waiting = list(enumerate(programs))
    running = {}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                index, program = waiting.pop(0)
                running[index] = _Job(program, timeout, netns_flags)
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
