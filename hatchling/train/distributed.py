"""Data-parallel training across processes (torchrun), with the result of one process.

    torchrun --nproc_per_node 2 -m hatchling run pretrain

Every rank draws the same global batch (batches are a pure function of the seed and the step)
and keeps its own rows; DistributedDataParallel averages the gradients. The loss of each rank is
its sum over target tokens divided by the *global* token count and scaled by the world size, so
the averaged gradient is exactly the gradient of the global mean — the same update as a single
process with the whole batch, whatever the split of masked (SFT) targets between ranks. Rank 0
alone writes checkpoints, logs and reports. Backend: NCCL on CUDA, gloo on CPU.

`pretrain.parallel: fsdp` shards parameters, gradients and optimizer state across the ranks
instead (FSDP2 `fully_shard` per block, then the whole model): the same gradient averaging, so
the same update, with each rank holding 1/world of the state. Checkpoints stay whole: the full
weights and optimizer state are gathered (a collective: every rank takes part) and rank 0 writes
them, so a checkpoint trained sharded loads anywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from hatchling.errors import ConfigError


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
            raise ConfigError(f"batch_size {batch.shape[0]} does not divide across {self.size} processes")
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


def wrap_for_training(model: torch.nn.Module, world: World, strategy: str) -> torch.nn.Module:
    """The module that runs forward/backward: `model` itself (one process, or FSDP, which shards it
    in place) or a DistributedDataParallel wrapper. Build optimizers after this (FSDP swaps the
    parameters for sharded ones)."""
    if world.size == 1:
        return model
    if strategy == "fsdp":
        # each block a unit of its own; BDH reads its layers' parameters without calling them (no forward
        # for FSDP to gather them in), so it is one unit, the model
        for block in getattr(model, "blocks", ()):
            fully_shard(block)
        fully_shard(model)
        return model
    return DistributedDataParallel(model)      # every parameter is in every step's graph (memory.py: _idle)


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: torch.nn.Module, optimizers: list, strategy: str) -> tuple[dict, list[dict]]:
    """(whole weights on CPU, whole optimizer states). Collective under FSDP: call on every rank."""
    if strategy == "fsdp" and dist.is_initialized():
        return (get_model_state_dict(model, options=FULL),
                [get_optimizer_state_dict(model, opt, options=FULL) for opt in optimizers])
    return ({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
            [opt.state_dict() for opt in optimizers])


def load_full_state(model: torch.nn.Module, optimizers: list, weights: dict, opt_states: list[dict] | None,
                    strategy: str) -> None:
    """Inverse of full_state: every rank loads the same whole state, FSDP keeps its own shard. Either form of
    optimizer state loads either way (one process saves its parameters by position, FSDP by name), so a run
    resumes across a change of process count."""
    if strategy == "fsdp" and dist.is_initialized():
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        for opt, sd in zip(optimizers, opt_states or [], strict=False):
            set_optimizer_state_dict(model, opt, by_name(model, opt, sd),
                                     options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(weights)
    for opt, sd in zip(optimizers, opt_states or [], strict=False):
        opt.load_state_dict(sd)


def by_name(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> dict:
    """An optimizer state dict keyed by parameter name, as FSDP's loader reads it: one saved by one process's
    Optimizer.state_dict (keyed by each parameter's position in `opt`'s groups) is rekeyed; one already by
    name is returned as it is."""
    if all(isinstance(i, str) for group in state["param_groups"] for i in group["params"]):
        return state
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in opt.param_groups for p in group["params"]]
    groups = [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]]
    return {"state": {order[i]: value for i, value in state["state"].items()}, "param_groups": groups}
