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
from mlflow.entities import ViewType
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


ORPHAN = """
import os, signal
from hatchling import tracking
first = tracking.StageRun("crawl", {}, {}, ROOT)
first.end()
os.environ[tracking.PARENT_ENV] = first.parent_id       # the next stage of the same pipeline
second = tracking.StageRun("tasks", {}, {}, ROOT)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_pipeline_whose_stage_was_killed_does_not_stay_finished(tmp_path):
    """The first stage's end marked the pipeline run FINISHED; the second stage killed under it left it so,
    a killed pipeline shown as a success. Now a running stage keeps its pipeline RUNNING, and the next stage
    run closes both KILLED, the pipeline naming the stage."""
    killed = subprocess.run([sys.executable, "-c", ORPHAN.replace("ROOT", repr(str(tmp_path)))])
    assert killed.returncode == -9
    mlf = tracking.client(tmp_path)
    exp = tracking.experiment_id(mlf)
    runs = {r.data.tags.get("hatchling.stage", "pipeline"): r.info.run_id for r in mlf.search_runs([exp])}
    tracking.StageRun("export", {}, {}, tmp_path).end()
    status = {name: mlf.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"pipeline": "KILLED", "crawl": "FINISHED", "tasks": "KILLED"}
    assert mlf.get_run(runs["pipeline"]).data.tags["hatchling.failed_stage"] == "tasks"


def test_a_stages_summary_lands_at_the_end_of_its_history(tmp_path):
    """The summary of a metric logged step by step is its last point (at step 0 it was a false first one)."""
    run = tracking.StageRun("pretrain", {}, {}, tmp_path)
    for step, loss in ((10, 3.0), (20, 2.5)):
        run.log_metrics({"val_loss": loss}, step)
    run.log_summary({"val_loss": 2.4, "steps": 20, "stopped_early": False})
    run.end()
    mlf = tracking.client(tmp_path)
    history = [(m.step, m.value) for m in mlf.get_metric_history(run.run_id, "val_loss")]
    assert sorted(history) == [(10, 3.0), (20, 2.4), (20, 2.5)]
    assert [(m.step, m.value) for m in mlf.get_metric_history(run.run_id, "steps")] == [(0, 20.0)]
    assert mlf.get_run(run.run_id).data.metrics["val_loss"] == 2.4          # the runs table shows the summary


def test_a_cached_stage_brings_its_headline_to_the_pipeline_run(tmp_path):
    run_id = tracking.record_cached("pretrain", {"val_bpb": 1.66, "val_loss": 2.1}, tmp_path)
    mlf = tracking.client(tmp_path)
    parent = mlf.get_run(run_id).data.tags["mlflow.parentRunId"]
    assert mlf.get_run(parent).data.metrics == {"pretrain.val_bpb": 1.66, "pretrain.val_loss": 2.1}
    assert mlf.get_run(run_id).data.metrics == {}                             # nothing logged twice


def test_a_stage_recorded_as_skipped_by_dvc_that_runs_after_all_replaces_that_record(tmp_path, monkeypatch):
    """`dvc repro --force` runs stages DVC finds up to date: one recorded as skipped when a stage before it
    ran keeps only its own run under the pipeline run."""
    first = tracking.StageRun("export", {}, {}, tmp_path)
    tracking.record_skipped(first, {"eval": {"score": 0.5}, "pretrain": {"val_bpb": 1.7}})
    first.end()
    monkeypatch.setenv(tracking.PARENT_ENV, first.parent_id)        # the next stage of the same pipeline
    second = tracking.StageRun("eval", {}, {}, tmp_path)
    tracking.record_skipped(second, {"pretrain": {"val_bpb": 1.7}})
    second.end()
    tracking.drop_skipped_record(second)
    mlf = tracking.client(tmp_path)
    assert second.parent_id == first.parent_id
    children = mlf.search_runs([first.exp_id], f"tags.`mlflow.parentRunId` = '{first.parent_id}'")
    kept = sorted((r.data.tags["hatchling.stage"], r.data.tags.get("hatchling.cached", "ran")) for r in children)
    assert kept == [("eval", "ran"), ("export", "ran"), ("pretrain", "true")]
    deleted = mlf.search_runs([first.exp_id], f"tags.`mlflow.parentRunId` = '{first.parent_id}'",
                              run_view_type=ViewType.DELETED_ONLY)
    assert [(r.data.tags["hatchling.stage"], r.data.tags["hatchling.cached"]) for r in deleted] == [("eval", "true")]


def test_params_past_mlflows_length_stay_whole_in_the_digest_and_differ_in_the_store():
    long = {"crawl": {"modules": [f"m{i:04d}" for i in range(1500)]}}
    other = {"crawl": {"modules": [f"m{i:04d}" for i in range(1499)]}}
    a, b = tracking.flatten(long)["crawl.modules"], tracking.flatten(other)["crawl.modules"]
    assert a != b and a.startswith(b[:-1]) and len(a) > 6000
    assert tracking.param_value(a) != tracking.param_value(b) and len(tracking.param_value(a)) <= 6000
    assert tracking.param_value("short") == "short"
