"""kill -9 anywhere: a writer killed at any line of an atomic write, and every stage killed at seeded
random moments, leave the previous outputs intact and no partial output; the next run completes
(the trainers resuming), sweeping up what the killed one left."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hatchling.io import complete, sweep
from hatchling.stages import STAGES, get_stage
from tests.conftest import (
    REPO,
    TINY_PARAMS,
    copy_project,
    hatchling_cmd,
    hatchling_here,
    project_env,
    run_cmd,
    write_params,
)

# a script's head: a tracer that kills the process at the `kill_at`-th line (sys.argv[1]; 0: never) run in
# hatchling/io.py or the script; the script then prints how many lines it ran
KILLED_AT_A_LINE = r"""
import os, signal, sys
from pathlib import Path
import hatchling.io as hio

kill_at = int(sys.argv[1])
mine = {hio.__file__, __file__}
lines = 0

def tracer(frame, event, arg):
    global lines
    if frame.f_code.co_filename not in mine:
        return None
    if event == "line":
        lines += 1
        if lines == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return tracer
"""

WRITER = KILLED_AT_A_LINE + r"""
mode, out = sys.argv[2], Path(sys.argv[3])
if mode == "rename":                       # a system or filesystem that cannot exchange two paths
    hio.exchange = lambda a, b: False

sys.settrace(tracer)
with hio.atomic_path(out) as tmp:
    if out.suffix:
        tmp.write_text("new file")
    else:
        tmp.mkdir()
        for i in range(3):
            (tmp / f"part{i}").write_text("new" * (i + 1))
sys.settrace(None)
print(lines)
"""


def _tree(path: Path) -> dict[str, str] | str | None:
    if path.is_file():
        return path.read_text()
    if path.is_dir():
        return {p.name: p.read_text() for p in sorted(path.iterdir())}
    return None


@pytest.mark.parametrize(("name", "mode"), [("shards", "exchange"), ("shards", "rename"), ("report.json", "exchange")])
def test_a_writer_killed_at_any_line_leaves_the_old_or_the_new_output_and_the_next_write_sweeps_up(
        tmp_path, mode, name):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)

    def write(kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(kill_at), mode, str(out)], capture_output=True,
                              text=True, cwd=REPO, timeout=60)

    out = tmp_path / name
    old = "old file" if out.suffix else {"part0": "old", "stale": "old"}
    new = "new file" if out.suffix else {f"part{i}": "new" * (i + 1) for i in range(3)}

    def reset():
        for p in tmp_path.iterdir():
            if p != script:
                subprocess.run(["rm", "-rf", str(p)], check=True)
        if out.suffix:
            out.write_text(old)
        else:
            out.mkdir()
            for k, v in old.items():
                (out / k).write_text(v)

    reset()
    full = write(0)
    assert full.returncode == 0, full.stderr
    assert _tree(out) == new and sorted(p.name for p in tmp_path.iterdir()) == sorted([name, script.name])
    lines = int(full.stdout)
    outcomes = set()
    for kill_at in range(1, lines + 1):
        reset()
        killed = write(kill_at)
        assert killed.returncode == -9, (kill_at, killed.stderr)
        seen = _tree(out)
        if seen is None and mode == "rename":       # killed between moving the old one aside and the new in:
            sweep(out)                              # the sweep that begins the next write puts it back
            seen = _tree(out)
        assert seen in (old, new), f"killed at line {kill_at} of {lines}: {name} is {seen}"
        outcomes.add("new" if seen == new else "old")
        assert write(0).returncode == 0                     # the next write completes, and sweeps up
        assert _tree(out) == new and sorted(p.name for p in tmp_path.iterdir()) == sorted([name, script.name]), \
            f"killed at line {kill_at}: left {sorted(p.name for p in tmp_path.iterdir())}"
    assert outcomes == {"old", "new"}           # the kills fell both before and after the swap


TOGETHER = KILLED_AT_A_LINE + r"""
root = Path(sys.argv[2])

sys.settrace(tracer)
with hio.outputs_together([root / "shards", root / "report.json"], root / ".hatchling" / "commit.json", root):
    with hio.atomic_path(root / "shards") as tmp:
        tmp.mkdir()
        for i in range(3):
            (tmp / f"part{i}").write_text("new" * (i + 1))
    hio.atomic_write_text(root / "report.json", "new file")
sys.settrace(None)
print(lines)
"""


def test_a_stage_killed_while_its_outputs_go_in_place_leaves_the_old_set_or_what_its_next_run_completes(tmp_path):
    """A process killed at any line of writing two outputs within outputs_together, and of putting them
    in place: either both old versions stay (the temporaries are swept by the next writes) or the journal
    it left lets complete(), which begins the stage's next run, put both new ones in place. Never one new
    and one old."""
    script, root = tmp_path / "together.py", tmp_path / "project"
    script.write_text(TOGETHER)
    old = ({"part0": "old", "stale": "old"}, "old file")
    new = ({f"part{i}": "new" * (i + 1) for i in range(3)}, "new file")

    def write(kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(kill_at), str(root)], capture_output=True,
                              text=True, cwd=REPO, timeout=60)

    def reset():
        shutil.rmtree(root, ignore_errors=True)
        (root / "shards").mkdir(parents=True)
        for k, v in old[0].items():
            (root / "shards" / k).write_text(v)
        (root / "report.json").write_text(old[1])

    def outputs():
        return _tree(root / "shards"), _tree(root / "report.json")

    reset()
    full = write(0)
    assert full.returncode == 0, full.stderr
    assert outputs() == new and sorted(p.name for p in root.iterdir()) == [".hatchling", "report.json", "shards"]
    lines = int(full.stdout)
    outcomes = set()
    for kill_at in range(1, lines + 1):
        reset()
        killed = write(kill_at)
        assert killed.returncode == -9, (kill_at, killed.stderr)
        journal = root / ".hatchling" / "commit.json"
        if not journal.exists():            # killed before the set was to move, or once it had: one set, whole
            assert outputs() in (old, new), f"killed at line {kill_at} of {lines}: {outputs()}"
        complete(journal, root)             # what the stage's next run does first
        for path in (root / "shards", root / "report.json", journal):
            sweep(path)                     # ... and its writes of each
        seen = outputs()
        assert seen in (old, new), f"killed at line {kill_at} of {lines}: {seen}"
        outcomes.add("new" if seen == new else "old")
        left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in str(p))
        assert not left and not journal.exists(), f"killed at line {kill_at}: left {left}"
    assert outcomes == {"old", "new"}


# -- every stage -------------------------------------------------------------------------------------
# timings, what is decided by one (the export's fastest int8 variant), and whether it resumed
VOLATILE = re.compile(r"seconds|_ms|latency|per_s$|^fastest_|resumed_from_step")


def _steady(value):
    """A metrics document less what differs between two runs of the same work (timings)."""
    if isinstance(value, dict):
        return {k: _steady(v) for k, v in value.items() if not VOLATILE.search(k)}
    return [_steady(v) for v in value] if isinstance(value, list) else value


def _files(proj: Path, paths) -> dict[str, bytes]:
    found = {}
    for rel in paths:
        top = proj / rel
        for f in [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()):
            found[str(f.relative_to(proj))] = f.read_bytes()
    return found


def _same_work(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith(".json"):
            assert _steady(json.loads(a[name])) == _steady(json.loads(b[name])), name
        elif name not in RENDERED:
            assert a[name] == b[name], name


RENDERED = {"reports/dedup.md", "reports/eval.md", "reports/eval_training.png", "reports/eval_probes.png"}  # timings


KILL_PARAMS = {**TINY_PARAMS, "rlvr": {**TINY_PARAMS["rlvr"], "max_steps": 4, "checkpoint_every": 1}}


@pytest.fixture(scope="module")
def finished_project(tokenized_project, pretrained_project, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A project where every stage has run once, uninterrupted (eval and export on top of the shared
    one), and how long each stage worked (its MLflow run, from taking its lock to its report)."""
    proj = copy_project(pretrained_project, tmp_path_factory.mktemp("kill") / "done")
    write_params(proj, KILL_PARAMS)
    for stage in ("rlvr", "eval", "export"):          # rlvr again: longer, with a checkpoint at every step
        run_cmd(hatchling_cmd("run", stage), proj, timeout=600)
    seconds = {}
    for where in (tokenized_project, pretrained_project, proj):       # later runs of a stage win
        client = MlflowClient(tracking_uri=f"sqlite:///{where / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("hatchling").experiment_id],
                                  "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"])
        seconds |= {r.data.tags["hatchling.stage"]: (r.info.end_time - r.info.start_time) / 1000
                    for r in runs if "hatchling.stage" in r.data.tags and "hatchling.cached" not in r.data.tags}
    assert set(seconds) == {s.name for s in STAGES}
    return proj, seconds


@pytest.mark.parametrize("name", [s.name for s in STAGES])
def test_a_stage_killed_at_a_random_moment_keeps_its_outputs_and_its_rerun_ends_as_an_uninterrupted_run(
        finished_project, tmp_path, own_tracking, name):
    """SIGKILL to the stage's whole process group at a seeded random moment of its work (for a trainer:
    after its first resume checkpoint): its outputs, reports, logs and metrics stay as the previous run
    left them (they go in place together, once a run has ended well), and no partial file is anywhere
    but in a temporary sibling of an output, which the rerun sweeps up. The rerun (resuming, for a trainer)
    ends with what the uninterrupted run made: the same bytes, timings aside. (The rerun runs in this
    process, on the repository's package, as `hatchling run` would there.)"""
    stage = get_stage(name)
    finished, seconds = finished_project
    proj = copy_project(finished, tmp_path / "p")
    write_params(proj, KILL_PARAMS)
    kept = [*stage.outs, *stage.kept_in_git, stage.metrics]
    before = _files(proj, kept)
    for run_dir in stage.persist.values():            # the uninterrupted run's resume state: train afresh
        shutil.rmtree(proj / run_dir)
    paths_before = {p for p in proj.rglob("*")}

    # a trainer is killed within the first 30% of its run after its first checkpoint, so that one is there
    share = random.Random(f"kill {name}").uniform(0.05, 0.3 if stage.persist else 0.95)
    moment = share * seconds[name]
    lock = proj / ".hatchling/locks" / f"{name}.lock"
    proc = subprocess.Popen(hatchling_cmd("run", name), cwd=proj, env=project_env(proj), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = [*stage.persist.values()] and proj / next(iter(stage.persist.values())) / "model.json"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        working = lock.is_file() and f'"pid": {proc.pid}' in lock.read_text()
        if working and (not started or started.is_file()):       # a trainer: once it has a checkpoint
            break
        time.sleep(0.01)
    time.sleep(moment)
    assert proc.poll() is None, f"{name} ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    _same_work(_files(proj, kept), before)      # the previous outputs, or (killed after) the same, complete
    left = {p for p in proj.rglob("*")} - paths_before
    stray = [p for p in left if not any(part.startswith(".") and ".tmp-" in part      # a writer's temporary sibling
                                        for part in p.relative_to(proj).parts)]
    allowed = [*stage.persist.values(), ".hatchling", "mlflow.db", "mlruns"]
    stray = [p for p in stray if not any(str(p.relative_to(proj)).startswith(a) for a in allowed)]
    assert not stray, f"the killed run left {sorted(map(str, stray))}"

    assert hatchling_here(proj, "run", name) == 0         # the rerun, in this process (no start-up to pay)
    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")     # the killed run's were closed
    unfinished = client.search_runs([client.get_experiment_by_name("hatchling").experiment_id],
                                    "attributes.status != 'FINISHED'")
    assert {r.info.status for r in unfinished} <= {"KILLED"}, "a run of the killed process is left RUNNING"
    _same_work(_files(proj, kept), before)
    assert not [p for p in proj.rglob("*") if ".tmp-" in p.name], "the rerun left temporary files"
    if stage.persist:
        assert json.loads((proj / stage.metrics).read_text())["resumed_from_step"], "the rerun did not resume"


def test_ctrl_c_stops_a_stage_with_one_line_its_outputs_kept_and_its_run_failed(pretrained_project, tmp_path):
    """SIGINT to the foreground process group, as a terminal's Ctrl-C sends it, while pretraining."""
    proj = copy_project(pretrained_project, tmp_path / "p")
    before = _files(proj, ["checkpoints/pretrain", "reports/pretrain.json"])
    resume = proj / "checkpoints/pretrain-run/model.json"
    old_resume = resume.read_text()
    # as a terminal's foreground job: Ctrl-C is not ignored (a shell's background job, e.g. a CI run started
    # with `&`, passes on SIGINT ignored, and rightly the stage then keeps running)
    proc = subprocess.Popen(hatchling_cmd("run", "pretrain", "--set", "pretrain.max_steps=100000"), cwd=proj,
                            env=project_env(proj), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120            # until this run's first resume checkpoint: training under way
        while proc.poll() is None and time.monotonic() < deadline and resume.read_text() == old_resume:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        os.killpg(proc.pid, signal.SIGINT)
        stderr = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:                      # never leave it training on a shared machine
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == (
        "error: interrupted: run stopped; what it had not finished writing was not written")
    assert _files(proj, ["checkpoints/pretrain", "reports/pretrain.json"]) == before
    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("hatchling").experiment_id],
                              "tags.`hatchling.stage` = 'pretrain'")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_a_run_killed_while_mlflow_builds_a_new_store_leaves_none_half_made(tmp_path):
    """MLflow makes its tables on a store's first use, for seconds: killed then, the store would be
    left half-made and every later run would fail on it. It is made beside its place and linked in."""
    opens = [sys.executable, "-c", "import sys; from pathlib import Path; from hatchling import tracking; "
             "tracking.experiment_id(tracking.client(Path(sys.argv[1])))", str(tmp_path)]
    proc = subprocess.Popen(opens, cwd=REPO, start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and not list(tmp_path.glob(".mlflow.db.tmp-*/*")):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -9 and not (tmp_path / "mlflow.db").exists()
    assert list(tmp_path.glob(".mlflow.db.tmp-*"))                    # what it was building, beside
    subprocess.run(opens, cwd=REPO, check=True, timeout=120, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_experiment_by_name("hatchling") is not None
