"""Runs inside the HumanEval sandbox (started by humaneval.py through bubblewrap, never imported by it).

Two processes, both inside the same kernel sandbox (docs/analysis.md, *HumanEval*):

    python -I -S -B sandbox_guard.py check   the checker: pid 1 of the sandbox's pid namespace.
        stdin: the job (JSON: solution, checker, entry_point, cpu_seconds, hook). It runs the task's
        tests (`checker`: the prompt and the test code of the data set, never model text) against a
        proxy of the candidate function, and writes `passed` to its stdout only when `check(...)`
        returned; otherwise the reason as the last line of its stderr, and exit status 1.
    python -I -S -B sandbox_guard.py solve   the solution: the model-written program (prompt +
        completion), started by the checker with no way to fork (RLIMIT_NPROC 0), stdout and stderr
        on /dev/null and stdin a socket to the checker. It runs the program, then answers calls of
        the entry point, arguments and results passed as plain data (JSON with a few tags).

The verdict is the checker's, and the checker holds nothing the solution could use to forge it: no
token, no file the solution can see (its stdout belongs to the scorer, its memory is not dumpable, so
no ptrace, /proc/PID/mem or pidfd_getfd), and values come back as data (None, bool, int, float, str,
bytes, list, tuple, dict, set, frozenset, complex), never as objects whose methods could run in the
checker. As pid 1 of the namespace the checker receives no signal from the solution that it has no
handler for. The solution's audit hook (`hook`) is a guard against accidents, with friendly messages;
the boundary is the kernel's: namespaces, a read-only file system and the limits (humaneval.py).
"""
import builtins
import json
import os
import struct
import sys
import traceback

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_REFUSED = frozenset({
    "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "os.startfile",
})
_REFUSED_PREFIXES = ("ctypes.",)
# Modules that reach the operating system past the audited calls (fork_exec has no audit event).
_REFUSED_IMPORTS = frozenset({"_posixsubprocess", "ctypes", "_ctypes"})
# Events whose first argument is a path that is created, changed or removed.
_PATH_EVENTS = frozenset({"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                          "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags", "os.mkfifo", "os.mknod",
                          "shutil.rmtree", "sqlite3.connect", "dbm.open"})
_TWO_PATH_EVENTS = frozenset({"os.rename", "os.link", "os.symlink"})

MEMORY_LIMIT_BYTES = 1 << 30
FILE_SIZE_LIMIT_BYTES = 16 << 20
OPEN_FILES_LIMIT = 64
MESSAGE_LIMIT_BYTES = 64 << 20  # the largest reply the checker reads
_PR_SET_DUMPABLE = 4


# ------------------------------------------------------------------------------------------------
# Plain data across the process boundary.

def encode(value, depth=0):
    """JSON-able form of a plain value; TypeError for anything else (objects, functions, generators)."""
    if depth > 100:
        raise ValueError("value nested more than 100 deep")
    if value is None or type(value) is bool:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, list):
        return [encode(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [encode(v, depth + 1) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if isinstance(value, frozenset):
        return {"frozenset": [encode(v, depth + 1) for v in value]}
    if isinstance(value, set):
        return {"set": [encode(v, depth + 1) for v in value]}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    raise TypeError(f"a {type(value).__name__} cannot cross the sandbox (plain data only: None, bool, int, "
                    "float, str, bytes, list, tuple, dict, set, frozenset, complex)")


def decode(value):
    """The value encode() made; ValueError for anything else (the other side is not trusted)."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) is list:
        return [decode(v) for v in value]
    if type(value) is dict and len(value) == 1:
        (tag, items), = value.items()
        if tag == "bytes" and type(items) is str:
            return bytes.fromhex(items)
        if type(items) is list:
            if tag == "tuple":
                return tuple(decode(v) for v in items)
            if tag == "set":
                return {decode(v) for v in items}
            if tag == "frozenset":
                return frozenset(decode(v) for v in items)
            if tag == "dict" and all(type(p) is list and len(p) == 2 for p in items):
                return {decode(k): decode(v) for k, v in items}
            if tag == "complex" and len(items) == 2 and all(type(v) in (int, float) for v in items):
                return complex(items[0], items[1])
    raise ValueError("not a value encode() writes")


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd, size):
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def send(fd, message):
    data = json.dumps(message, allow_nan=True).encode("utf-8")
    _write_all(fd, struct.pack(">Q", len(data)) + data)


def receive(fd, limit=MESSAGE_LIMIT_BYTES):
    """The next message, or None at end of file."""
    header = _read_exact(fd, 8)
    if header is None:
        return None
    size, = struct.unpack(">Q", header)
    if size > limit:
        raise ValueError(f"a message of {size} bytes (the limit is {limit})")
    data = _read_exact(fd, size)
    if data is None:
        return None
    return json.loads(data.decode("utf-8"))


def _exception_line(error):
    return traceback.format_exception_only(type(error), error)[-1].strip()


# ------------------------------------------------------------------------------------------------
# The solution's process.

def _install_hook(root):
    """Audit hook against accidents of model-written code (not a boundary: see the module docstring)."""
    # Bound here rather than read from module globals at each event, which a program reaches through
    # sys.modules['__main__'] (still not a boundary: the closure's cells can be reached too).
    write_flags, refused, prefixes, imports = _WRITE_FLAGS, _REFUSED, _REFUSED_PREFIXES, _REFUSED_IMPORTS
    path_events, two_path_events = _PATH_EVENTS, _TWO_PATH_EVENTS
    fsdecode, join, isabs, realpath, readlink, sep = (os.fsdecode, os.path.join, os.path.isabs, os.path.realpath,
                                                      os.readlink, os.sep)

    def inside(path, dir_fd=None):
        if isinstance(path, int):
            return True  # an already-open descriptor: its opening was checked
        path = fsdecode(path)
        if isinstance(dir_fd, int) and dir_fd >= 0 and not isabs(path):
            try:
                path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
            except OSError:
                return False
        resolved = realpath(path)
        return resolved == root or resolved.startswith(root + sep)

    def refuse(event, detail=""):
        raise PermissionError(f"kvdrift sandbox: {event} refused{detail}")

    def hook(event, args):
        if event == "open":
            path, _, flags = args
            if (flags or 0) & write_flags and not inside(path):
                refuse("writing", f" outside the sandbox directory: {path}")
        elif event in path_events:
            dir_fd = args[-1] if len(args) > 1 and isinstance(args[-1], int) else None
            if not inside(args[0], dir_fd):
                refuse(event, f" outside the sandbox directory: {args[0]}")
        elif event in two_path_events:
            if not inside(args[0]) or not inside(args[1]):
                refuse(event, f" outside the sandbox directory: {args[0]} -> {args[1]}")
        elif event in refused or event.startswith(prefixes):
            refuse(event)
        elif event == "import" and args[0] in imports:
            refuse(f"import of {args[0]}")

    sys.addaudithook(hook)


def solve(hook):
    channel = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # input() reads nothing; the socket stays the checker's channel
    os.close(null)
    job = receive(channel)
    if job is None:
        return
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    if hook:
        _install_hook(os.path.realpath(os.getcwd()))
    try:
        exec(compile(job["source"], "solution.py", "exec"), namespace)
        function = namespace[job["entry_point"]]
        reply = {"ready": True}
    except BaseException as error:  # SystemExit too: the checker reports it
        reply = {"raised": type(error).__name__, "line": _exception_line(error)}
    send(channel, reply)
    if "raised" in reply:
        return
    while True:
        call = receive(channel)
        if call is None:
            return
        try:
            result = function(*decode(call["args"]), **decode(call["kwargs"]))
            reply = {"value": encode(result)}
        except BaseException as error:
            reply = {"raised": type(error).__name__, "line": _exception_line(error)}
        send(channel, reply)


# ------------------------------------------------------------------------------------------------
# The checker's process.

class _Failure(BaseException):
    """Why the candidate failed, as the one line the scorer reports. Not an Exception, so that a test's
    `except Exception` does not swallow it (nor a SystemExit of the solution's)."""


def _raised(reply):
    """The exception a call of the candidate raised, rebuilt here as a builtin exception of the same name
    (so that a test expecting ValueError sees one) with the solution's line for the report."""
    name, line = str(reply.get("raised")), str(reply.get("line"))[:1000]
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, BaseException) and not issubclass(cls, Exception):
        return _Failure(line)  # SystemExit, KeyboardInterrupt: never raised here as themselves
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = RuntimeError
    message = line.split(": ", 1)[1] if ": " in line else ""
    try:
        error = cls(message)
    except Exception:
        error = RuntimeError(message)
    error.kvdrift_line = line
    return error


class _Candidate:
    def __init__(self, channel, process):
        self.channel, self.process = channel, process

    def ended(self):
        import subprocess
        try:
            status = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return _Failure("the solution's process stopped answering")
        if status < 0:
            import signal
            return _Failure(f"the solution's process was killed by signal {signal.Signals(-status).name}")
        return _Failure(f"the solution's process ended (exit status {status})")

    def reply(self):
        try:
            message = receive(self.channel)
        except (OSError, ValueError, RecursionError, MemoryError) as error:
            raise _Failure(f"unreadable reply from the solution ({_exception_line(error)})") from None
        if message is None:
            raise self.ended()
        if type(message) is not dict:
            raise _Failure("unreadable reply from the solution")
        return message

    def __call__(self, *args, **kwargs):
        try:
            send(self.channel, {"args": encode(list(args)), "kwargs": encode(kwargs)})
        except OSError:
            raise self.ended() from None
        message = self.reply()
        if "value" in message:
            try:
                return decode(message["value"])
            except (ValueError, TypeError, RecursionError, MemoryError) as error:
                raise _Failure(f"unreadable reply from the solution ({_exception_line(error)})") from None
        raise _raised(message)


def _set_limits(cpu_seconds):
    import resource
    for kind, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, MEMORY_LIMIT_BYTES),
                        (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT_BYTES), (resource.RLIMIT_NOFILE, OPEN_FILES_LIMIT),
                        (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(kind, (value, value))


def _no_more_processes():
    import resource
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def check():
    import ctypes
    import signal
    import socket
    import subprocess
    # Nothing of the solution runs yet. From here on no process of the sandbox's user can ptrace this
    # one, read its memory or take its descriptors.
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as pid 1, the solution's SIGINT is then ignored
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    _set_limits(int(job["cpu_seconds"]))
    ours, theirs = socket.socketpair()
    command = [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "solve"]
    if not job.get("hook", True):
        command.append("--no-hook")
    process = subprocess.Popen(command, stdin=theirs, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               close_fds=True, preexec_fn=_no_more_processes)
    theirs.close()
    _no_more_processes()
    candidate = _Candidate(ours.fileno(), process)
    try:
        send(candidate.channel, {"source": job["solution"], "entry_point": job["entry_point"]})
    except OSError:
        raise candidate.ended() from None
    ready = candidate.reply()
    if not ready.get("ready"):
        raise _raised(ready)
    namespace = {"__name__": "__kvdrift_check__", "__builtins__": builtins}
    exec(compile(job["checker"], "test.py", "exec"), namespace)
    namespace[job["entry_point"]] = candidate
    namespace["check"](candidate)
    process.kill()
    process.wait()
    return True


def main():
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    if role == "solve":
        solve(hook="--no-hook" not in sys.argv[2:])
        os._exit(0)
    if role != "check":
        sys.exit(f"usage: {sys.argv[0]} check|solve")
    verdict = os.dup(1)  # the scorer reads `passed` here; whatever the tests print goes to stderr
    os.dup2(2, 1)
    try:
        passed = check()
    except BaseException as error:  # anything but check() returning is a failure
        line = getattr(error, "kvdrift_line", None) or (str(error) if isinstance(error, _Failure)
                                                         else _exception_line(error))
        try:
            traceback.print_exception(type(error), error, error.__traceback__)
            sys.stderr.write("\n" + line.replace("\n", " ") + "\n")
            sys.stderr.flush()
        finally:
            os._exit(1)
    if passed is True:
        os.write(verdict, b"passed\n")
        os._exit(0)
    os._exit(1)


if __name__ == "__main__":
    main()
