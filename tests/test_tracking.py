"""MLflow artifact locations are relative to the store: a moved or copied project records its new
runs' artifacts (and models) into its own mlruns/, never into the original's. A real SQLite store."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from hatchling import tracking


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return list(model_input["prompt"])


@pytest.fixture(autouse=True)
def _own_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _record(root: Path, note: str) -> str:
    """A stage run as hatchling records one: a report artifact and a model, written via the store."""
    (root / "reports").mkdir(exist_ok=True)
    (root / "reports/export.json").write_text(f'{{"note": "{note}"}}')
    run = tracking.StageRun("export", {"export": {"note": note}}, {}, root)
    run.log_artifact(root / "reports/export.json")
    with tracking.in_store_dir(run.uri):                  # as hatchling.registry.log_model does
        mlflow.set_tracking_uri(run.uri)
        try:
            with mlflow.start_run(run_id=run.run_id):
                mlflow.pyfunc.log_model(name="model", python_model=Echo())
        finally:
            mlflow.set_tracking_uri(None)
    run.end()
    return run.run_id


def _files_of(root: Path, run_id: str) -> tuple[Path, Path]:
    """Where run `run_id`'s report and its model's MLmodel file lie, read as MLflow reads them."""
    client = MlflowClient(tracking_uri=tracking.tracking_uri(root))
    run = client.get_run(run_id)
    model = client.search_logged_models([run.info.experiment_id],
                                        filter_string=f"source_run_id = '{run_id}'")[0]
    return root / run.info.artifact_uri / "export.json", root / model.artifact_location / "MLmodel"


def test_a_copied_or_moved_project_records_into_its_own_mlruns(tmp_path, monkeypatch):
    original, elsewhere = tmp_path / "original", tmp_path / "elsewhere"
    original.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)           # the Prefect flow: an absolute root, another working directory
    first = _record(original, "first")
    exp = MlflowClient(tracking_uri=tracking.tracking_uri(original)).get_experiment_by_name(tracking.EXPERIMENT)
    assert exp.artifact_location == f"mlruns/{exp.experiment_id}"
    report, model = _files_of(original, first)
    assert report.read_text() == '{"note": "first"}' and model.is_file()
    assert report.is_relative_to(original / "mlruns") and model.is_relative_to(original / "mlruns")
    assert not (elsewhere / "mlruns").exists() and Path.cwd() == elsewhere
    before = _snapshot(original)

    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    monkeypatch.chdir(copy)                # `hatchling run` / `dvc repro` in the copy
    second = _record(copy, "second")
    monkeypatch.chdir(elsewhere)
    third = _record(copy, "third")         # and a flow run of the copy from elsewhere
    for run_id, note in ((first, "first"), (second, "second"), (third, "third")):
        report, model = _files_of(copy, run_id)
        assert report.read_text() == f'{{"note": "{note}"}}' and model.is_file()
        assert report.is_relative_to(copy / "mlruns") and model.is_relative_to(copy / "mlruns")
    assert _snapshot(original) == before   # the original's store and artifacts untouched
    assert not (elsewhere / "mlruns").exists()

    # moved: every run's artifacts, the first included, are read from the new place (MLflow reads a
    # relative location against the working directory: the project root, as `mlflow ui` runs there)
    moved = tmp_path / "moved"
    shutil.move(copy, moved)
    monkeypatch.chdir(moved)
    client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
    for run_id in (first, second, third):
        assert [a.path for a in client.list_artifacts(run_id)] == ["export.json"]
    answers = mlflow.pyfunc.load_model(f"runs:/{third}/model").predict(pd.DataFrame({"prompt": ["hi"]}))
    assert list(answers) == ["hi"]


def test_a_store_made_before_keeps_its_runs_and_records_new_ones_beside_it(tmp_path, monkeypatch):
    """An experiment MLflow created with its absolute default (<cwd>/mlruns/<id>) is made relative."""
    old = tmp_path / "old"
    old.mkdir()
    monkeypatch.chdir(old)
    client = MlflowClient(tracking_uri=tracking.tracking_uri(old))
    exp_id = client.create_experiment(tracking.EXPERIMENT)
    assert client.get_experiment(exp_id).artifact_location == str(old / "mlruns" / exp_id)    # MLflow's own
    past = client.create_run(exp_id).info.run_id
    (old / "note.txt").write_text("past")
    client.log_artifact(past, str(old / "note.txt"))

    new = tmp_path / "new"
    shutil.copytree(old, new)
    monkeypatch.chdir(tmp_path)
    run_id = _record(new, "after")
    assert client.get_experiment(exp_id).artifact_location == str(old / "mlruns" / exp_id)    # old store as it was
    moved = MlflowClient(tracking_uri=tracking.tracking_uri(new))
    assert moved.get_experiment(exp_id).artifact_location == f"mlruns/{exp_id}"
    assert moved.get_run(past).info.artifact_uri == str(old / "mlruns" / exp_id / past / "artifacts")   # kept
    report, model = _files_of(new, run_id)
    assert report.is_relative_to(new / "mlruns") and model.is_relative_to(new / "mlruns")
    assert not any(p.name == run_id for p in (old / "mlruns").rglob("*"))


def test_only_local_sqlite_stores_have_a_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    assert tracking.store_dir("sqlite:///mlflow.db") == tmp_path
    assert tracking.store_dir(f"sqlite:///{tmp_path / 'x' / 'm.db'}") == tmp_path / "x"
    assert tracking.store_dir("http://127.0.0.1:5000") is None
    assert tracking.store_dir("sqlite://") is None and tracking.store_dir("postgresql://u@h/db") is None
    with tracking.in_store_dir("http://127.0.0.1:5000"):
        assert Path.cwd() == tmp_path
    with tracking.in_store_dir(f"sqlite:///{tmp_path / 'x' / 'm.db'}"):
        assert Path(os.getcwd()) == tmp_path / "x"
    assert Path.cwd() == tmp_path


def test_a_queued_dvc_experiment_records_into_the_project_that_queued_it(tmp_path, monkeypatch):
    """`dvc exp run --queue` (and `--temp`) runs the stages in <project>/.dvc/tmp/exps/tmpXXXX, deleted
    when the experiment ends, and names the project in DVC_ROOT: the runs and their artifacts go to the
    project's store. Anywhere else (`dvc repro`, where DVC_ROOT is the project itself) `root` decides."""
    project = tmp_path / "project"
    workspace = project / ".dvc" / "tmp" / "exps" / "tmpabc123"
    workspace.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.chdir(workspace)
    assert tracking.tracking_uri(Path(".")) == f"sqlite:///{project / 'mlflow.db'}"
    run_id = _record(workspace, "queued")
    report, model = _files_of(project, run_id)          # read as `mlflow ui` in the project reads it
    assert report.read_text() == '{"note": "queued"}' and model.is_file()
    assert report.is_relative_to(project / "mlruns") and model.is_relative_to(project / "mlruns")
    assert not (workspace / "mlflow.db").exists() and not (workspace / "mlruns").exists()

    monkeypatch.chdir(project)                          # `dvc repro` in the project: DVC_ROOT is the project
    assert tracking.tracking_uri(Path(".")) == f"sqlite:///{project / 'mlflow.db'}"
    other = tmp_path / "other"                          # a root that is no workspace of DVC_ROOT's
    assert tracking.tracking_uri(other) == f"sqlite:///{other / 'mlflow.db'}"


def test_runs_whose_process_ended_unclosed_are_marked_killed_when_a_stage_starts(tmp_path):
    """A stage killed by SIGKILL cannot close its MLflow run; the next stage run in the store does, for the
    runs whose owner process (on this host) is gone, and only those."""
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = tracking.process_key(victim.pid)
    victim.kill()
    victim.wait()
    mlf = tracking.client(tmp_path)
    exp = tracking.experiment_id(mlf)
    host, boot, namespace, pid, start = gone.split(":")
    runs = {name: mlf.create_run(exp, tags={tracking.PROCESS_TAG: key} if key else {}).info.run_id
            for name, key in [("orphan", gone), ("alive", tracking.process_key(os.getpid())),
                              ("other host", f"another-host:{boot}:{namespace}:{pid}:{start}"),
                              ("other container", f"{host}:{boot}:1:{pid}:{start}"),
                              ("start unknown", f"{host}:{boot}:{namespace}:{pid}:?"),
                              ("malformed", "not a process key"), ("untagged", None)]}
    run = tracking.StageRun("export", {}, {}, tmp_path)
    status = {name: mlf.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"orphan": "KILLED", **{name: "RUNNING" for name in runs if name != "orphan"}}
    assert mlf.get_run(runs["orphan"]).data.tags["hatchling.error"].startswith(f"its process ({gone}) ended without")
    ours = tracking.process_key(os.getpid())
    assert {mlf.get_run(r).data.tags[tracking.PROCESS_TAG] for r in (run.run_id, run.parent_id)} == {ours}
    run.end()
