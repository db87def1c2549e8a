"""The pipeline as a real Prefect flow: runs every stage, then completes from cache."""

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hatchling.stages import STAGES, context, upstream
from tests.conftest import REPO, TINY_PARAMS, copy_project, run_cmd, write_params


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    settings = {PREFECT_LOCAL_STORAGE_PATH: str(storage), PREFECT_SERVER_ANALYTICS_ENABLED: False}
    with temporary_settings(settings), prefect_test_harness():
        yield


def test_flow_runs_then_completes_from_cache_and_reruns_only_what_changed(prefect_env, project, own_tracking):
    from flows.pipeline import pipeline

    first = pipeline(root=str(project))
    assert set(first) == {s.name for s in STAGES}
    assert all(isinstance(m, dict) for m in first.values())
    assert first["pretrain"]["steps"] == TINY_PARAMS["pretrain"]["max_steps"]
    report_before = (project / "reports/pretrain.json").read_text()
    _check_the_ui_shows_the_dag_and_artifacts(project)

    t0 = time.perf_counter()
    second = pipeline(root=str(project))
    cached_seconds = time.perf_counter() - t0
    assert second == {s.name: "cached" for s in STAGES}
    assert (project / "reports/pretrain.json").read_text() == report_before
    print(f"prefect cached rerun: {cached_seconds:.2f}s")

    # a changed rlvr param: the stages upstream stay cached, rlvr and the stages that read it run again
    write_params(project, {**TINY_PARAMS, "rlvr": {**TINY_PARAMS["rlvr"], "max_steps": 1}})
    third = pipeline(root=str(project))
    assert {name for name, m in third.items() if m == "cached"} == {"crawl", "tasks", "dedup", "tokenize",
                                                                   "pretrain", "sft"}
    assert third["rlvr"]["steps"] == 1 and isinstance(third["eval"], dict) and isinstance(third["export"], dict)

    # a deleted output is rebuilt even though its cache key is unchanged; nothing else runs
    scores = json.loads((project / "reports/eval.json").read_text())["scores"]
    (project / "reports/eval.md").unlink()
    fourth = pipeline(root=str(project))
    assert {name for name, m in fourth.items() if m != "cached"} == {"eval"}
    assert (project / "reports/eval.md").is_file()
    assert json.loads((project / "reports/eval.json").read_text())["scores"] == scores

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hatchling")
    runs = client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("hatchling.kind") == "pipeline"]
    assert len(parents) == 4 and all(p.data.tags["hatchling.orchestrator"] == "prefect" for p in parents)
    assert len({p.data.tags["hatchling.prefect_flow_run_id"] for p in parents}) == 4
    assert all(p.data.tags["mlflow.runName"].startswith("prefect ") for p in parents)   # "prefect <flow run name>"
    assert all(p.info.status == "FINISHED" for p in parents)
    second_children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id]
    assert sorted(r.data.tags["hatchling.stage"] for r in second_children) == sorted(s.name for s in STAGES)
    assert all(r.data.tags.get("hatchling.cached") == "true" and not r.data.metrics for r in second_children)
    assert os.environ.get("HATCHLING_PARENT_RUN_ID") is None


def _check_the_ui_shows_the_dag_and_artifacts(project):
    """What the Prefect UI reads: each task run's upstream task runs, and the artifacts by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    (parent,) = client.search_runs([client.get_experiment_by_name("hatchling").experiment_id],
                                   filter_string="tags.`hatchling.kind` = 'pipeline'")
    flow_run_id = parent.data.tags["hatchling.prefect_flow_run_id"]
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        by_id = {r.id: r.name.rsplit("-", 1)[0] for r in runs}
        edges = {(by_id[i.id], by_id[r.id]) for r in runs for i in r.task_inputs.get("wait_for", [])}
        assert edges == {(up, s.name) for s in STAGES for up in upstream(s)}
        keys = ["pretrain-metrics", "eval-report"]
        found = prefect.read_artifacts(artifact_filter=ArtifactFilter(      # this flow run's own, not the
            key=ArtifactFilterKey(any_=keys), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    artifacts = {a.key: a for a in found}                      # latest of a key another test's flow made
    assert sorted(a.key for a in found) == sorted(keys) and artifacts["eval-report"].type == "markdown"
    _check_the_report_card_shows_its_figures(artifacts["eval-report"].data, project)
    table = artifacts["pretrain-metrics"].data         # Prefect stores a table artifact as JSON text
    assert {"metric": "steps", "value": TINY_PARAMS["pretrain"]["max_steps"]} in json.loads(table)


def _check_the_report_card_shows_its_figures(card: str, project):
    """The report card on disk links its figures relatively (right beside it, and in DVC's and MLflow's
    views); in the UI such a link would point at /artifacts/artifact/<figure>: the artifact embeds each
    figure as a data: URI and names its file, and holds no relative link."""
    on_disk = (project / "reports/eval.md").read_text()
    figures = re.findall(r"\]\(([\w.-]+\.png)\)", on_disk)
    assert figures == ["eval_training.png", "eval_probes.png"]
    for name in figures:
        embedded = base64.b64encode((project / "reports" / name).read_bytes()).decode()
        assert f"![{name}](data:image/png;base64,{embedded})" in card and f"`reports/{name}`" in card
    targets = re.findall(r"\]\(([^)\s]+)", card)
    assert targets and all(t.startswith(("data:image/png;base64,", "https://", "http://", "#")) for t in targets)
    kept = [line for line in on_disk.splitlines() if "](" not in line]
    assert all(line in card.splitlines() for line in kept)       # the rest of the card as it is
    assert len(card) < len(on_disk) + 2 * sum((project / "reports" / n).stat().st_size for n in figures)


def test_flow_rejects_bad_params_before_any_stage(prefect_env, project, monkeypatch, capsys):
    from flows.pipeline import pipeline
    from hatchling.config import ConfigError

    write_params(project, {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "lr": "fast"}})
    with pytest.raises(ConfigError, match="pretrain.lr = 'fast'"):
        pipeline(root=str(project))
    assert not (project / "reports").exists() and not (project / "data/crawl").exists()
    # its command line says so in one line, as `hatchling run` does (exit 2), not with a traceback
    from flows.pipeline import main

    monkeypatch.setattr(sys, "argv", ["pipeline.py", "--root", str(project), "--params", str(project / "params.yaml")])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and "pretrain.lr = 'fast'" in err
    assert "Traceback" not in err.split("error: ")[-1]


def test_a_broken_install_fails_the_flow_at_once_with_its_error_even_when_mlflow_fails_too(
        prefect_env, project, monkeypatch, caplog, own_tracking):
    """The crawl (a network stage, retried on failure) is not retried when the environment is
    broken, and the flow raises the stage's own error, not MLflow's failure to record it."""
    from mlflow.exceptions import MlflowException

    from flows.pipeline import pipeline
    from hatchling.data.crawl.mirror import serve_on_loopback
    from hatchling.errors import BrokenEnvironment
    from tests.test_crawl import BROKEN_INSTALL, IMPORT_ERROR, Site, fake_package

    def locked(self, run_id, status="FINISHED", end_time=None):
        raise MlflowException("database is locked")

    fake_package(project.parent, monkeypatch, BROKEN_INSTALL)
    site = Site()
    with serve_on_loopback(site.handler()) as base:
        site.base = base
        write_params(project, {**TINY_PARAMS, "crawl": {**TINY_PARAMS["crawl"], "seeds": [base + "index.html"]}})
        monkeypatch.setattr(MlflowClient, "set_terminated", locked)
        with pytest.raises(BrokenEnvironment, match=re.escape(f"stopped at {base}index.html: ImportError: "
                                                              f"{IMPORT_ERROR}")):
            pipeline(root=str(project), stages=["crawl"])
    assert site.requested("/index.html") == 1                   # tried once: a retry would fail alike
    assert "MLflow could not mark the pipeline run FAILED: MlflowException: database is locked" in caplog.text


DVC = [sys.executable, "-m", "dvc"]


def _dvc_status(proj: Path) -> dict:
    return json.loads(run_cmd(DVC + ["status", "--json"], proj).stdout)


@pytest.fixture
def own_results(prefect_env, tmp_path):
    """A results store (the flow's cache) of the test's own: the module's other flows ran the same stages on
    the same data, and would serve them from their cache."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(tmp_path / "results")}):
        yield


def test_the_flow_and_dvc_repro_share_one_verdict_on_what_is_up_to_date(own_results, pretrained_project, tmp_path,
                                                                       own_tracking):
    """After `dvc repro` the flow does not redo what DVC found up to date, and after the flow DVC has nothing
    to redo: the flow records in dvc.lock each stage it settles."""
    from flows.pipeline import dvc_tracks, pipeline
    from hatchling.stages import get_stage

    proj = copy_project(pretrained_project, tmp_path / "proj")
    run_cmd(DVC + ["init", "-q", "--no-scm"], proj)
    run_cmd(DVC + ["config", "core.analytics", "false"], proj)
    trained = {"crawl", "tasks", "dedup", "tokenize", "pretrain", "sft", "rlvr"}
    run_cmd(DVC + ["commit", "-f", *sorted(trained)], proj)     # dvc.lock as `dvc repro` of those stages leaves it
    assert set(_dvc_status(proj)) == {"eval", "export"}
    written = {name: (proj / get_stage(name).metrics).stat().st_mtime_ns for name in trained}

    first = pipeline(root=str(proj))
    assert {name for name, m in first.items() if m == "cached"} == trained
    assert {name: (proj / get_stage(name).metrics).stat().st_mtime_ns for name in trained} == written  # not run
    assert _dvc_status(proj) == {}                                  # eval and export now in dvc.lock
    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("hatchling").experiment_id], max_results=1000)
    reasons = {r.data.tags["hatchling.stage"]: r.data.tags.get("hatchling.cache_reason") for r in runs
               if "hatchling.stage" in r.data.tags}
    assert reasons == {**{name: "up to date in dvc.lock" for name in trained}, "eval": None, "export": None}

    write_params(proj, {**TINY_PARAMS, "rlvr": {**TINY_PARAMS["rlvr"], "max_steps": 1}})
    assert set(_dvc_status(proj)) == {"rlvr"}
    lock_before = (proj / "dvc.lock").read_text()
    second = pipeline(root=str(proj))
    assert {name for name, m in second.items() if m != "cached"} == {"rlvr", "eval", "export"}
    assert second["rlvr"]["steps"] == 1 and _dvc_status(proj) == {}
    lock_after = (proj / "dvc.lock").read_text()
    assert "Stage 'rlvr' didn't change" in run_cmd(DVC + ["repro"], proj).stdout

    # a dvc.lock put back (a checkout of an older one): served from the flow's own cache, and recorded again
    (proj / "dvc.lock").write_text(lock_before)
    assert pipeline(root=str(proj)) == {s.name: "cached" for s in STAGES}
    assert (proj / "dvc.lock").read_text() == lock_after and _dvc_status(proj) == {}
    runs = client.search_runs([client.get_experiment_by_name("hatchling").experiment_id], max_results=1000,
                              order_by=["attributes.start_time DESC"])
    last = next(r for r in runs if r.data.tags.get("hatchling.kind") == "pipeline")
    reasons = {r.data.tags["hatchling.stage"]: r.data.tags["hatchling.cache_reason"] for r in runs
               if r.data.tags.get("mlflow.parentRunId") == last.info.run_id}
    stale_then = {"rlvr", "eval", "export"}          # what the older dvc.lock called stale: the flow's cache served
    assert reasons == {s.name: "inputs, params and code unchanged" if s.name in stale_then else
                       "up to date in dvc.lock" for s in STAGES}

    # a run dvc.lock does not speak for: other params or overrides, or a project without DVC
    params = str(proj / "params.yaml")
    assert dvc_tracks(proj, params, []) and not dvc_tracks(proj, params, ["rlvr.max_steps=2"])
    assert not dvc_tracks(proj, str(REPO / "params-gpu.yaml"), []) and not dvc_tracks(tmp_path, params, [])


def test_a_stages_log_holds_each_progress_bar_once_as_it_ended():
    """A progress bar redraws its line with carriage returns: the task's log held one line per redraw."""
    import io

    from flows.pipeline import settled_lines

    stderr = io.BytesIO(b"tokenize: 3 shards\n\r  0%|   | 0/3\r 33%|#  | 1/3\r100%|###| 3/3\r\n\n"
                        b"eval: 10%\reval: 100%\nerror: caf\xc3\xa9 \xff\n")
    assert list(settled_lines(stderr)) == ["tokenize: 3 shards", "100%|###| 3/3", "eval: 100%",
                                           "error: caf\u00e9 \ufffd"]


def test_a_cached_result_needs_the_stages_logs_as_dvc_does(tmp_path):
    """DVC reruns a stage whose logs/*.csv (cache-false outs) changed or went; the flow's cache did not."""
    from flows.pipeline import outputs_hash
    from hatchling.stages import get_stage

    sft = get_stage("sft")
    for path in (*sft.outs, *sft.kept_in_git, sft.metrics):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(path)
    before = outputs_hash(sft, tmp_path)
    (tmp_path / "logs/sft_eval.csv").write_text("step,val_loss\n1,0.0\n")
    edited = outputs_hash(sft, tmp_path)
    (tmp_path / "logs/sft.csv").unlink()
    assert len({before, edited, outputs_hash(sft, tmp_path)}) == 3


def test_deployment_file_points_at_the_flow():
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    from tests.conftest import REPO

    spec = yaml.safe_load((REPO / "flows/prefect.yaml").read_text())
    (deployment,) = spec["deployments"]
    assert deployment["work_pool"]["name"] == "gpu-pool"
    flow_obj = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
    assert flow_obj.name == "hatchling-pipeline"
    assert set(deployment["parameters"]) <= set(flow_obj.parameters.properties)


@pytest.fixture(scope="module")
def dask_cluster():
    """A real local Dask cluster of two worker processes."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        yield cluster


def test_a_failing_shard_on_a_dask_cluster_raises_its_own_error(prefect_env, dask_cluster):
    from hatchling.data.shard_map import map_ordered
    from tests.test_shard_map import fails_on_three

    with pytest.raises(ValueError, match="item 3 is bad"):
        list(map_ordered(fails_on_three, range(5), 2, "dask", dask_cluster.scheduler_address))


def test_dedup_and_tokenize_on_a_dask_cluster_equal_the_local_run(prefect_env, dask_cluster, tokenized_project,
                                                                   tmp_path, monkeypatch):
    """Shards mapped through Prefect's DaskTaskRunner on a real local Dask cluster (two worker
    processes) give byte-identical outputs to the local run."""
    from distributed import Client, get_task_stream

    from hatchling.config import validate_params
    from hatchling.data import dedup_stage, tokenize
    from tests.conftest import copy_project

    proj = copy_project(tokenized_project, tmp_path / "dask")
    shutil.rmtree(proj / "data/dedup")
    shutil.rmtree(proj / "data/tokenized")
    scale = {"runner": "dask", "address": dask_cluster.scheduler_address}
    tree = {**TINY_PARAMS, "dedup": {**TINY_PARAMS["dedup"], "scale": scale},
            "tokenize": {**TINY_PARAMS["tokenize"], "scale": scale}}
    params = validate_params(tree)
    monkeypatch.setattr(tokenize, "BATCH_DOCS", 2)     # several tasks even on the tiny corpus
    with Client(dask_cluster.scheduler_address) as client, get_task_stream(client) as stream:
        dedup_stage.run(context("dedup", params, proj))
        tokenize.run(context("tokenize", params, proj))
    ran = {t["key"].split("-")[0] for t in stream.data}
    shards = len(list((tokenized_project / "data/crawl").glob("*.jsonl")))
    assert len(stream.data) >= shards and {"_signatures_of", "_encode_batch"} <= ran, ran
    ours = sorted((proj / "data/dedup").glob("*.jsonl"))
    assert [p.name for p in ours] == [p.name for p in sorted((tokenized_project / "data/dedup").glob("*.jsonl"))]
    for p in ours:
        assert p.read_bytes() == (tokenized_project / "data/dedup" / p.name).read_bytes()
    for name in ("tokenizer.json", "train.bin", "val.bin", "meta.json"):
        ours, local = proj / "data/tokenized" / name, tokenized_project / "data/tokenized" / name
        assert ours.read_bytes() == local.read_bytes()


class Killer(threading.Thread):
    """kill -9 to the pretrain process of `proj` (the holder its stage lock names): the first once its
    resume checkpoint holds step `at_step` or later, each later one as soon as it holds the lock;
    `times` in all. `steps`: the checkpoint's step at each kill."""

    def __init__(self, proj: Path, at_step: int, times: int = 1):
        super().__init__(daemon=True)
        self.lock, self.sidecar = proj / ".hatchling/locks/pretrain.lock", proj / "checkpoints/pretrain-run/model.json"
        self.at_step, self.times, self.steps, self.done = at_step, times, [], threading.Event()

    def run(self):
        killed, deadline = set(), time.monotonic() + 300
        while len(killed) < self.times and time.monotonic() < deadline and not self.done.is_set():
            try:
                pid = json.loads(self.lock.read_text())["pid"]
            except (FileNotFoundError, ValueError, KeyError):
                pid = None
            step = json.loads(self.sidecar.read_text())["step"] if self.sidecar.is_file() else 0
            if pid is not None and pid not in killed and (killed or step >= self.at_step):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
                self.steps.append(step)
            time.sleep(0.005)


def test_a_killed_trainer_resumes_under_either_orchestrator_and_a_flow_that_cannot_recover_ends_failed(
        prefect_env, tokenized_project, tmp_path, monkeypatch, own_tracking):
    """A pretrain killed under `hatchling run` resumes in the flow; the flow's own pretrain process, killed,
    is retried by Prefect and resumes again, ending with the weights of an uninterrupted run, its MLflow
    run FINISHED (the killed attempt's run KILLED, with why). A pretrain killed on every attempt fails the
    flow: its MLflow run ends FAILED naming the stage and the kill, and `hatchling run` in a moved copy
    of the project resumes from the checkpoint the flow left (its fingerprint does not depend on who
    runs it, or where)."""
    import torch
    from safetensors.torch import load_file

    from flows.pipeline import TASKS, StageProcessFailed, pipeline
    from tests.conftest import copy_project, hatchling_cmd, hatchling_here, project_env

    # Prefect retries the killed trainer as the flow says (twice), without its 5 s waits in between
    monkeypatch.setitem(TASKS, "pretrain", TASKS["pretrain"].with_options(retry_delay_seconds=[0, 0]))
    params = {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "max_steps": 12, "checkpoint_every": 3}}

    def project(name: str, source: Path = tokenized_project) -> Path:
        proj = copy_project(source, tmp_path / name)
        for made in ("checkpoints", "logs"):
            shutil.rmtree(proj / made, ignore_errors=True)
        write_params(proj, params)
        return proj

    def weights(proj: Path) -> dict:
        return load_file(str(proj / "checkpoints/pretrain/model.safetensors"))

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def pipeline_runs(proj: Path):
        client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("hatchling").experiment_id],
                                  order_by=["attributes.start_time ASC"])
        (parent,) = [r for r in runs if r.data.tags.get("hatchling.orchestrator") == "prefect"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                    and r.data.tags["hatchling.stage"] == "pretrain"]
        return parent, children

    straight = project("straight")
    assert hatchling_here(straight, "run", "pretrain") == 0
    reference = weights(straight)

    # killed under `hatchling run` at step 6, then in the flow at step 9: Prefect retries, and it resumes
    proj = project("retried")
    killer = Killer(proj, at_step=6)
    killer.start()
    assert subprocess.run(hatchling_cmd("run", "pretrain"), cwd=proj, env=project_env(proj),
                          capture_output=True, timeout=300).returncode == -signal.SIGKILL
    killer.join()
    killer = Killer(proj, at_step=9)
    killer.start()
    result = pipeline(root=str(proj), stages=["pretrain"])
    killer.done.set()
    assert killer.steps == [9] and result["pretrain"]["resumed_from_step"] == 9 and same(weights(proj), reference)
    parent, children = pipeline_runs(proj)
    assert parent.info.status == "FINISHED" and "hatchling.failed_stage" not in parent.data.tags
    assert [r.info.status for r in children] == ["KILLED", "FINISHED"]
    assert children[0].data.tags["hatchling.error"] == "stage pretrain: its process was killed by SIGKILL"

    # killed on the first attempt (at step 6) and on both retries: the flow fails, and says why. (Its data
    # stages' outputs are those the flow above made and Prefect cached: it runs pretrain alone.)
    proj = project("gave-up", source=proj)
    killer = Killer(proj, at_step=6, times=3)
    killer.start()
    with pytest.raises(StageProcessFailed, match="stage pretrain: its process was killed by SIGKILL"):
        pipeline(root=str(proj), stages=["pretrain"])
    killer.done.set()
    assert len(killer.steps) == 3 and killer.steps[0] >= 6
    parent, children = pipeline_runs(proj)
    assert parent.info.status == "FAILED" and parent.data.tags["hatchling.failed_stage"] == "pretrain"
    assert parent.data.tags["hatchling.error"] == ("StageProcessFailed: stage pretrain: its process was killed "
                                                   "by SIGKILL")
    assert children and {r.info.status for r in children} == {"KILLED"}    # (the retries died before they had one)
    moved = proj.rename(tmp_path / "moved")
    assert hatchling_here(moved, "run", "pretrain") == 0
    resumed = json.loads((moved / "reports/pretrain.json").read_text())["resumed_from_step"]
    assert resumed >= killer.steps[0] >= 6 and same(weights(moved), reference)


def test_items_larger_than_prefects_parameter_limit_map_on_a_dask_cluster(prefect_env, dask_cluster):
    """Prefect's API refuses a flow run whose parameters exceed 512 KB: the items reach the workers by the task
    runner, not as the mapping flow's parameter (tokenize's batches of documents on the default corpus)."""
    from hatchling.data.shard_map import map_ordered
    from hatchling.io import sha1_text

    texts = [f"{i} " + "word " * 60_000 for i in range(4)]         # 1.2 MB in all
    assert list(map_ordered(sha1_text, texts, 2, "dask", dask_cluster.scheduler_address)) == list(map(sha1_text, texts))


@pytest.mark.parametrize("address, why", [
    ("tcp://127.0.0.1:9", r"scale.address 'tcp://127.0.0.1:9': nothing answers there \(Connection refused\); start "
                          r"the dask cluster, or leave the address out for a local one"),
    ("nonsense", r"scale.address 'nonsense': a dask cluster's address is tcp or tls://host:port"),
    ("127.0.0.1:9", r"scale.address '127.0.0.1:9': nothing answers there \(Connection refused\); start "
                    r"the dask cluster, or leave the address out for a local one"),
    ("tcp://scheduler:port", r"scale.address 'tcp://scheduler:port': a dask cluster's address is tcp or tls://host:port"),
])
def test_a_cluster_address_that_does_not_answer_is_one_error_before_any_work(address, why):
    from hatchling.data.shard_map import map_ordered
    from hatchling.errors import ConfigError
    from hatchling.io import sha1_text

    with pytest.raises(ConfigError, match=f"^{why}$"):
        list(map_ordered(sha1_text, ["a", "b"], 2, "dask", address))


def test_ray_without_its_integration_says_what_to_install(monkeypatch):
    from hatchling.data.shard_map import map_ordered
    from hatchling.errors import ConfigError
    from hatchling.io import sha1_text

    monkeypatch.setitem(sys.modules, "prefect_ray", None)          # as if not installed
    with pytest.raises(ConfigError, match=r"^scale.runner ray: prefect-ray is not installed \(pip install -e "
                                          r"'.\[scale\]'\)$"):
        list(map_ordered(sha1_text, ["a", "b"], 2, "ray", "ray://127.0.0.1:10001"))
