"""MLflow models of the pipeline's checkpoints: a pyfunc that generates text, logged on its stage's
run, and the model registry's one name with its aliases.

Each training stage's checkpoint becomes an MLflow model (`runs:/<run>/model`): a
:class:`TextGenerator` with the checkpoint and hatchling's own code inside, so
``mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"prompt": [...]}))`` answers with no params.yaml
and no run state. The final model of a pipeline (rlvr) is registered as a new version of
``hatchling`` with the alias ``candidate``; ``hatchling promote`` (or the MLflow UI) moves
``champion`` to a version once it has earned it.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import hatchling
from hatchling import tracking
from hatchling.checkpoint import load_for_inference
from hatchling.data.chat import render_chat, stop_ids
from hatchling.data.tokenizer import EOT, document_ids
from hatchling.errors import InputError
from hatchling.inference import generate_text

REGISTERED_MODEL = "hatchling"
CANDIDATE, CHAMPION = "candidate", "champion"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
    params=ParamSchema([ParamSpec("max_new_tokens", "long", 32), ParamSpec("temperature", "double", 0.0)]))
EXAMPLE = (pd.DataFrame({"prompt": ["The json module"]}), {"max_new_tokens": 4})


class TextGenerator(mlflow.pyfunc.PythonModel):
    """prompt -> completion. A chat checkpoint (sft, rlvr) answers the prompt as a user turn of its
    chat template; a base checkpoint continues the text."""

    def load_context(self, context) -> None:
        self.device = torch.device("cpu")
        self.model, self.tokenizer, meta = load_for_inference(context.artifacts["checkpoint"], device=self.device)
        self.chat = meta.get("stage") in ("sft", "rlvr")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        params = {"max_new_tokens": 32, "temperature": 0.0, **(params or {})}
        return [self.complete(str(prompt), int(params["max_new_tokens"]), float(params["temperature"]))
                for prompt in model_input["prompt"]]

    def complete(self, prompt: str, max_new_tokens: int, temperature: float) -> str:
        if self.chat:
            ids = render_chat(self.tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
            stop = stop_ids(self.tokenizer)
        else:
            ids, stop = document_ids(self.tokenizer, prompt), (self.tokenizer.token_to_id(EOT),)
        return generate_text(self.model, ids, max_new_tokens, self.tokenizer.decode, temperature=temperature,
                             seed=0, stop_ids=stop, device=self.device)


#: what the logged model's code (hatchling.model and the checkpoint loader) imports beyond the standard library
MODEL_PACKAGES = ("torch", "numpy", "tokenizers", "safetensors", "pydantic", "faiss-cpu")


def model_requirements() -> list[str]:
    """The logged model's pip requirements: MODEL_PACKAGES pinned to the versions installed here, without a
    local label (torch's "+cpu" names no release on PyPI: "2.13.0+cpu" -> "2.13.0")."""
    return [f"{name}=={version(name).split('+')[0]}" for name in MODEL_PACKAGES]


def log_model(run_id: str, tracking_uri: str, checkpoint: Path, register: bool) -> str:
    """Log `checkpoint` as the run's MLflow model; with `register`, as a new version of the registered
    model aliased `candidate`. Returns the model's URI."""
    requirements = model_requirements()
    checkpoint, code = Path(checkpoint).resolve(), Path(hatchling.__file__).resolve().parent
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)          # MLflow's fluent API (log_model) uses the global URI ...
    try:
        # the model's artifacts go where the experiment's (store-relative) location says
        with tracking.in_store_dir(tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=TextGenerator(),
                                           artifacts={"checkpoint": str(checkpoint)},
                                           code_paths=[str(code)], signature=SIGNATURE,
                                           input_example=EXAMPLE, pip_requirements=requirements)
        if register:
            registered = mlflow.register_model(info.model_uri, REGISTERED_MODEL)
            mlflow.MlflowClient(tracking_uri).set_registered_model_alias(REGISTERED_MODEL, CANDIDATE,
                                                                         registered.version)
    finally:                                        # ... and exports it to the environment: put both back
        mlflow.set_tracking_uri(previous)
    return info.model_uri


def promote(client, run_id: str, alias: str = CHAMPION) -> str:
    """Point `alias` at the registered version logged by run `run_id` (a stage's run id); its version."""
    if not re.fullmatch(r"[0-9a-f]{32}", run_id):
        raise InputError(f"{run_id!r} is not an MLflow run id (32 hexadecimal digits: the rlvr stage's run, in the "
                         "MLflow UI or `mlflow runs search`)")
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}' and run_id = '{run_id}'")
    if not versions:
        raise InputError(f"no version of the registered model {REGISTERED_MODEL!r} comes from run {run_id} "
                         "(the rlvr stage's run registers one)")
    client.set_registered_model_alias(REGISTERED_MODEL, alias, versions[0].version)
    return versions[0].version
