"""One writer at a time: a stage's lock (hatchling/stages.py: stage_lock, taken by run_stage for every
entry point) stops a second run of it, and of the stages that read or write its outputs, in the same
project; a lock whose holder was killed is taken over. Holders are real processes that take the lock
through the same public function and sleep; every wait is bounded and every holder is killed."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import time

import pytest

from hatchling.stages import LOCKS, StageLocked, run_stage, stage_lock
from tests.conftest import REPO, TINY_PARAMS, TRACKING_ENV, write_params

HOLDER = ("import os, sys, time\n"
          "from hatchling.stages import stage_lock\n"
          "with stage_lock(sys.argv[1], sys.argv[2]):\n"
          "    worker = 1\n"
          "    if len(sys.argv) > 3:                   # a worker pool's forked process, up and running\n"
          "        ready, up = os.pipe()\n"
          "        worker = os.fork()\n"
          "        if worker == 0:\n"
          "            os.write(up, b'1')\n"
          "            time.sleep(120)\n"
          "            os._exit(0)\n"
          "        os.read(ready, 1)                  # (not killed before its fork handlers ran)\n"
          "    print('locked', worker, flush=True)\n"
          "    time.sleep(120)\n")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TRACKING_ENV}
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.fixture
def hold(tmp_path):
    """hold(stage): a process that holds the stage's lock in tmp_path (returned once it holds it)."""
    started: list[subprocess.Popen] = []

    def start(stage: str, *fork: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, stage, str(tmp_path), *fork], cwd=tmp_path, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout=30)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("locked "), f"holder of {stage} did not start: {line!r} {proc.poll()}"
        proc.worker = int(line.split()[1])
        return proc

    yield start
    for proc in started:
        if proc.worker > 1:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.worker, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_a_second_run_stops_naming_the_holder_and_leaves_its_outputs_alone(tmp_path, hold):
    write_params(tmp_path, TINY_PARAMS)
    holder = hold("tokenize")
    out = tmp_path / "data/tokenized"         # what the holder is in the middle of writing
    out.mkdir(parents=True)
    (out / "meta.json").write_text('{"holder": true}')
    proc = subprocess.run([sys.executable, "-m", "hatchling", "run", "tokenize"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr.strip()
    assert re.fullmatch(rf"error: stage tokenize is locked by PID {holder.pid} \(python -c tokenize \S+\) "
                        r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", message), message
    assert (out / "meta.json").read_text() == '{"holder": true}' and os.listdir(out) == ["meta.json"]
    assert not (tmp_path / "reports").exists() and not (tmp_path / "mlruns").exists()
    # waiting is bounded: the in-process runner, given a timeout, still stops with the same message
    start = time.monotonic()
    with pytest.raises(StageLocked, match=rf"locked by PID {holder.pid} "):
        with stage_lock("tokenize", tmp_path, timeout=0.5):
            pass
    # it waited out its timeout before giving up: stage_lock retries until a monotonic deadline of start + 0.5 s,
    # so this lower bound holds on any machine; that it gave up at all (the holder still holds) is the raise
    assert time.monotonic() - start > 0.49         # (0.49: float rounding of the deadline, no more)


def test_a_lock_left_by_a_killed_holder_is_taken_over(tmp_path, hold, caplog):
    write_params(tmp_path, TINY_PARAMS)
    holder = hold("tokenize", "fork")          # its forked worker lives on: it must not keep the lock
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=10)
    lock = tmp_path / LOCKS / "tokenize.lock"
    assert f'"pid": {holder.pid}' in lock.read_text()          # what it left behind
    with caplog.at_level(logging.INFO, logger="hatchling.stages"):
        with stage_lock("tokenize", tmp_path):
            assert f'"pid": {os.getpid()}' in lock.read_text()
    assert f"taking over the lock left by PID {holder.pid}" in caplog.text
    os.kill(holder.worker, 0)                                   # (the worker was still alive)
    assert lock.read_text() == ""                               # a clean end leaves nothing to take over
    # and a real run gets past the lock to its own checks
    with pytest.raises(Exception, match=r"stage tokenize needs data/dedup"):
        run_stage("tokenize", root=tmp_path)


def test_stages_lock_only_what_they_share(tmp_path, hold):
    hold("dedup")             # writes data/dedup, reads data/crawl and data/tasks
    for stage in ("pretrain", "sft"):       # unrelated to dedup / another reader of data/tasks
        with stage_lock(stage, tmp_path):
            pass
    for stage, why in [("tokenize", "cannot read the outputs of stage dedup while they are rewritten"),
                       ("tasks", "cannot rewrite its outputs while stage dedup reads them"),
                       ("crawl", "cannot rewrite its outputs while stage dedup reads them")]:
        with pytest.raises(StageLocked, match=rf"^stage {stage} {why}: dedup is locked by PID \d+ "):
            with stage_lock(stage, tmp_path):
                pass
