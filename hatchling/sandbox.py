"""Running untrusted, model-written Python: hostile until proven otherwise.

``run_python(code, tests, timeout_s, memory_mb)`` runs ``code`` followed by ``tests`` in a child
process and never lets it hang or harm the harness. Layers, outermost first:

1. **Namespaces** (bubblewrap, where the kernel allows it): a read-only root, a private /tmp,
   home directories hidden, no network (a fresh network namespace), a private PID namespace, a
   new session, a cleared environment, and the child dies with the harness.
2. **Resource limits** (setrlimit): CPU seconds, address space, file size (which also caps
   output: stdout and stderr go to files), open files, and for non-root users process count.
3. **A guard** inside the interpreter (an audit hook, installed before the code runs and not
   removable from Python): no process creation (fork, exec, spawn, system, subprocess, fork_exec),
   no signals to other processes (kill, pidfd), no sockets, no ctypes, no writes or other changes
   to files outside the working directory (dir_fds and file descriptors resolved), no reads of
   other processes' /proc entries (their environment) or of home directories, no raising of the
   limits (setrlimit, prlimit), at most ``MAX_CREATED`` new files and directories (each capped in size
   by the limits, so the disk use is bounded too). The program cannot end itself early as a pass:
   a SystemExit (sys.exit, exit()) before the tests have run to the end is a failure (``exited``),
   os._exit is refused, and the guard ends the process itself once the tests are through (no atexit
   handler runs). bench/sandbox_escapes.py measures every layer against the escapes (docs/benchmarks.md).
4. **The harness**: a wall-clock timeout, then the whole process group is killed.

``Result.isolation`` says which outer layer was in force: ``"bwrap"`` or ``"guard"`` (limits,
guard and timeout only, when bubblewrap is missing, or refused: that is logged once as a warning,
with bwrap's own message).

Code that fails is a result (``passed`` False, and why). A sandbox that fails is not: when the
guard never got as far as running the code (bwrap could not set up, the interpreter could not
start), ``run_python`` raises :class:`SandboxError` with the child's own message. The guard says
it is in place on a pipe before the code runs, so nothing the code does can fake either case.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BLOCKED_MARK = "sandbox-blocked:"
EXITED_MARK = "sandbox-exited:"
MAX_CREATED = 64        # new files and directories a program may make in its working directory

logger = logging.getLogger(__name__)

# Installed in the child before the untrusted code runs (the child runs `python -I guard.py`).
GUARD = r'''
import os, sys, signal, _signal, _posixsubprocess
_ROOT = os.path.realpath(os.getcwd())
_PID = str(os.getpid())
# the interpreter may live under a home directory (pyenv): its own files stay readable
_PREFIXES = tuple({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                           sys.base_exec_prefix)})
_BLOCKED = {"os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.kill",
            "os.killpg", "subprocess.Popen", "socket.__new__", "socket.connect", "socket.bind",
            "socket.sendto", "ctypes.dlopen", "ctypes.dlsym", "ctypes.addressof", "ctypes.cdata",
            "sys.addaudithook", "os.chdir", "os.putenv", "os.setuid", "os.setgid", "pty.spawn",
            "resource.setrlimit", "resource.prlimit"}
# modules the guard has disarmed below: loading a fresh copy would arm them again
_NO_IMPORT = {"ctypes", "_ctypes", "_posixsubprocess", "_signal", "posix"}
# events that change the file system: (where a path is, where the dir_fd it is relative to is)
_PATH_EVENTS = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
                "os.link": ((0, 2), (1, 3)), "os.symlink": ((0, None), (1, 2)), "os.chmod": ((0, 2),),
                "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),),
                "shutil.rmtree": ((0, 1),)}
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_created = [0]      # files and directories the program has made (each file's size is capped by RLIMIT_FSIZE)


def _real(path):
    return os.path.realpath(os.fsdecode(path))


def _inside(path):
    real = _real(path)
    return real == _ROOT or real.startswith(_ROOT + os.sep)


def _target(args, where, dir_fd):
    """The path an event acts on: a file descriptor's own path, or a path relative to a dir_fd joined to it."""
    path = args[where]
    fd = args[dir_fd] if dir_fd is not None and dir_fd < len(args) else None
    if isinstance(path, int):
        return os.readlink(f"/proc/self/fd/{path}")
    if fd not in (None, -1) and not os.path.isabs(path):
        return os.path.join(os.readlink(f"/proc/self/fd/{fd}"), os.fsdecode(path))
    return path


def _secret(path):
    # other processes' /proc entries (their environment, memory, command line) and home directories
    real = _real(path) + os.sep
    if real.startswith("/proc/"):
        pid = real.split(os.sep)[2]
        return pid.isdigit() and pid != _PID
    return real.startswith(("/root/", "/home/")) and not real.startswith(_PREFIXES)


def _refuse(*args, **kwargs):
    raise PermissionError("MARK process creation, signals by pidfd and os._exit are not allowed")


def _create(path):
    """Count one more file or directory at `path` if it does not exist yet; refuse past MAX_CREATED."""
    if not os.path.lexists(path):
        _created[0] += 1
        if _created[0] > MAX_CREATED:
            raise PermissionError("MARK creating more than MAX_CREATED files and directories is not allowed")


def _guard(event, args):
    if event in _BLOCKED or (event == "import" and args[0] in _NO_IMPORT):
        what = f"import of {args[0]}" if event == "import" else event
        raise PermissionError(f"MARK {what} is not allowed")
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        mode, flags = args[1] or "", args[2] or 0
        if any(c in mode for c in "wax+") or flags & _WRITE:
            if not _inside(args[0]):
                raise PermissionError(f"MARK writing {args[0]} outside the sandbox is not allowed")
            _create(args[0])
        if _secret(args[0]):
            raise PermissionError(f"MARK reading {args[0]} is not allowed")
        if args[1] is None and not _inside(args[0]) and (flags & _WRITE or not os.path.isfile(args[0])):
            # os.open: a relative path may be relative to any dir_fd, and a directory's fd is a dir_fd
            raise PermissionError(f"MARK os.open of {args[0]} is not allowed")
    if event in ("os.listdir", "os.scandir") and isinstance(args[0], (str, bytes)) and _secret(args[0]):
        raise PermissionError(f"MARK listing {args[0]} is not allowed")
    if event in _PATH_EVENTS:
        try:
            inside = all(_inside(_target(args, where, fd)) for where, fd in _PATH_EVENTS[event] if where < len(args))
        except OSError:
            inside = False
        if not inside:
            raise PermissionError(f"MARK {event} outside the sandbox is not allowed")
        if event in ("os.mkdir", "os.symlink", "os.link"):
            _create(_target(args, *_PATH_EVENTS[event][-1]))


# calls that raise no audit event: a child made by fork_exec, a signal sent through a pidfd, an exit
# that would skip the tests (the guard keeps its own reference to end the process)
_exit = os._exit
_posixsubprocess.fork_exec = _refuse
for _module, _name in ((os, "pidfd_open"), (sys.modules["posix"], "pidfd_open"), (signal, "pidfd_send_signal"),
                       (_signal, "pidfd_send_signal"), (os, "_exit"), (sys.modules["posix"], "_exit")):
    if hasattr(_module, _name):
        setattr(_module, _name, _refuse)
sys.addaudithook(_guard)
del _guard
_ready = int(sys.argv.pop())        # the harness's pipe: one byte says the guard is in place
os.write(_ready, b"1")
os.close(_ready)
import runpy
try:
    runpy.run_path("program.py", run_name="__main__")
except SystemExit as e:
    sys.__stderr__.write(f"EXITED the program raised SystemExit({e.code!r}) before its tests had run to the end\n")
    sys.__stderr__.flush()
    _exit(1)
for _stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
    _stream.flush()
_exit(0)        # the tests are through: end here, before any atexit handler the program registered
'''.replace("MARK", BLOCKED_MARK).replace("EXITED", EXITED_MARK).replace("MAX_CREATED", str(MAX_CREATED))


class SandboxError(RuntimeError):
    """The sandbox could not run the code at all: a fault of the machine or the settings, not of the code."""


@dataclass
class Result:
    passed: bool
    status: str        # passed | failed | exited | blocked | timeout | cpu_limit | memory_limit | output_limit
    stdout: str
    stderr: str
    seconds: float
    isolation: str     # bwrap | guard


@functools.lru_cache(maxsize=1)
def bwrap_path() -> str | None:
    """bubblewrap's path when it is installed and allowed to make namespaces on this kernel, else
    None. Installed but refused (e.g. user namespaces disabled) is logged as a warning, in bwrap's
    own words."""
    exe = shutil.which("bwrap")
    if exe is None:
        return None
    try:
        probe = subprocess.run([exe, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "true"],
                               capture_output=True, text=True, timeout=20)
        refusal = (probe.stderr.strip() or f"exit status {probe.returncode}") if probe.returncode else None
    except (OSError, subprocess.SubprocessError) as e:
        refusal = f"{type(e).__name__}: {e}"
    if refusal:
        logger.warning("sandbox: %s cannot isolate here (%s); untrusted code runs under resource limits and the "
                       "audit guard only", exe, refusal)
        return None
    return exe


def bwrap_works() -> bool:
    """True when bubblewrap is installed and allowed to make namespaces on this kernel."""
    return bwrap_path() is not None


def _interpreter() -> str:
    """The base interpreter (not a venv's link into it): the child needs the standard library only."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _bwrap_prefix(workdir: Path) -> list[str]:
    hide = [arg for d in ("/root", "/home") if Path(d).is_dir() for arg in ("--tmpfs", d)]
    # the interpreter may live under a hidden home (pyenv): show its installation again, read-only
    prefix = os.path.realpath(sys.base_prefix)
    show = ["--ro-bind", prefix, prefix] if prefix.startswith(("/root/", "/home/")) else []
    return [bwrap_path(), "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", *hide, *show,
            "--bind", str(workdir), str(workdir), "--chdir", str(workdir), "--unshare-all", "--die-with-parent",
            "--new-session", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", str(workdir),
            "--"]


def _limits(timeout_s: float, memory_mb: int, output_bytes: int):
    def apply() -> None:
        cpu = int(timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if os.getuid() != 0:                     # not enforced for root; the guard covers that case
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    return apply


def _status(code: int | None, stderr: str, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if code == 0:
        return "passed"
    if code is not None and code < 0:
        sig = -code
        if sig == signal.SIGXCPU:
            return "cpu_limit"
        if sig == signal.SIGXFSZ:
            return "output_limit"
        if sig == signal.SIGKILL:
            return "cpu_limit"
    if "MemoryError" in stderr:
        return "memory_limit"
    if "[Errno 27] File too large" in stderr:        # Python ignores SIGXFSZ: writes past the cap fail
        return "output_limit"
    if BLOCKED_MARK in stderr:
        return "blocked"
    if EXITED_MARK in stderr:
        return "exited"
    return "failed"


def _guard_started(ready: int) -> bool:
    """Whether the guard sent its byte on the ready pipe (it does so before the code runs)."""
    os.set_blocking(ready, False)
    try:
        return os.read(ready, 1) == b"1"
    except BlockingIOError:
        return False


def _read(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def run_python(code: str, tests: str = "", timeout_s: float = 5.0, memory_mb: int = 512,
               output_bytes: int = 64_000, isolation: str = "auto") -> Result:
    """Run `code` then `tests` (e.g. asserts) in a sandboxed child; passed means both ran to their end
    without an exception (the guard's exit status 0)."""
    if isolation not in ("auto", "bwrap", "guard"):
        raise ValueError(f"isolation must be auto, bwrap or guard, got {isolation!r}")
    use_bwrap = isolation == "bwrap" or (isolation == "auto" and bwrap_works())
    if isolation == "bwrap" and not bwrap_works():
        raise SandboxError("bubblewrap is not usable on this machine")
    workdir = Path(tempfile.mkdtemp(prefix="hatchling-sandbox-"))
    ready, ready_w = os.pipe()
    try:
        (workdir / "program.py").write_text(f"{code}\n\n{tests}\n")
        (workdir / "guard.py").write_text(GUARD)
        cmd = [_interpreter(), "-I", "-B", "guard.py", str(ready_w)]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "LANG": "C.UTF-8"}
        if use_bwrap:
            cmd = _bwrap_prefix(workdir) + cmd
        t0 = time.perf_counter()
        with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
            try:
                proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True, pass_fds=(ready_w,),
                                        preexec_fn=_limits(timeout_s, memory_mb, output_bytes))
            finally:
                os.close(ready_w)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)      # everything it started, whatever happened
                except ProcessLookupError:
                    pass
                proc.wait()
        seconds = time.perf_counter() - t0
        stdout, stderr = _read(workdir / "stdout", output_bytes), _read(workdir / "stderr", output_bytes)
        mode = "bwrap" if use_bwrap else "guard"
        if not _guard_started(ready):
            why = (f"within {timeout_s:g} s" if timed_out
                   else f"(exit status {proc.returncode}): {stderr.strip()[-2000:] or 'no output'}")
            raise SandboxError(f"the sandbox ({mode}) could not start the code {why}")
        status = _status(proc.returncode, stderr, timed_out)
        return Result(status == "passed", status, stdout, stderr, round(seconds, 3), mode)
    finally:
        os.close(ready)
        shutil.rmtree(workdir, ignore_errors=True)
