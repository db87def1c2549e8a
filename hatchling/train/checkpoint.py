"""Checkpoints: safetensors weights + a JSON sidecar (model config, tokenizer hash, step, data hash).

A model checkpoint loads in a fresh process with nothing but these two files. The training
checkpoint adds optimizer and RNG state (trainer.pt) so a killed run resumes bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hatchling.errors import InputError, MissingInputError
from hatchling.io import atomic_path
from hatchling.model import HatchlingLM, build_model

WEIGHTS, SIDECAR, TRAINER, TOKENIZER = "model.safetensors", "model.json", "trainer.pt", "tokenizer.json"


def _state_dict(model: torch.nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_model(model: HatchlingLM, directory: str | Path, sidecar: dict, trainer_state: dict | None = None,
               files: dict[str, Path] | None = None, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write weights, sidecar, extra files (name -> source path) and trainer state into `directory`,
    replacing it atomically. `weights` overrides the model's own state dict (exports)."""
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        save_file(weights if weights is not None else _state_dict(model), str(tmp / WEIGHTS))
        meta = {"format": "fp32", "model_config": model.config.model_dump(mode="json"), **sidecar}
        (tmp / SIDECAR).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name, source in (files or {}).items():
            shutil.copyfile(source, tmp / name)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER)
        if hasattr(model, "save_state_files"):            # e.g. the episodic memory's store
            model.save_state_files(tmp)


def read_sidecar(directory: str | Path) -> dict:
    path = Path(directory) / SIDECAR
    if not path.is_file():
        raise MissingInputError(f"no checkpoint at {directory} (missing {SIDECAR})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"corrupted checkpoint sidecar {path}: {e.msg}") from None


def load_weights(directory: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The stored tensors of a checkpoint, with one clear error for a truncated or garbled file."""
    try:
        return load_file(str(Path(directory) / WEIGHTS), device=device)
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise InputError(f"corrupted checkpoint weights in {directory}: {e}") from None


def load_model(directory: str | Path, device: str = "cpu") -> tuple[HatchlingLM, dict]:
    """(model, sidecar) from a checkpoint directory; clear errors for a missing or corrupted one."""
    meta = read_sidecar(directory)
    model = build_model(meta["model_config"])
    model.load_state_dict(load_weights(directory, device))
    if hasattr(model, "load_state_files"):
        model.load_state_files(directory)
    return model.to(device), meta


def load_trainer_state(directory: str | Path) -> dict:
    return torch.load(Path(directory) / TRAINER, weights_only=True)
