"""Checkpoints: safetensors weights + a JSON sidecar (model config, tokenizer hash, step, data hash).

The one place any checkpoint is written and read: a training resume, the init of SFT and RLVR,
inference, the eval and the export. A checkpoint loads in a fresh process with nothing but its
directory: model.safetensors, model.json and (from pretraining on) tokenizer.json; no params.yaml,
no run state. The sidecar's ``format`` says how the weights are stored: ``fp32`` (training
checkpoints), ``int8`` or ``bf16`` (exports, hatchling/model/int8.py). A training checkpoint adds
optimizer and RNG state (trainer.pt) so a killed run resumes bit for bit. The sidecar records the
sha256 of the weights file (``weights_sha256``), checked at every load: a truncated or tampered
file (even one flipped byte inside a tensor, which the safetensors format cannot see) is refused by
name instead of loading wrong weights.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from hatchling.data.tokenizer import TOKENIZER, load_tokenizer
from hatchling.errors import InputError, MissingInputError
from hatchling.io import atomic_path, file_sha256, new_file_mode
from hatchling.model import build_model
from hatchling.model.base import LanguageModel
from hatchling.model.int8 import dequantize_state_dict, use_int8_linears

logger = logging.getLogger(__name__)

WEIGHTS, SIDECAR, TRAINER = "model.safetensors", "model.json", "trainer.pt"
FORMATS = ("fp32", "bf16", "int8")


def _state_dict(model: torch.nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_model(model: LanguageModel, directory: str | Path, sidecar: dict, trainer_state: dict | None = None,
               files: dict[str, Path] | None = None, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write weights, sidecar, extra files (name -> source path), trainer state and the model's own
    state files into `directory`, replacing it atomically. `weights` overrides the model's own
    state dict (exports; the sidecar then names their ``format``)."""
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        save_file(weights if weights is not None else _state_dict(model), str(tmp / WEIGHTS))
        os.chmod(tmp / WEIGHTS, new_file_mode())          # readable as the other files are
        meta = {"format": "fp32", "model_config": model.config.model_dump(mode="json"), **sidecar,
                "weights_sha256": file_sha256(tmp / WEIGHTS)}
        (tmp / SIDECAR).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name, source in (files or {}).items():
            shutil.copyfile(source, tmp / name)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER)
        model.save_state_files(tmp)


def read_sidecar(directory: str | Path) -> dict:
    path = Path(directory) / SIDECAR
    if not path.is_file():
        raise MissingInputError(f"no checkpoint at {directory} (missing {SIDECAR})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"corrupted checkpoint sidecar {path}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"corrupted checkpoint sidecar {path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(meta, dict):
        raise InputError(f"corrupted checkpoint sidecar {path}: a JSON {type(meta).__name__}, not an object")
    return meta


def verified(directory: str | Path, name: str, expected: str | None) -> Path:
    """The checkpoint file `name` in `directory`, with one clear error when it is missing or its sha256 is
    not the `expected` one its sidecar records (when the sidecar records one): truncated, tampered, replaced."""
    path = Path(directory) / name
    what = "weights" if name == WEIGHTS else "file"
    if not path.is_file():
        raise MissingInputError(f"no checkpoint {what} at {path}")
    if expected and (got := file_sha256(path)) != expected:
        raise InputError(f"corrupted checkpoint {what} {path}: sha256 {got} is not the {expected} recorded in "
                         f"{Path(directory) / SIDECAR} at save time (truncated, tampered or replaced)")
    return path


def load_checkpoint_tokenizer(directory: str | Path, meta: dict):
    """The tokenizer saved with a checkpoint (`meta`: its sidecar), checked against the sidecar's hash."""
    return load_tokenizer(verified(directory, TOKENIZER, meta.get("tokenizer_sha256")))


def load_weights(directory: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The stored tensors of a checkpoint, with one clear error for a truncated, garbled or tampered
    file: its sha256 is checked against the sidecar's ``weights_sha256`` (when the sidecar has one)."""
    path = verified(directory, WEIGHTS, read_sidecar(directory).get("weights_sha256"))
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise InputError(f"corrupted checkpoint weights {path}: {e}") from None


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               compute: str = "fp32") -> tuple[LanguageModel, dict]:
    """(model, sidecar) from a checkpoint directory of any format, in float32 on `device`; clear
    errors for a missing or corrupted one. compute="int8" keeps an INT8 checkpoint's Linear weights
    int8 (run by PyTorch's weight-only int8 kernel) instead of dequantizing them."""
    directory = Path(directory)
    meta = read_sidecar(directory)
    fmt = meta.get("format", "fp32")
    if fmt not in FORMATS:
        raise InputError(f"{directory}: unknown checkpoint format {fmt!r}")
    sd = load_weights(directory)
    if not isinstance(meta.get("model_config"), dict):
        raise InputError(f"{directory / SIDECAR}: no model_config object (not a checkpoint's sidecar?)")
    config = {**meta["model_config"], "memory_path": None}
    if config.get("kda_backend") == "fla" and torch.device(device).type != "cuda":
        # how the KDA op is computed, not what: fla's Triton kernel runs on CUDA only; elsewhere auto takes the
        # chunked op, the same function (tests/test_kda_fla.py), so a checkpoint trained on a GPU loads anywhere
        config["kda_backend"] = "auto"
    try:
        # the memory of a model loaded here stays in this process: model.memory_path is the live file of
        # the run that trains it (hatchling/model/memory.py), which another process's load must not touch
        model = build_model(config)
    except ValidationError as e:
        wrong = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors(include_url=False))
        raise InputError(f"{directory / SIDECAR}: its model_config does not fit the model schema ({wrong})") from None
    try:
        model.load_state_dict(dequantize_state_dict(sd) if fmt == "int8" else sd)    # bf16 is cast on copy
    except RuntimeError as e:
        what = (str(e).splitlines()[1:2] or [str(e)])[0].strip()[:200]      # torch's first complaint
        raise InputError(f"{directory}: its weights do not fit the model_config of {SIDECAR} ({what})") from None
    if fmt == "int8" and compute == "int8":
        use_int8_linears(model, sd)
    model.load_state_files(directory)
    return model.to(device), meta


def load_for_inference(directory: str | Path, compute: str = "fp32",
                       device: str | torch.device = "cpu") -> tuple[LanguageModel, object, dict]:
    """(model in eval mode on `device`, its tokenizer, sidecar): what generation, the eval and the
    export (which measures CPU latency, so loads on the CPU) need."""
    model, meta = load_model(directory, device, compute)
    return model.eval(), load_checkpoint_tokenizer(directory, meta), meta


def load_resume_state(directory: str | Path, fingerprint: str) -> dict | None:
    """The trainer state of the checkpoint in `directory` when it is one of this very run (the same
    `fingerprint`), to resume from; None when there is none or it is another run's. An unreadable one
    (cut short, garbled, its weights not those its sidecar names) is said in a warning and not resumed:
    the run starts from step 0."""
    if not (Path(directory) / TRAINER).is_file():          # no checkpoint yet
        return None
    try:
        state = torch.load(Path(directory) / TRAINER, weights_only=True)
        if not isinstance(state, dict):
            raise InputError(f"{TRAINER} holds a {type(state).__name__}, not a trainer's state")
        verified(directory, WEIGHTS, read_sidecar(directory).get("weights_sha256"))
    # a file missing or garbled (InputError is a ValueError); any other OSError (EIO, EACCES, too many open files)
    # is raised, since training afresh would soon replace the run's checkpoint
    except (FileNotFoundError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        logger.warning("not resuming from %s: its checkpoint is unreadable (%s: %s); training starts from step 0",
                       directory, type(e).__name__, e)
        return None
    return state if state.get("fingerprint") == fingerprint else None
