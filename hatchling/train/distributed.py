"""Data-parallel training across processes (torchrun), with the result of one process.

    torchrun --nproc_per_node 2 -m hatchling run pretrain

Every rank draws the same global batch (batches are a pure function of the seed and the step)
and keeps its own rows; DistributedDataParallel averages the gradients. The loss of each rank is
its sum over target tokens divided by the *global* token count and scaled by the world size, so
the averaged gradient is exactly the gradient of the global mean — the same update as a single
process with the whole batch, whatever the split of masked (SFT) targets between ranks. Rank 0
alone writes checkpoints, logs and reports. Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (the batch size must divide by the world size)."""
        if batch.shape[0] % self.size:
            raise ValueError(f"batch_size {batch.shape[0]} does not divide across {self.size} processes")
        per = batch.shape[0] // self.size
        return batch[self.rank * per:(self.rank + 1) * per]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value


def init_world(device: torch.device) -> World:
    """The process group torchrun describes in the environment (WORLD_SIZE, RANK), or one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def current_world() -> World:
    return World(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else World()
