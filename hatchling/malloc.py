"""The process's malloc: :func:`keep_freed_memory`, for the entry points of processes that train (the `hatchling`
command, :func:`hatchling.cli.entry`, whose stage processes DVC and the Prefect flow start; the training bench).
Torch-free, as the command's start-up is."""

from __future__ import annotations

import ctypes
import platform

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
    CPU machine (docs/benchmarks.md). The cost: the process holds its peak heap until it exits, where glibc
    would give large blocks back as they are freed, and glibc's bins take a few rounds of a repeated pattern
    to settle, holding more free heap than the pattern needs (a bare loop over one 64 MiB block: 384 MiB).
    Process-wide, so for a process's entry point, not for a library call to set behind its caller's back."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
