"""MLflow as its users expect: training stages log a text-generating model, the pipeline's final
model is registered with an alias, inputs are datasets, training runs carry system metrics."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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


def test_stages_log_models_and_rlvr_registers_the_candidate(pretrained_project, tmp_path, monkeypatch, capsys):
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
    capsys.readouterr()
    assert hatchling_here(proj, "promote", runs["pretrain"].info.run_id) == 2     # pretrain registers nothing
    assert capsys.readouterr().err.startswith("error: ")
    assert hatchling_here(proj, "promote", "abc'def") == 2           # not a run id: never put into MLflow's filter
    assert capsys.readouterr().err == ("error: \"abc'def\" is not an MLflow run id (32 hexadecimal digits: the rlvr "
                                       "stage's run, in the MLflow UI or `mlflow runs search`)\n")
    elsewhere = tmp_path / "not-a-project"                     # no store there: said, and none made
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert hatchling_here(elsewhere, "promote", runs["rlvr"].info.run_id) == 2 and not list(elsewhere.iterdir())
    assert capsys.readouterr().err == (f"error: no MLflow store at {elsewhere / 'mlflow.db'}: run `hatchling promote` "
                                       "in the project whose pipeline registered the model\n")


def test_a_training_stage_records_system_metrics(tokenized_project, tmp_path, monkeypatch):
    proj = copy_project(tokenized_project, tmp_path / "proj")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.3")    # MLflow's knob: sample a short run
    run_cmd(hatchling_cmd("run", "pretrain", "--set", "pretrain.max_steps=12"), proj)
    run = _stage_runs(MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}"))["pretrain"]
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)



def test_the_logged_models_requirements_cover_what_its_code_imports():
    """A model served in an environment of its own (mlflow models serve, env_manager="virtualenv") installs
    these: every third-party package the model's code imports when it loads is one of them (or MLflow, which
    that environment has), each pinned to a release PyPI has (no "+cpu")."""
    import ast
    import subprocess
    import sys
    from importlib.metadata import packages_distributions

    import hatchling
    from hatchling.registry import MODEL_PACKAGES, model_requirements

    script = ("import sys, hatchling.registry, hatchling.checkpoint, hatchling.model.memory\n"
              "print(' '.join(m for m in sys.modules if m.startswith('hatchling')))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    owners, package = packages_distributions(), Path(hatchling.__file__).parent
    imported = set()
    for module in loaded:
        path = package.parent / (module.replace(".", "/") + ".py")
        tree = ast.parse((path if path.is_file() else path.with_suffix("") / "__init__.py").read_text())
        for node in tree.body:                                    # what loading the module imports
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            imported |= {n.split(".")[0] for n in names}
    third_party = imported - set(sys.stdlib_module_names) - {"hatchling", "__future__"}
    distributions = {dist.lower() for module in third_party for dist in owners[module]}
    assert {"faiss-cpu", "numpy", "torch"} <= distributions
    assert distributions <= set(MODEL_PACKAGES) | {"mlflow", "mlflow-skinny", "mlflow-tracing", "pandas"}, distributions
    assert all("+" not in r and r.split("==")[0] in MODEL_PACKAGES for r in model_requirements())
