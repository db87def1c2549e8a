"""Escape suite for the code sandbox (hatchling/sandbox.py), in every isolation mode this machine has.

    nice -n 10 python bench/sandbox_escapes.py [--modes bwrap,guard,bwrap-ns] [--parallel 6]
                                                [--out reports/bench_sandbox.json]

Each attempt is a small hostile program handed to ``run_python`` the way the code tasks hand it a
completion, and is judged by what it achieved, not by what it printed about itself: a listener on
127.0.0.1 that would have accepted the connection, files outside the work dir that would exist, a
token a child process would have printed, a secret planted in this process's environment
(HATCHLING_TEST_SECRET), a SIGUSR1 handler here that would have fired, a daemon that would still be
running after ``run_python`` returned (found by a file it holds open), the contents of a file in the
user's home. Per attempt and mode: contained or not, how (the sandbox's status and the child's
exception), and wall time. The parallel case runs --parallel samples at once from threads (a memory
bomb, an infinite loop, a CPU burner, a right answer, ...) and checks each keeps its own limits.

Safety: the bombs are bounded twice over, by the sandbox's own limits and by the attacks themselves
(a fork bomb of at most 2**6 processes that exit within seconds); PID 1 is only probed with signal 0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hatchling.sandbox as sandbox
from hatchling.sandbox import bwrap_works, run_python

# planted in this process's environment from its start (main re-executes itself with it), so that
# /proc/<this pid>/environ holds it too, not only os.environ
SECRET = os.environ.get("HATCHLING_TEST_SECRET") or "hunter2-" + uuid.uuid4().hex[:8]


class Listener:
    """A TCP listener on 127.0.0.1 that records whatever connects (proof the port was reachable)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.hits: list[bytes] = []
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(1)
            try:
                self.hits.append(conn.recv(64) or b"(connected)")
            except OSError:
                self.hits.append(b"(connected)")
            conn.close()

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
        self.sock.close()

    def probe(self) -> bool:
        """This process can reach the port (so a sandboxed child that cannot was stopped by the sandbox)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"probe")
        time.sleep(0.3)
        ok = b"probe" in self.hits
        self.hits.clear()
        return ok


def _pids_holding(token: str) -> list[int]:
    """Processes with a file open whose path contains `token` (the daemon attempt holds one)."""
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(token in os.readlink(fd) for fd in fd_dir.iterdir()):
                found.append(int(fd_dir.parent.name))
        except OSError:
            continue
    return found


def _home_file() -> Path | None:
    home = Path.home()
    for name in (".ssh/id_rsa", ".ssh/id_ed25519", ".gitconfig", ".bashrc", ".profile"):
        p = home / name
        if p.is_file() and p.stat().st_size > 10:
            return p
    return None


def _home_entries() -> list[str]:
    """Names in the user's home, less the one that leads to the interpreter (bwrap shows that one again)."""
    home, prefix = Path.home().resolve(), Path(sys.base_prefix).resolve()
    shown = prefix.relative_to(home).parts[0] if prefix.is_relative_to(home) else None
    return [name for name in os.listdir(home) if name != shown]


FORK_EXEC = """import _posixsubprocess, os
r, w = os.pipe()
base = ([b"/bin/echo", b"{token}"], [b"/bin/echo"], True, (), None, None, -1, -1, -1, 1, -1, 2, r, w,
        True, False, -1, None, None, None, -1, None)
try:
    pid = _posixsubprocess.fork_exec(*base, False)
except TypeError:
    pid = _posixsubprocess.fork_exec(*base)
os.waitpid(pid, 0)
"""

DAEMON = """import os, time
keep = open("daemon-{token}", "w")
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(30)
    os._exit(0)
os.wait()
"""


def attempts(ctx: dict) -> list[dict]:
    """name, program, and a check of what it achieved (True: contained)."""
    t, home, me = ctx["token"], ctx["home"], os.getpid()
    home_file = ctx["home_file"]
    out_tmp, out_home, out_cwd = (Path(p) / f"escape-{t}" for p in ("/tmp", home, os.getcwd()))
    no_token = lambda r: t not in r.stdout                                             # noqa: E731
    return [
        dict(name="tcp to 127.0.0.1 (listener up)",
             code=f"import socket\ns = socket.create_connection(('127.0.0.1', {ctx['port']}), timeout=2)\n"
                  f"s.sendall(b'{t}')",
             check=lambda r: not ctx["listener"].hits),
        dict(name="tcp to 1.1.1.1:53 (external)",
             code=f"import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=2)\nprint('{t}')",
             check=no_token),
        dict(name="write /tmp/escape-*", code=f"open({str(out_tmp)!r}, 'w').write('x')",
             check=lambda r: not out_tmp.exists()),
        dict(name="write $HOME/escape-*", code=f"open({str(out_home)!r}, 'w').write('x')",
             check=lambda r: not out_home.exists()),
        dict(name="write <harness cwd>/escape-*", code=f"open({str(out_cwd)!r}, 'w').write('x')",
             check=lambda r: not out_cwd.exists()),
        dict(name="os.truncate a file outside", code=f"import os\nos.truncate({str(ctx['victim'])!r}, 0)",
             check=lambda r: ctx["victim"].read_text() == "keep"),
        dict(name="os.open(dir) + dir_fd write",
             code=f"import os\nd = os.open({str(ctx['victim'].parent)!r}, os.O_RDONLY)\n"
                  f"os.close(os.open('escape-{t}', os.O_WRONLY | os.O_CREAT, dir_fd=d))",
             check=lambda r: not (ctx["victim"].parent / f"escape-{t}").exists()),
        dict(name="subprocess.run", code=f"import subprocess\nsubprocess.run(['/bin/echo', '{t}'])", check=no_token),
        dict(name="os.system", code=f"import os\nos.system('echo {t}')", check=no_token),
        dict(name="os.execv", code=f"import os\nos.execv('/bin/echo', ['echo', '{t}'])", check=no_token),
        dict(name="_posixsubprocess.fork_exec", code=FORK_EXEC.format(token=t), check=no_token),
        dict(name="os.kill(harness, SIGUSR1)", code=f"import os, signal\nos.kill({me}, signal.SIGUSR1)",
             check=lambda r: not ctx["signals"]),
        dict(name="os.kill(getppid(), SIGUSR1)", code="import os, signal\nos.kill(os.getppid(), signal.SIGUSR1)",
             check=lambda r: not ctx["signals"]),
        dict(name="pidfd_send_signal(harness)",
             code=f"import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({me}), signal.SIGUSR1)",
             check=lambda r: not ctx["signals"]),
        dict(name="os.kill(1, 0) (probe only)", code=f"import os\nos.kill(1, 0)\nprint('{t}')", check=no_token),
        dict(name="environment secret", code="import os\nprint(dict(os.environ))",
             check=lambda r: SECRET not in r.stdout),
        dict(name="/proc/<harness>/environ", code=f"print(open('/proc/{me}/environ', 'rb').read())",
             check=lambda r: SECRET not in r.stdout),
        dict(name="/proc/<getppid()>/environ", code="import os\nprint(open(f'/proc/{os.getppid()}/environ').read())",
             check=lambda r: SECRET not in r.stdout),
        dict(name="read a $HOME file", code=f"print(open({str(home_file)!r}).read())" if home_file else "pass",
             check=lambda r: home_file is None or home_file.read_text()[:40] not in r.stdout),
        dict(name="list $HOME and ~/.ssh",
             code=f"import os\nprint(os.listdir({home!r}))\nprint(os.listdir({home + '/.ssh'!r}))",
             check=lambda r: not any(repr(name) in r.stdout for name in ctx["home_entries"])),
        dict(name="fork bomb (2**6, bounded)",
             code=f"import os, time\nfor _ in range(6):\n    os.fork()\nprint('{t}')\ntime.sleep(2)", check=no_token),
        dict(name="memory bomb (8 GB)", code=f"x = bytearray(8 << 30)\nprint('{t}')", check=no_token),
        dict(name="infinite loop", code=f"while True:\n    pass\nprint('{t}')", check=no_token),
        dict(name="daemon left behind (double fork)", code=DAEMON.format(token=t),
             check=lambda r: not ctx["survivors"]),
        # a wrong answer that ends the program before its tests: contained when it does not pass
        dict(name="sys.exit(0) before the tests", code="import sys\nsys.exit(0)\nassert False, 'the tests'",
             check=lambda r: not r.passed),
        dict(name="os._exit(0) before the tests", code="import os\nos._exit(0)\nassert False, 'the tests'",
             check=lambda r: not r.passed),
        dict(name="atexit os._exit(0)", code="import atexit, os\natexit.register(os._exit, 0)\nassert False",
             check=lambda r: not r.passed),
    ]


# "bwrap-ns": the namespaces and limits with the audit guard taken out (says the ready byte, runs the
# code), to see what the outer layer stops on its own; for information, never how the sandbox runs
NO_GUARD = """import os, sys, runpy
_ready = int(sys.argv.pop())
os.write(_ready, b"1")
os.close(_ready)
runpy.run_path("program.py", run_name="__main__")
"""


def run_attempt(a: dict, ctx: dict, mode: str, timeout_s: float, memory_mb: int) -> dict:
    ctx["listener"].hits.clear()
    ctx["signals"].clear()
    guard = sandbox.GUARD
    if mode == "bwrap-ns":
        sandbox.GUARD = NO_GUARD
    t0 = time.perf_counter()
    try:
        r = run_python(a["code"], timeout_s=timeout_s, memory_mb=memory_mb,
                       isolation="bwrap" if mode == "bwrap-ns" else mode)
    finally:
        sandbox.GUARD = guard
    wall = time.perf_counter() - t0
    time.sleep(0.3)                                      # let a stray signal, connection or daemon show up
    ctx["survivors"] = _pids_holding(f"daemon-{ctx['token']}")
    for pid in ctx["survivors"]:                         # never leave one behind on a shared machine
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    contained = bool(a["check"](r))
    lines = r.stderr.strip().splitlines()
    why = lines[-1][:90] if lines and r.status not in ("timeout", "passed") else ""
    ctx["victim"].write_text("keep")
    for d in ("/tmp", ctx["home"], os.getcwd(), ctx["victim"].parent):
        (Path(d) / f"escape-{ctx['token']}").unlink(missing_ok=True)
    return dict(attempt=a["name"], mode=mode, contained=contained, status=r.status, error=why,
                seconds=round(wall, 3), survivors=len(ctx["survivors"]))


PARALLEL = [  # (name, program, status it must get)
    ("memory bomb", "x = bytearray(8 << 30)", "memory_limit"),
    ("infinite loop", "while True:\n    pass", "timeout"),
    ("right answer", "def f(x):\n    return 2 * x\nassert f(21) == 42", "passed"),
    ("fork", "import os\nos.fork()", "blocked"),
    ("output flood", "import sys\nwhile True:\n    sys.stdout.write('x' * 4096)", "output_limit"),
    ("wrong answer", "assert 1 + 1 == 3", "failed"),
]


def run_parallel(mode: str, n: int, timeout_s: float, memory_mb: int) -> dict:
    jobs = [PARALLEL[i % len(PARALLEL)] for i in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda j: run_python(j[1], timeout_s=timeout_s, memory_mb=memory_mb,
                                                     output_bytes=20_000, isolation=mode), jobs))
    wall = time.perf_counter() - t0
    rows = [dict(sample=j[0], expected=j[2], status=r.status, seconds=r.seconds,
                 ok=r.status == j[2] and r.seconds < timeout_s + 3 and len(r.stdout) <= 20_000)
            for j, r in zip(jobs, results, strict=True)]
    return dict(mode=mode, n=n, seconds=round(wall, 3), all_kept_limits=all(x["ok"] for x in rows), samples=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="bwrap,guard,bwrap-ns",
                    help="comma-separated: bwrap, guard, and bwrap-ns (bwrap with the audit guard taken out, for "
                         "information); the bwrap ones are skipped where bubblewrap cannot run")
    ap.add_argument("--timeout", type=float, default=3.0, help="run_python's timeout_s per attempt")
    ap.add_argument("--memory-mb", type=int, default=512)
    ap.add_argument("--parallel", type=int, default=6, help="samples run at once in the parallel case (0: skip)")
    ap.add_argument("--out", default="reports/bench_sandbox.json")
    args = ap.parse_args()

    if os.environ.get("HATCHLING_TEST_SECRET") != SECRET:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "HATCHLING_TEST_SECRET": SECRET})
    # belt and braces for a shared machine: this process (and so every child) stays under 6 GB
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    modes = [m for m in args.modes.split(",") if not m.startswith("bwrap") or bwrap_works()]
    skipped = sorted(set(args.modes.split(",")) - set(modes))
    signals: list[int] = []
    signal.signal(signal.SIGUSR1, lambda s, f: signals.append(s))
    listener = Listener()
    victim_dir = Path(tempfile.mkdtemp(prefix="sandbox-escapes-"))          # a directory the harness may write
    (victim_dir / "victim.txt").write_text("keep")
    ctx = dict(token=uuid.uuid4().hex[:12], home=str(Path.home()), home_file=_home_file(),
               home_entries=_home_entries(), port=listener.port,
               victim=victim_dir / "victim.txt", listener=listener, signals=signals, survivors=[])
    reachable = listener.probe()
    rows = []
    try:
        for a in attempts(ctx):
            for mode in modes:
                rows.append(run_attempt(a, ctx, mode, args.timeout, args.memory_mb))
        parallel = [run_parallel(m, args.parallel, args.timeout, args.memory_mb)
                    for m in modes if args.parallel and m != "bwrap-ns"]
    finally:
        listener.close()
        shutil.rmtree(victim_dir, ignore_errors=True)

    names = list(dict.fromkeys(r["attempt"] for r in rows))
    by = {(r["attempt"], r["mode"]): r for r in rows}
    print(f"listener on 127.0.0.1:{listener.port} reachable from the harness: {reachable}; "
          f"home file: {ctx['home_file']}; modes: {modes}" + (f" (skipped: {skipped})" if skipped else ""))
    head = f"{'attempt':34s}" + "".join(f" | {m + ' contained/how':32s} {'s':>5s}" for m in modes)
    print(head)
    print("-" * len(head))
    for name in names:
        cells = ""
        for m in modes:
            r = by[(name, m)]
            how = r["status"] + (f": {r['error'].split(':')[0]}" if r["error"] and r["status"] != "blocked" else "")
            cells += f" | {('yes' if r['contained'] else 'NO') + ', ' + how:32s} {r['seconds']:5.2f}"
        print(f"{name:34s}{cells}")
    summary = {m: dict(attempts=sum(r["mode"] == m for r in rows),
                       contained=sum(r["mode"] == m and r["contained"] for r in rows),
                       seconds=round(sum(r["seconds"] for r in rows if r["mode"] == m), 2)) for m in modes}
    for m, s in summary.items():
        print(f"{m}: {s['contained']}/{s['attempts']} contained in {s['seconds']} s")
    for p in parallel:
        print(f"parallel {p['mode']}: {p['n']} samples at once in {p['seconds']} s, each kept its limits: "
              f"{p['all_kept_limits']} (" + ", ".join(f"{s['sample']}={s['status']} {s['seconds']}s"
                                                       for s in p["samples"]) + ")")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(date=time.strftime("%Y-%m-%d"), cpus=os.cpu_count(), uid=os.getuid(),
                                   listener_reachable=reachable, modes=modes, skipped_modes=skipped,
                                   summary=summary, attempts=rows, parallel=parallel), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
