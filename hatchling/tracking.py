"""MLflow: one parent run per pipeline run, one child run per stage.

Who owns the parent run depends on who runs the pipeline:

* the Prefect flow creates it and hands its id to the stages (``HATCHLING_PARENT_RUN_ID``);
* under ``dvc repro`` every stage is a separate process, so each stage finds the parent run
  tagged with the ``dvc`` process that launched it (pid + start time), creating it if first;
* a stage run on its own (``hatchling run STAGE``) is a pipeline run of one stage.

Runs are written with an explicit ``MlflowClient`` (no fluent global state), so stages running
in threads of one process never mix their runs. The store defaults to ``sqlite:///mlflow.db``
in the project (``MLFLOW_TRACKING_URI`` overrides); an experiment DVC runs from its queue (or with
``--temp``) records into the store of the project that queued it, not into its temporary workspace.

Artifact locations are relative to the store: in a SQLite store the experiment's location is
``mlruns/<id>`` (MLflow would store the absolute ``<cwd>/mlruns/<id>``), so its runs' artifacts and
models live in ``mlruns/`` beside ``mlflow.db`` and a moved or copied project records into its own
``mlruns/``. MLflow reads a relative location against the working directory, which is the store's
directory under ``dvc repro``, ``hatchling run`` and ``mlflow ui`` in the project root; hatchling's
own artifact writes go through :func:`in_store_dir`, so a flow run with ``root`` elsewhere writes
beside the store too.

MLflow errors are not swallowed: a run that cannot be recorded fails its stage with MLflow's own
error. The one exception is marking a run FAILED while the stage's error is on its way out: an
MLflow error then is logged as a warning (see :func:`end_failed`), as raising it would hide why the
stage failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hatchling.io import TEMP, sweep

EXPERIMENT = "hatchling"
PARENT_ENV = "HATCHLING_PARENT_RUN_ID"
PIPELINE_KEY_TAG = "hatchling.pipeline_key"
PROCESS_TAG = "hatchling.process"         # the process that owns a run: process_key's form
ARTIFACTS = "mlruns"          # beside the store, as MLflow's own default

logger = logging.getLogger(__name__)


def tracking_uri(root: Path = Path(".")) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(project_root(root) / 'mlflow.db').resolve()}"


def project_root(root: Path = Path(".")) -> Path:
    """The project whose store a run in `root` records into: `root` itself, except in the temporary
    workspace DVC runs a queued or `--temp` experiment in (under `<project>/.dvc/tmp/exps/`, deleted
    when the experiment ends): there, the project that queued it, which DVC names in `DVC_ROOT`."""
    dvc_root = os.environ.get("DVC_ROOT")
    if dvc_root:
        project = Path(dvc_root).resolve()
        if project != Path(root).resolve() and Path(root).resolve().is_relative_to(project / ".dvc" / "tmp" / "exps"):
            return project
    return Path(root)


def client(root: Path = Path(".")):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    db = sqlite_file(uri)
    if db is not None:
        sweep(db)                   # what a run killed while creating the store left
        if not db.exists():
            _create_store(db)
    return MlflowClient(tracking_uri=uri)


def _create_store(db: Path) -> None:
    """A new SQLite store, its tables made by MLflow in a temporary sibling that is then linked into
    place (never over a store another process made meanwhile): a run killed while MLflow builds the
    tables leaves no half-made store behind, only the sibling, which the next client() sweeps up."""
    from mlflow.tracking import MlflowClient

    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{db.name}{TEMP}{os.getpid()}-", dir=db.parent))
    try:
        made = tmp / db.name
        MlflowClient(tracking_uri=f"sqlite:///{made}").search_experiments()      # MLflow migrates on first use
        with contextlib.suppress(FileExistsError):
            os.link(made, db)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local SQLite store; None for any other store."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(uri)
    except ArgumentError:
        return None
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).resolve()


def store_dir(uri: str) -> Path | None:
    """The directory of a local SQLite store (its artifacts go to `mlruns/` there); None for any other."""
    db = sqlite_file(uri)
    return db.parent if db else None


def experiment_id(mlf) -> str:
    """The hatchling experiment's id, created if missing. In a SQLite store its artifact location is
    `mlruns/<id>`, relative to the store; one that MLflow made absolute (`<some dir>/mlruns/<id>`, as
    hatchling before this created it) is made relative. Past runs keep the locations they have."""
    exp = mlf.get_experiment_by_name(EXPERIMENT) or mlf.get_experiment(mlf.create_experiment(EXPERIMENT))
    relative = f"{ARTIFACTS}/{exp.experiment_id}"
    db = sqlite_file(mlf.tracking_uri)
    if db is not None and _mlflow_default_location(exp.artifact_location, exp.experiment_id):
        # MLflow makes a relative location absolute (against the working directory) when it creates an
        # experiment, and has no call that changes one: set it in the store's own table
        import sqlite3

        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn, conn:
            conn.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                         (relative, int(exp.experiment_id)))
    return exp.experiment_id


def _mlflow_default_location(location: str, exp_id: str) -> bool:
    """An absolute local `.../mlruns/<id>` (or `file:` URI): MLflow's default, not a location chosen."""
    from urllib.parse import urlparse

    parsed = urlparse(location)
    if parsed.scheme not in ("", "file") or parsed.netloc not in ("", "localhost"):
        return False
    path = Path(parsed.path)
    return path.is_absolute() and path.parts[-2:] == (ARTIFACTS, str(exp_id))


_CWD_LOCK = threading.RLock()


@contextlib.contextmanager
def in_store_dir(uri: str):
    """Run MLflow artifact writes (log_artifact, log_model) from the store's directory, where MLflow
    resolves the experiment's relative artifact location. Pass absolute paths in: the working
    directory changes (for the whole process, one switch at a time) only when it is not there already."""
    where = store_dir(uri)
    with _CWD_LOCK:
        previous = os.getcwd()
        move = where is not None and Path(previous).resolve() != where
        if move:
            os.chdir(where)
        try:
            yield
        finally:
            if move:
                os.chdir(previous)


def git_commit(root: Path = Path(".")) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"} (MLflow params are flat strings), each value whole. A mapping
    keyed by free text (e.g. license keywords, which may hold "/") is data, not a section: it stays one
    JSON value."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and all(str(k).isidentifier() for k in value):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, dict) else str(value)
    return flat


def param_value(value: str) -> str:
    """`value` as MLflow stores a param: whole up to its limit; past it, cut and ended by the whole value's
    sha256 (so two values that differ only past the cut still differ in the store)."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    if len(value) <= MAX_PARAM_VAL_LENGTH:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:16]
    return f"{value[:MAX_PARAM_VAL_LENGTH - 40]}... (sha256 {digest})"


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, parent, ..., start time at [19]);
    None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _machine() -> str:
    """'<host>:<boot id>:<pid namespace>': where a pid names one process (a container sharing the
    host's name has its own namespace; a rebooted machine, a new boot id)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, namespace = "?", "?"
    return f"{socket.gethostname()}:{boot}:{namespace}"


def process_key(pid: int) -> str:
    """'<host>:<boot id>:<pid namespace>:<pid>:<start time>': one process, told apart from any other,
    a later one given the same pid included."""
    stat = _stat(pid)
    return f"{_machine()}:{pid}:{stat[19] if stat else '?'}"


def _ended(key: str) -> bool:
    """Whether the process `key` names (:func:`process_key`) is known to have ended: only said of one
    on this machine, in this pid namespace, whose start time was read; else it may live elsewhere."""
    head, _, start = key.rpartition(":")
    machine, _, pid = head.rpartition(":")
    if machine != _machine() or "?" in machine or not (pid.isdigit() and start.isdigit()):
        return False
    stat = _stat(int(pid))
    if stat is not None:
        return stat[19] != start
    try:
        os.kill(int(pid), 0)        # /proc may hide another user's processes (hidepid): ask the kernel
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def close_orphans(mlf, exp_id: str) -> None:
    """Mark KILLED every run still RUNNING whose owner process (its PROCESS_TAG) has ended without
    closing it: killed by SIGKILL, out of memory, a lost machine. A run's own process closes it however
    it stops but these, so a new stage's run does this first."""
    closed = {}
    for run in mlf.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        owner = run.data.tags.get(PROCESS_TAG)
        # read again once its owner is gone: it may have closed the run between the search and now
        if owner and _ended(owner) and mlf.get_run(run.info.run_id).info.status == "RUNNING":
            logger.info("closing MLflow run %s as KILLED: its process %s ended without closing it",
                        run.info.run_id, owner)
            mlf.set_tag(run.info.run_id, "hatchling.error", f"its process ({owner}) ended without closing the run: "
                                                            "killed (SIGKILL, out of memory) or lost")
            mlf.set_terminated(run.info.run_id, "KILLED")
            closed[run.info.run_id] = run.data.tags
    for tags in closed.values():         # a pipeline run closed with the stage run it was running: name the stage
        if tags.get("mlflow.parentRunId") in closed and tags.get("hatchling.stage"):
            mlf.set_tag(tags["mlflow.parentRunId"], "hatchling.failed_stage", tags["hatchling.stage"])


def _dvc_ancestor_key() -> str | None:
    """'dvc:<pid>:<start time>' of the nearest ancestor process running dvc, if any (Linux /proc)."""
    pid = os.getppid()
    for _ in range(6):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        stat = _stat(pid)
        if stat is None:
            return None
        if any(Path(arg.decode(errors="replace")).name in ("dvc", "dvc.exe") for arg in cmdline[:2]) or \
                b"dvc" in cmdline[:3] and b"-m" in cmdline[:3]:
            return f"dvc:{pid}:{stat[19]}"
        pid = int(stat[1])
        if pid <= 1:
            return None
    return None


def start_parent(mlf, exp_id: str, root: Path, label: str, orchestrator: str, describe: dict | None = None,
                 key: str | None = None) -> str:
    """A pipeline run. Its name says what it is: `label` (the DVC experiment, the Prefect flow run, ...)
    and the params it changes against the commit; its tags and params hold the rest (`describe`: the
    run's overrides, params digest and flattened params, from hatchling.stages.describe_run). Its owner
    (PROCESS_TAG) is the process that runs the pipeline: dvc's for `key`, else this one."""
    describe = describe or {}
    overrides = describe.get("overrides", [])
    shown = ", ".join(overrides[:3]) + (f" (+{len(overrides) - 3})" if len(overrides) > 3 else "")
    tags = {"mlflow.runName": f"{label}: {shown}" if shown else label, "hatchling.kind": "pipeline",
            "hatchling.label": label, "hatchling.orchestrator": orchestrator,
            "hatchling.git_commit": git_commit(root), "hatchling.overrides": json.dumps(overrides)[:5000],
            "hatchling.params_digest": describe.get("params_digest", "")}
    for env, tag in (("DVC_EXP_NAME", "hatchling.dvc_experiment"), ("DVC_EXP_BASELINE_REV", "hatchling.dvc_baseline")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    tags.update(describe.get("tags", {}))
    tags[PROCESS_TAG] = f"{_machine()}:{key.removeprefix('dvc:')}" if key else process_key(os.getpid())
    if key:
        tags[PIPELINE_KEY_TAG] = key
    run_id = mlf.create_run(exp_id, tags=tags).info.run_id
    _log_params(mlf, run_id, describe.get("params", {}))
    return run_id


def _log_params(mlf, run_id: str, flat: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, param_value(v)) for k, v in flat.items()]
    for i in range(0, len(items), 100):
        mlf.log_batch(run_id, params=items[i:i + 100])


def find_or_start_parent(mlf, exp_id: str, root: Path, describe: dict | None = None) -> str:
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    key = _dvc_ancestor_key()
    if key:
        found = mlf.search_runs([exp_id], filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{key}'", max_results=1)
        if found:
            return found[0].info.run_id
        label = os.environ.get("DVC_EXP_NAME") or "dvc repro"
        return start_parent(mlf, exp_id, root, label, "dvc", describe, key)
    return start_parent(mlf, exp_id, root, "hatchling run", "cli", describe)


class StageRun:
    """A child run for one stage, named `stage @ pipeline label`: params, buffered per-step metrics,
    artifacts, tags, and the stage's headline metrics copied to the pipeline run."""

    def __init__(self, stage: str, params: dict, tags: dict, root: Path = Path("."), describe: dict | None = None):
        self.uri = tracking_uri(root)
        self.mlf = client(root)
        self.exp_id = experiment_id(self.mlf)
        close_orphans(self.mlf, self.exp_id)
        self.parent_id = find_or_start_parent(self.mlf, self.exp_id, root, describe)
        self.stage = stage
        parent_tags = self.mlf.get_run(self.parent_id).data.tags
        label = parent_tags.get("hatchling.label", "pipeline")
        self.orchestrator = parent_tags.get("hatchling.orchestrator")
        run_tags = {"mlflow.runName": f"{stage} @ {label}", "mlflow.parentRunId": self.parent_id,
                    "hatchling.stage": stage, "hatchling.git_commit": git_commit(root),
                    PROCESS_TAG: process_key(os.getpid()), **tags}
        self.run_id = self.mlf.create_run(self.exp_id, tags=run_tags).info.run_id
        # the pipeline runs again while a stage of it does (the last stage to end marks it FINISHED): if the
        # pipeline's process is lost meanwhile, close_orphans closes it KILLED, not left FINISHED
        self.mlf.update_run(self.parent_id, status="RUNNING")
        _log_params(self.mlf, self.run_id, flatten(params))
        self._buffer: list = []
        self._last_point: dict[str, tuple[int, int]] = {}      # per metric: (step, time) of its last point

    def log_inputs(self, inputs: dict[str, tuple[str, str]]) -> None:
        """The stage's inputs as MLflow datasets: name -> (path relative to the project, content hash)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        self.mlf.log_inputs(self.run_id, datasets=[
            DatasetInput(Dataset(name, digest[:36], "local", path), [InputTag("mlflow.data.context", "input")])
            for name, (path, digest) in inputs.items()])

    def system_metrics(self):
        """A context that samples CPU, memory, disk and GPU use into the run (MLflow's monitor)."""
        from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        interval = MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or 5.0      # MLflow's own knob, if set

        @contextlib.contextmanager
        def monitored():
            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval, tracking_uri=self.uri)
            monitor.start()
            try:
                yield
            finally:
                monitor.finish()
        return monitored()

    def log_headline(self, metrics: dict) -> None:
        """Copy the stage's headline numbers to the pipeline run as `<stage>.<name>`."""
        _log_headline(self.mlf, self.parent_id, self.stage, metrics)

    def fail(self, error: BaseException) -> None:
        """End the run FAILED, with the error as a tag and as the run's description (the UI shows it)."""
        message = f"{type(error).__name__}: {error}"[:5000]
        for run_id in (self.run_id, self.parent_id):
            self.mlf.set_tag(run_id, "hatchling.error", message)
        self.mlf.set_tag(self.run_id, "mlflow.note.content", f"Stage {self.stage} failed:\n\n```\n{message}\n```")
        self.mlf.set_tag(self.parent_id, "hatchling.failed_stage", self.stage)
        self.end("FAILED")

    def log_metrics(self, metrics: dict, step: int = 0, later: bool = False) -> None:
        """Numbers at `step`; `later`: each stamped after its metric's last point (MLflow shows a metric's
        point of the highest step, then the latest time: at one step, this one)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for k, v in numbers.items():
            stamp = max(now, self._last_point.get(k, (0, 0))[1] + 1) if later else now
            self._buffer.append(Metric(k, v, stamp, step))
            self._last_point[k] = max(self._last_point.get(k, (0, 0)), (step, stamp))
        if len(self._buffer) >= 200:
            self.flush()

    def log_summary(self, metrics: dict) -> None:
        """The stage's final numbers: a metric the stage logged step by step gets its final value at its
        last step (at step 0 its history would gain a false first point), any other at step 0."""
        for k, v in metrics.items():
            self.log_metrics({k: v}, self._last_point.get(k, (0, 0))[0], later=True)

    def flush(self) -> None:
        for i in range(0, len(self._buffer), 500):
            self.mlf.log_batch(self.run_id, metrics=self._buffer[i:i + 500])
        self._buffer = []

    def log_artifact(self, path: Path) -> None:
        path = Path(path).resolve()
        if path.exists():
            with in_store_dir(self.uri):
                self.mlf.log_artifact(self.run_id, str(path))

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.mlf.set_terminated(self.run_id, status)
        # keep the parent's end time current: it finishes when its last stage does
        self.mlf.set_terminated(self.parent_id, status)


def end_failed(end: Callable[[], object], what: str) -> None:
    """Call `end` to mark `what` FAILED while the error that failed it propagates; an MLflow error
    here is logged as a warning, since raising it would replace the error the user needs to see."""
    try:
        end()
    except Exception as e:
        logger.warning("MLflow could not mark %s FAILED: %s: %s", what, type(e).__name__, e)


def record_cached(stage: str, headline: dict[str, float], root: Path = Path("."),
                  reason: str = "inputs, params and code unchanged") -> str:
    """A child run that says the stage was served from cache, and why (no metrics logged twice); its
    `headline` numbers (from its report) go to the pipeline run, as a stage that ran puts them there."""
    mlf = client(root)
    exp_id = experiment_id(mlf)
    parent = find_or_start_parent(mlf, exp_id, root)
    return _cached_run(mlf, exp_id, parent, stage, reason, headline)


def _log_headline(mlf, parent: str, stage: str, headline: dict[str, float]) -> None:
    """A stage's headline numbers on its pipeline run, as `<stage>.<name>`."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    mlf.log_batch(parent, metrics=[Metric(f"{stage}.{k}", float(v), now, 0) for k, v in headline.items()])


def _cached_run(mlf, exp_id: str, parent: str, stage: str, reason: str, headline: dict[str, float]) -> str:
    label = mlf.get_run(parent).data.tags.get("hatchling.label", "pipeline")
    run = mlf.create_run(exp_id, tags={"mlflow.runName": f"{stage} (cached) @ {label}", "mlflow.parentRunId": parent,
                                       "hatchling.stage": stage, "hatchling.cached": "true",
                                       "hatchling.cache_reason": reason})
    mlf.set_terminated(run.info.run_id, "FINISHED")
    _log_headline(mlf, parent, stage, headline)
    return run.info.run_id


def _children(run: StageRun) -> list:
    return run.mlf.search_runs([run.exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.parent_id}'",
                               max_results=1000)


def drop_skipped_record(run: StageRun) -> None:
    """A stage recorded as skipped by DVC that ran after all (`dvc repro --force` runs what is up to date):
    once its own run has ended well, the record goes (the run's numbers, logged after the record's, stand on
    the pipeline run); a run that failed leaves it, as its outputs are still those it describes."""
    for child in _children(run):
        if child.data.tags.get("hatchling.stage") == run.stage and child.data.tags.get("hatchling.cached") == "true":
            run.mlf.delete_run(child.info.run_id)


def record_skipped(run: StageRun, headlines: dict[str, dict[str, float]]) -> None:
    """Under `dvc repro`, stages DVC finds up to date never start; as each stage that does runs, record
    those it reports (stage -> the headline numbers of its report) under the same pipeline run as cached,
    so the run shows every stage's numbers."""
    seen = {r.data.tags.get("hatchling.stage") for r in _children(run)}
    for stage, headline in headlines.items():
        if stage not in seen:
            _cached_run(run.mlf, run.exp_id, run.parent_id, stage, "skipped by DVC: outputs up to date", headline)
