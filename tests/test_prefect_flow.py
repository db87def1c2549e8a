"""The pipeline as a real Prefect flow: runs every stage, then completes from cache."""

import json
import os
import shutil
import time

import pytest
from mlflow.tracking import MlflowClient

from hatchling.stages import STAGES
from tests.conftest import TINY_PARAMS, write_params


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    settings = {PREFECT_LOCAL_STORAGE_PATH: str(storage), PREFECT_SERVER_ANALYTICS_ENABLED: False}
    with temporary_settings(settings), prefect_test_harness():
        yield


def test_flow_runs_then_completes_from_cache_and_reruns_only_what_changed(prefect_env, project, monkeypatch):
    from flows.pipeline import pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("HATCHLING_PARENT_RUN_ID", raising=False)
    first = pipeline(root=str(project))
    assert set(first) == {s.name for s in STAGES}
    assert all(isinstance(m, dict) for m in first.values())
    assert first["pretrain"]["steps"] == TINY_PARAMS["pretrain"]["max_steps"]
    report_before = (project / "reports/pretrain.json").read_text()

    t0 = time.perf_counter()
    second = pipeline(root=str(project))
    cached_seconds = time.perf_counter() - t0
    assert second == {s.name: "cached" for s in STAGES}
    assert (project / "reports/pretrain.json").read_text() == report_before
    print(f"prefect cached rerun: {cached_seconds:.2f}s")

    # a changed pretrain param: upstream stages stay cached, pretrain runs again
    write_params(project, {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "max_steps": 4}})
    third = pipeline(root=str(project))
    assert third["crawl"] == third["tokenize"] == "cached" and third["pretrain"]["steps"] == 4

    # a deleted output is rebuilt even though its cache key is unchanged
    (project / "data/tokenized/meta.json").unlink()
    fourth = pipeline(root=str(project))
    assert fourth["crawl"] == "cached" and isinstance(fourth["tokenize"], dict)
    assert json.loads((project / "data/tokenized/meta.json").read_text())["vocab_size"] <= 320

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hatchling")
    runs = client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("hatchling.kind") == "pipeline"]
    assert [p.data.tags["mlflow.runName"] for p in parents] == ["prefect flow"] * 4
    assert all(p.info.status == "FINISHED" for p in parents)
    second_children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id]
    assert sorted(r.data.tags["hatchling.stage"] for r in second_children) == sorted(s.name for s in STAGES)
    assert all(r.data.tags.get("hatchling.cached") == "true" and not r.data.metrics for r in second_children)
    assert os.environ.get("HATCHLING_PARENT_RUN_ID") is None


def test_flow_rejects_bad_params_before_any_stage(prefect_env, project):
    from flows.pipeline import pipeline
    from hatchling.config import ConfigError

    write_params(project, {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "lr": "fast"}})
    with pytest.raises(ConfigError, match="pretrain.lr = 'fast'"):
        pipeline(root=str(project))
    assert not (project / "reports").exists() and not (project / "data").exists()


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


def test_dedup_and_tokenize_on_a_dask_cluster_equal_the_local_run(prefect_env, tokenized_project, tmp_path,
                                                                   monkeypatch):
    """Shards mapped through Prefect's DaskTaskRunner on a real local Dask cluster (two worker
    processes) give byte-identical outputs to the local run."""
    from distributed import Client, LocalCluster, get_task_stream

    from hatchling.config import validate_params
    from hatchling.data import dedup_stage, tokenize
    from tests.conftest import copy_project

    proj = copy_project(tokenized_project, tmp_path / "dask")
    shutil.rmtree(proj / "data/dedup")
    shutil.rmtree(proj / "data/tokenized")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        scale = {"runner": "dask", "address": cluster.scheduler_address}
        tree = {**TINY_PARAMS, "dedup": {**TINY_PARAMS["dedup"], "scale": scale},
                "tokenize": {**TINY_PARAMS["tokenize"], "scale": scale}}
        params = validate_params(tree)
        monkeypatch.setattr(tokenize, "BATCH_DOCS", 2)     # several tasks even on the tiny corpus
        with Client(cluster.scheduler_address) as client, get_task_stream(client) as stream:
            dedup_stage.run(params, proj)
            tokenize.run(params, proj)
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
