"""Runs inside the HumanEval sandbox child (started by humaneval.py, never imported by it).

    python3 -I -B sandbox_guard.py PROGRAM.py   (cwd: the run's temporary directory)

Reads the pass token from stdin, installs an audit hook that refuses network, process creation,
signals to other processes, ctypes and any write outside the current directory, then executes the
program. Prints the token as the last line only when the program ran to its end without raising.
The hook guards against accidents of model-written code; it is not a boundary against an attacker
(docs/analysis.md says what it does not stop).
"""
import os
import sys
import traceback

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_REFUSED = {
    "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "os.startfile",
}
_REFUSED_PREFIXES = ("ctypes.",)
# Modules that reach the operating system past the audited calls (fork_exec has no audit event).
_REFUSED_IMPORTS = {"_posixsubprocess", "ctypes", "_ctypes"}
# Events whose first argument is a path that is created, changed or removed.
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags", "os.mkfifo", "os.mknod",
                "shutil.rmtree", "sqlite3.connect", "dbm.open"}
_TWO_PATH_EVENTS = {"os.rename", "os.link", "os.symlink"}


def _install(root):
    def inside(path, dir_fd=None):
        if isinstance(path, int):
            return True  # an already-open descriptor: its opening was checked
        path = os.fsdecode(path)
        if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        resolved = os.path.realpath(path)
        return resolved == root or resolved.startswith(root + os.sep)

    def refuse(event, detail=""):
        raise PermissionError(f"kvdrift sandbox: {event} refused{detail}")

    def hook(event, args):
        if event == "open":
            path, _, flags = args
            if (flags or 0) & _WRITE_FLAGS and not inside(path):
                refuse("writing", f" outside the sandbox directory: {path}")
        elif event in _PATH_EVENTS:
            dir_fd = args[-1] if len(args) > 1 and isinstance(args[-1], int) else None
            if not inside(args[0], dir_fd):
                refuse(event, f" outside the sandbox directory: {args[0]}")
        elif event in _TWO_PATH_EVENTS:
            if not inside(args[0]) or not inside(args[1]):
                refuse(event, f" outside the sandbox directory: {args[0]} -> {args[1]}")
        elif event in _REFUSED or event.startswith(_REFUSED_PREFIXES):
            refuse(event)
        elif event == "import" and args[0] in _REFUSED_IMPORTS:
            refuse(f"import of {args[0]}")

    sys.addaudithook(hook)


def main():
    program_path = sys.argv[1]
    token = sys.stdin.readline().strip()
    with open(program_path) as source:
        code = compile(source.read(), os.path.basename(program_path), "exec")
    _install(os.path.realpath(os.getcwd()))
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as error:  # SystemExit too: a program that exits early did not pass
        traceback.print_exception(type(error), error, error.__traceback__)
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.write(f"\n{token}\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
