"""MLflow as its users expect: training stages log a text-generating model, the pipeline's final
model is registered with an alias, inputs are datasets, training runs carry system metrics."""

from __future__ import annotations

import os
import shutil

import mlflow
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from hatchling.checkpoint import load_for_inference
from hatchling.data.chat import render_chat, stop_ids
from hatchling.data.tokenizer import EOT, document_ids
from hatchling.inference import generate_text
from hatchling.registry import CANDIDATE, REGISTERED_MODEL, log_model
from tests.conftest import copy_project, hatchling_cmd, hatchling_here, run_cmd


def _stage_runs(client: MlflowClient) -> dict[str, object]:
    exp = client.get_experiment_by_name("hatchling")
    runs = client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time DESC"])
    latest = {}
    for run in runs:
        latest.setdefault(run.data.tags.get("hatchling.stage"), run)
    return latest


def test_stages_log_models_and_rlvr_registers_the_candidate(pretrained_project, tmp_path, monkeypatch):
    proj = copy_project(pretrained_project, tmp_path / "proj")
    shutil.copy(pretrained_project / "mlflow.db", proj / "mlflow.db")     # a copy of the store: its database
    shutil.copytree(pretrained_project / "mlruns", proj / "mlruns")       # and its artifacts, store-relative
    monkeypatch.chdir(proj)
    uri = f"sqlite:///{proj / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    runs = _stage_runs(client)
    exp = client.get_experiment_by_name("hatchling").experiment_id
    logged = {}
    for stage in ("pretrain", "sft", "rlvr"):
        models = client.search_logged_models([exp], filter_string=f"source_run_id = '{runs[stage].info.run_id}'")
        assert len(models) == 1, stage
        logged[stage] = models[0].model_uri
    inputs = {d.dataset.name: d.dataset for d in runs["rlvr"].inputs.dataset_inputs}
    assert set(inputs) == {"init", "tasks"} and inputs["init"].source == "checkpoints/sft"
    assert all(len(d.digest) == 36 for d in inputs.values())

    candidate = client.get_model_version_by_alias(REGISTERED_MODEL, CANDIDATE)
    assert candidate.run_id == runs["rlvr"].info.run_id
    where = client.get_model_version_download_uri(REGISTERED_MODEL, candidate.version)
    answers = mlflow.pyfunc.load_model(where).predict(
        pd.DataFrame({"prompt": ["What is 2 + 3?", "Write a function"]}), params={"max_new_tokens": 6})
    model, tokenizer, _ = load_for_inference(proj / "checkpoints/rlvr")      # the same as answering directly
    expected = [generate_text(model, render_chat(tokenizer, [{"role": "user", "content": q}],
                                                 add_generation_prompt=True), 6, tokenizer.decode, seed=0,
                              stop_ids=stop_ids(tokenizer), device=torch.device("cpu"))
                for q in ("What is 2 + 3?", "Write a function")]
    assert list(answers) == expected
    # a base model continues its prompt from a document's start, as generate and the eval feed it
    base, tokenizer, _ = load_for_inference(proj / "checkpoints/pretrain")
    continued = mlflow.pyfunc.load_model(logged["pretrain"]).predict(pd.DataFrame({"prompt": ["def add"]}),
                                                                      params={"max_new_tokens": 6})
    assert list(continued) == [generate_text(base, document_ids(tokenizer, "def add"), 6, tokenizer.decode, seed=0,
                                             stop_ids=(tokenizer.token_to_id(EOT),), device=torch.device("cpu"))]

    # logging a model in-process leaves the environment's tracking URI as it found it (MLflow exports its own),
    # and from another working directory (a flow run given the root) puts it beside this copy's store
    before = os.environ.get("MLFLOW_TRACKING_URI")
    fresh = client.create_run(exp).info.run_id
    monkeypatch.chdir(tmp_path)
    model_uri = log_model(fresh, uri, proj / "checkpoints/sft", register=False)
    assert os.environ.get("MLFLOW_TRACKING_URI") == before and os.getcwd() == str(tmp_path)
    location = client.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    assert (proj / location / "MLmodel").is_file() and not (tmp_path / "mlruns").exists()
    assert not list((pretrained_project / "mlruns").rglob(model_uri.removeprefix("models:/")))
    monkeypatch.chdir(proj)

    assert hatchling_here(proj, "promote", runs["rlvr"].info.run_id) == 0
    assert client.get_model_version_by_alias(REGISTERED_MODEL, "champion").version == candidate.version
    assert hatchling_here(proj, "promote", runs["pretrain"].info.run_id) == 2     # pretrain registers nothing


def test_a_training_stage_records_system_metrics(tokenized_project, tmp_path, monkeypatch):
    proj = copy_project(tokenized_project, tmp_path / "proj")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.3")    # MLflow's knob: sample a short run
    run_cmd(hatchling_cmd("run", "pretrain", "--set", "pretrain.max_steps=12"), proj)
    run = _stage_runs(MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}"))["pretrain"]
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
