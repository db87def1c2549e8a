"""Where a model runs and in what precision: one answer for every stage that runs one.

`resolve_device` turns the params' device setting (``run.device``, or a stage's own ``device``)
into a torch device; `autocast` is the precision its forward passes compute in: bf16 autocast on
CUDA (weights and optimizer states stay float32), plain float32 elsewhere. The trainer, RL, the
eval and the `generate` / `chat` commands all use these two. `keep_freed_memory` is the CPU's
memory for a process that trains: a stage process (`hatchling run`) and the training bench call it.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform

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


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4          # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a process frees, for its next allocations: True where applied
    (Linux with glibc), False elsewhere.

    PyTorch's CPU tensors come from malloc, with no cache of their own, and glibc serves a block of 32 MiB
    or more (from 128 KiB, adaptively) by mapping fresh pages, which it unmaps on free, so the kernel
    faults in and zeroes them again at the next allocation. A hybrid training step (its chunked KDA op's
    temporaries come in many sizes) faulted in 0.48 GiB of pages at T = 1024 for the toddler and 1.8 GiB for
    xs, each step; with no mapped blocks (``M_MMAP_MAX`` 0) and the heap trimmed only past 2 GiB free at
    its top, none and 0.05 GiB, the peak RSS 1-3 % higher, the toddler's step 10-20 % shorter on the 2-core
    CPU machine (docs/benchmarks.md). The cost is a process that keeps its peak heap until it exits, which
    a stage process does anyway. Process-wide: for processes that train, not for a library call to set
    behind its caller's back."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
