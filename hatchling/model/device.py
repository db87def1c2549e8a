"""Where a model runs and in what precision: one answer for every stage that runs one.

`resolve_device` turns the params' device setting (``run.device``, or a stage's own ``device``)
into a torch device; `autocast` is the precision its forward passes compute in: bf16 autocast on
CUDA (weights and optimizer states stay float32), plain float32 elsewhere. The trainer, RL, the
eval and the `generate` / `chat` commands all use these two.
"""

from __future__ import annotations

import contextlib

import torch

from hatchling.errors import ConfigError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto``: CUDA when available, else the CPU; any other name as torch reads it. A CUDA device where
    torch has none is a ConfigError saying so (torch's own is an assertion deep inside the first copy)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(name)!r}: torch {torch.__version__} sees no CUDA device on this machine "
                          "(use auto or cpu)")
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A fresh context for forward passes on `device`: bf16 autocast on CUDA, nothing elsewhere.
    Backward passes belong outside it (as the trainer does)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
