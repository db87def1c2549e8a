"""Where a model runs and in what precision: one answer for every stage that runs one.

`resolve_device` turns the params' device setting (``run.device``, or a stage's own ``device``)
into a torch device; `autocast` is the precision its forward passes compute in: bf16 autocast on
CUDA (weights and optimizer states stay float32), plain float32 elsewhere. The trainer, RL, the
eval and the `generate` / `chat` commands all use these two.
"""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto``: CUDA when available, else the CPU; any other name as torch reads it."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A fresh context for forward passes on `device`: bf16 autocast on CUDA, nothing elsewhere.
    Backward passes belong outside it (as the trainer does)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
