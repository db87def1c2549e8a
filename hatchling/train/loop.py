"""The shared training loop: next-token loss on packed tokens, with everything a run needs.

Determinism is by construction: the batch of step s is drawn from a generator seeded with
(seed, s), the LR is a pure function of s, and a checkpoint holds weights, optimizer and RNG
state. So a run killed at any moment and resumed from its last checkpoint ends with exactly the
weights of an uninterrupted run (on CPU, where kernels are deterministic).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hatchling.errors import InputError
from hatchling.io import atomic_write_text
from hatchling.train.adapm import AdaPM
from hatchling.train.checkpoint import load_trainer_state, load_weights, read_sidecar, save_model
from hatchling.train.distributed import full_state, init_world, load_full_state, wrap_for_training
from hatchling.train.optim import build_optimizers, lr_multiplier, set_lr
from hatchling.train.sparsity import SparsityController

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seq_len_at(step: int, base: int, curriculum: list[tuple[int, int]]) -> int:
    length = base
    for start, value in curriculum:
        if step >= start:
            length = value
    return length


IGNORE = -100     # a target that carries no loss (SFT: every token that is not the assistant's)


def sample_batch(data: np.ndarray, batch_size: int, seq_len: int, seed: int, device,
                 labels: np.ndarray | None = None):
    """(inputs, targets) [B, seq_len] from random windows; the same seed always gives the same batch.
    Targets come from `labels` when given (same length as data, IGNORE where no loss is taken)."""
    if len(data) < seq_len + 2:
        raise InputError(f"token file has {len(data)} tokens, fewer than seq_len+2 = {seq_len + 2}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen).tolist()
    window = torch.from_numpy(np.stack([np.asarray(data[s:s + seq_len + 1], dtype=np.int64) for s in starts]))
    if labels is None:
        return window[:, :-1].to(device), window[:, 1:].to(device)
    targets = torch.from_numpy(np.stack([np.asarray(labels[s + 1:s + seq_len + 1], dtype=np.int64) for s in starts]))
    return window[:, :-1].to(device), targets.to(device)


def loss_sum(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token losses over the targets that are not IGNORE, their count)."""
    logits = model(x)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                            reduction="sum")
    return total, (y != IGNORE).sum()


def lm_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the targets that are not IGNORE (0 when a batch has none)."""
    total, count = loss_sum(model, x, y)
    return total / count.clamp(min=1)


@torch.no_grad()
def validation_loss(model, data: np.ndarray, batches: int, batch_size: int, seq_len: int, device="cpu",
                    autocast=None, labels: np.ndarray | None = None) -> float:
    """Mean next-token loss (nats) over fixed, seeded windows of `data`: the same for every call."""
    model.eval()
    length = min(seq_len, len(data) - 2)
    losses = []
    for i in range(batches):
        x, y = sample_batch(data, batch_size, length, 10**9 + i, device, labels)
        with autocast or contextlib.nullcontext():
            losses.append(lm_loss(model, x, y).item())
    return float(np.mean(losses))


class Trainer:
    """Trains `model` on packed token arrays; checkpoints to `run_dir`, final weights to `out_dir`."""

    def __init__(self, model, params, train_data: np.ndarray, val_data: np.ndarray, *,
                 run_dir: Path, out_dir: Path, sidecar: dict, val_tokens_per_byte: float,
                 log: Callable[[dict, int], None] = lambda metrics, step: None,
                 csv_path: Path | None = None, fingerprint: str = "", files: dict[str, Path] | None = None,
                 train_labels: np.ndarray | None = None, val_labels: np.ndarray | None = None):
        self.p = params
        self.train_labels, self.val_labels = train_labels, val_labels
        self.device = resolve_device(params.device)
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ:
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        self.world = init_world(self.device)
        self.model = model.to(self.device)
        self.strategy = params.parallel
        self.train_module = wrap_for_training(self.model, self.world, self.strategy)
        if params.compile:          # forward/backward only: checkpoints and evaluation use the plain module
            self.train_module = torch.compile(self.train_module)
        self.train_data, self.val_data = train_data, val_data
        self.run_dir, self.out_dir, self.csv_path = Path(run_dir), Path(out_dir), csv_path
        self.sidecar, self.fingerprint, self.files = sidecar, fingerprint, files or {}
        self.val_tokens_per_byte = val_tokens_per_byte
        self.log = log
        self.optimizers = build_optimizers(self.model, params)
        sp = params.sparsity
        self.sparsity = SparsityController(self.model, sp.mlp, sp.mixer, sp.every, sp.regrow, sp.start_step,
                                           round(sp.end_fraction * params.max_steps)) if sp.mlp or sp.mixer else None
        self.step = 0
        self.best_val = math.inf
        self.stale_evals = 0
        self.history: list[dict] = []
        self.tokens_seen = 0
        self.step_stats: dict[str, float] = {}
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None

    # -- checkpoints -------------------------------------------------------------------------
    def _gathered_state(self, optimizers: list) -> tuple[dict, list[dict]] | None:
        """Whole weights and optimizer states on the main rank, None on the others. Under FSDP every
        rank must call this (the gather is collective); under DDP the other ranks skip the copy."""
        if self.strategy != "fsdp" and not self.world.is_main:
            return None
        state = full_state(self.model, optimizers, self.strategy)
        return state if self.world.is_main else None

    def save_checkpoint(self) -> None:
        gathered = self._gathered_state(self.optimizers)
        if gathered is None:
            return
        weights, opt_states = gathered
        state = {"step": self.step, "best_val": self.best_val, "stale_evals": self.stale_evals,
                 "history": self.history, "tokens_seen": self.tokens_seen, "fingerprint": self.fingerprint,
                 "optimizers": opt_states, "sparsity": self.sparsity.state_dict() if self.sparsity else None,
                 "torch_rng": torch.get_rng_state()}
        save_model(self.model, self.run_dir, {**self.sidecar, "step": self.step}, state, self.files, weights=weights)

    def try_resume(self) -> bool:
        """Continue from run_dir if it holds a checkpoint of this very run (same fingerprint)."""
        try:
            state = load_trainer_state(self.run_dir)
            read_sidecar(self.run_dir)
        except FileNotFoundError:                   # no checkpoint yet
            return False
        except (RuntimeError, ValueError) as e:     # unreadable (torch's RuntimeError, or a bad sidecar)
            logger.warning("not resuming from %s: its checkpoint is unreadable (%s: %s); training starts from step 0",
                           self.run_dir, type(e).__name__, e)
            return False
        if state.get("fingerprint") != self.fingerprint:
            return False
        load_full_state(self.model, self.optimizers, load_weights(self.run_dir, str(self.device)),
                        state["optimizers"], self.strategy)
        if hasattr(self.model, "load_state_files"):
            self.model.load_state_files(self.run_dir)
        torch.set_rng_state(state["torch_rng"])
        if self.sparsity:
            self.sparsity.load_state_dict(state["sparsity"])
        self.step, self.best_val = state["step"], state["best_val"]
        self.stale_evals, self.history = state["stale_evals"], state["history"]
        self.tokens_seen = state["tokens_seen"]
        return True

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict:
        val_loss = validation_loss(self.model, self.val_data, self.p.eval_batches, self.p.batch_size,
                                   self.p.seq_len, self.device, self.autocast, self.val_labels)
        self.model.train()
        metrics = {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) * self.val_tokens_per_byte}
        if hasattr(self.model, "active_fraction"):        # BDH: share of neurons firing on validation text
            metrics["active_fraction"] = self.model.active_fraction
        if hasattr(self.model, "research_stats"):         # switches' statistics on the last validation batch
            metrics.update({f"val_{k}": v for k, v in self.model.research_stats().items()})
        return metrics

    def _write_csv(self) -> None:
        if self.csv_path is None or not self.history or not self.world.is_main:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(self.history[-1]))
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.csv_path, buf.getvalue())

    # -- training -----------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step; returns (loss, lr, seq_len) of that step."""
        p = self.p
        mult = lr_multiplier(self.step, p.warmup_steps, p.max_steps, p.min_lr_ratio)
        set_lr(self.optimizers, mult)
        length = seq_len_at(self.step, p.seq_len, p.seq_len_curriculum)
        total = 0.0
        self.step_stats = {}
        if getattr(self.model, "memory", None) is not None:
            self.model.memory.step = self.step                              # recorded with each entry
        for micro in range(p.grad_accum):
            x, y = sample_batch(self.train_data, p.batch_size, length,
                                (p.seed * 1_000_003 + self.step) * 64 + micro, self.device, self.train_labels)
            count = (y != IGNORE).sum().clamp(min=1)          # the global batch's target count
            x, y = self.world.shard(x), self.world.shard(y)
            with self.autocast or contextlib.nullcontext():
                local_sum, _ = loss_sum(self.train_module, x, y)
                loss = local_sum * self.world.size / count / p.grad_accum   # DDP averages over ranks
                aux = self.model.aux_losses() if hasattr(self.model, "aux_losses") else {}
                for value in aux.values():                                  # research switches' own losses
                    loss = loss + value / p.grad_accum
            loss.backward()
            for name, value in aux.items():
                self.step_stats[name] = self.step_stats.get(name, 0.0) + float(value.detach()) / p.grad_accum
            total += float(self.world.sum(local_sum.detach())) / float(count) / p.grad_accum
            self.tokens_seen += int(count)
        if hasattr(self.model, "research_stats"):
            self.step_stats.update(self.model.research_stats())
        if p.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), p.grad_clip)
        for opt in self.optimizers:
            opt.step()
        self.step += 1
        if self.sparsity:
            self.sparsity.update(self.step)                 # uses this step's gradients to regrow
            self.step_stats["sparsity"] = self.sparsity.sparsity()
        if isinstance(self.optimizers[0], AdaPM):
            self.step_stats["adapm_beta1"] = self.optimizers[0].channel_momentum()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return total, p.lr * mult, length

    def fit(self) -> dict:
        p = self.p
        resumed_from = self.step if self.try_resume() else None
        self.model.train()
        t0 = time.perf_counter()
        bar = tqdm(total=p.max_steps, initial=self.step, disable=not (p.progress and self.world.is_main),
                   desc="train", unit="step",
                   mininterval=1.0 if sys.stderr.isatty() else 15.0)
        stopped_early = False
        train_loss = float("nan")
        while self.step < p.max_steps and not stopped_early:
            train_loss, lr, length = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", refresh=False)
            self.log({"train_loss": train_loss, "lr": lr, "seq_len": length, **self.step_stats}, self.step)
            if self.step % p.eval_every == 0 or self.step == p.max_steps:
                metrics = self.evaluate()
                row = {"step": self.step, "train_loss": round(train_loss, 5), "lr": lr, "seq_len": length,
                       "val_loss": round(metrics["val_loss"], 5), "val_bpb": round(metrics["val_bpb"], 5),
                       "tokens": self.tokens_seen,
                       **{k: round(v, 5) for k, v in metrics.items() if k not in ("val_loss", "val_bpb")}}
                self.history.append(row)
                self.log(metrics, self.step)
                self._write_csv()
                if metrics["val_loss"] < self.best_val - 1e-6:
                    self.best_val, self.stale_evals = metrics["val_loss"], 0
                else:
                    self.stale_evals += 1
                    stopped_early = 0 < p.early_stopping_patience <= self.stale_evals
            if self.step % p.checkpoint_every == 0 or self.step == p.max_steps or stopped_early:
                self.save_checkpoint()
        bar.close()
        final = self.history[-1] if self.history else self.evaluate()
        gathered = self._gathered_state([])
        if gathered is not None:
            save_model(self.model, self.out_dir, {**self.sidecar, "step": self.step}, files=self.files,
                       weights=gathered[0])
        return {"steps": self.step, "final_train_loss": train_loss, "val_loss": final["val_loss"],
                "val_bpb": final["val_bpb"], "best_val_loss": self.best_val, "stopped_early": stopped_early,
                "resumed_from_step": resumed_from, "seconds": round(time.perf_counter() - t0, 3)}


def overfit_one_batch(model, batch: tuple[torch.Tensor, torch.Tensor], steps: int, lr: float) -> list[float]:
    """Train on one frozen batch; a correctly wired model drives the loss towards zero."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        loss = lm_loss(model, *batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
