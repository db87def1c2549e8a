"""MLflow: one parent run per pipeline run, one child run per stage.

Who owns the parent run depends on who runs the pipeline:

* the Prefect flow creates it and hands its id to the stages (``HATCHLING_PARENT_RUN_ID``);
* under ``dvc repro`` every stage is a separate process, so each stage finds the parent run
  tagged with the ``dvc`` process that launched it (pid + start time), creating it if first;
* a stage run on its own (``hatchling run STAGE``) is a pipeline run of one stage.

Runs are written with an explicit ``MlflowClient`` (no fluent global state), so stages running
in threads of one process never mix their runs. The store defaults to ``sqlite:///mlflow.db``
in the project (``MLFLOW_TRACKING_URI`` overrides).

MLflow errors are not swallowed: a run that cannot be recorded fails its stage with MLflow's own
error. The one exception is marking a run FAILED while the stage's error is on its way out: an
MLflow error then is logged as a warning (see :func:`end_failed`), as raising it would hide why the
stage failed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

EXPERIMENT = "hatchling"
PARENT_ENV = "HATCHLING_PARENT_RUN_ID"
PIPELINE_KEY_TAG = "hatchling.pipeline_key"

logger = logging.getLogger(__name__)


def tracking_uri(root: Path = Path(".")) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"


def client(root: Path = Path(".")):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(root))


def experiment_id(mlf) -> str:
    exp = mlf.get_experiment_by_name(EXPERIMENT)
    return exp.experiment_id if exp else mlf.create_experiment(EXPERIMENT)


def git_commit(root: Path = Path(".")) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"} (MLflow params are flat strings). A mapping keyed by free
    text (e.g. license keywords, which may hold "/") is data, not a section: it stays one JSON value."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and all(str(k).isidentifier() for k in value):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = (json.dumps(value) if isinstance(value, dict) else str(value))[:500]
    return flat


def _dvc_ancestor_key() -> str | None:
    """'dvc:<pid>:<start time>' of the nearest ancestor process running dvc, if any (Linux /proc)."""
    pid = os.getppid()
    for _ in range(6):
        proc = Path(f"/proc/{pid}")
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        if any(Path(arg.decode(errors="replace")).name in ("dvc", "dvc.exe") for arg in cmdline[:2]) or \
                b"dvc" in cmdline[:3] and b"-m" in cmdline[:3]:
            return f"dvc:{pid}:{stat[19]}"
        pid = int(stat[1])
        if pid <= 1:
            return None
    return None


def start_parent(mlf, exp_id: str, name: str, root: Path, key: str | None = None) -> str:
    tags = {"mlflow.runName": name, "hatchling.kind": "pipeline", "hatchling.git_commit": git_commit(root)}
    if key:
        tags[PIPELINE_KEY_TAG] = key
    return mlf.create_run(exp_id, tags=tags).info.run_id


def find_or_start_parent(mlf, exp_id: str, root: Path) -> str:
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    key = _dvc_ancestor_key()
    if key:
        found = mlf.search_runs([exp_id], filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{key}'", max_results=1)
        if found:
            return found[0].info.run_id
        return start_parent(mlf, exp_id, "dvc repro", root, key)
    return start_parent(mlf, exp_id, "pipeline (single stage)", root)


class StageRun:
    """A child run for one stage: params, buffered per-step metrics, artifacts, tags."""

    def __init__(self, stage: str, params: dict, tags: dict, root: Path = Path(".")):
        from mlflow.entities import Param

        self.mlf = client(root)
        self.exp_id = experiment_id(self.mlf)
        self.parent_id = find_or_start_parent(self.mlf, self.exp_id, root)
        run_tags = {"mlflow.runName": stage, "mlflow.parentRunId": self.parent_id, "hatchling.stage": stage,
                    "hatchling.git_commit": git_commit(root), **tags}
        self.run_id = self.mlf.create_run(self.exp_id, tags=run_tags).info.run_id
        flat = flatten(params)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.mlf.log_batch(self.run_id, params=items[i:i + 100])
        self._buffer: list = []

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(self._buffer) >= 200:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._buffer), 500):
            self.mlf.log_batch(self.run_id, metrics=self._buffer[i:i + 500])
        self._buffer = []

    def log_artifact(self, path: Path) -> None:
        if Path(path).exists():
            self.mlf.log_artifact(self.run_id, str(path))

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.mlf.set_terminated(self.run_id, status)
        # keep the parent's end time current: it finishes when its last stage does
        self.mlf.set_terminated(self.parent_id, "FINISHED" if status == "FINISHED" else status)


def end_failed(end: Callable[[], object], what: str) -> None:
    """Call `end` to mark `what` FAILED while the error that failed it propagates; an MLflow error
    here is logged as a warning, since raising it would replace the error the user needs to see."""
    try:
        end()
    except Exception as e:
        logger.warning("MLflow could not mark %s FAILED: %s: %s", what, type(e).__name__, e)


def record_cached(stage: str, root: Path = Path("."), reason: str = "inputs, params and code unchanged") -> str:
    """A child run that says the stage was served from cache (no metrics logged twice)."""
    mlf = client(root)
    exp_id = experiment_id(mlf)
    parent = find_or_start_parent(mlf, exp_id, root)
    run = mlf.create_run(exp_id, tags={"mlflow.runName": f"{stage} (cached)", "mlflow.parentRunId": parent,
                                       "hatchling.stage": stage, "hatchling.cached": "true",
                                       "hatchling.cache_reason": reason})
    mlf.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
