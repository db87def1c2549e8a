"""The shared training loop: next-token loss on packed tokens, with everything a run needs.

Determinism is by construction: the batch of step s is drawn from a generator seeded with
(seed, s), the LR is a pure function of s, and a checkpoint holds weights, optimizer and RNG
state. So a run killed at any moment and resumed from its last checkpoint ends with exactly the
weights of an uninterrupted run (on CPU, where kernels are deterministic).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hatchling.checkpoint import load_resume_state, load_weights, save_model
from hatchling.errors import InputError, StageError
from hatchling.io import atomic_write_csv
from hatchling.model.base import LanguageModel
from hatchling.model.device import autocast, resolve_device
from hatchling.model.lm import IGNORE, bits_per_byte, lm_loss, loss_sum, sample_batch, validation_loss
from hatchling.train.adapm import AdaPM
from hatchling.train.distributed import full_state, init_world, load_full_state, wrap_for_training
from hatchling.train.optim import build_optimizers, lr_multiplier, set_lr
from hatchling.train.sparsity import SparsityController


def batch_seed(seed: int, step: int, micro: int, grad_accum: int) -> int:
    """The sampling seed of one micro-batch: a different one for every (step, micro) of a run. Up to 64
    micro-batches a step they are numbered in blocks of 64 (the seeds every run so far has used); past
    that, in blocks of grad_accum (64 would hand micro-batch 64 + m of one step micro-batch m of the next)."""
    return (seed * 1_000_003 + step) * max(64, grad_accum) + micro


def seq_len_at(step: int, base: int, curriculum: list[tuple[int, int]]) -> int:
    length = base
    for start, value in curriculum:
        if step >= start:
            length = value
    return length


def run_fingerprint(params, **settings) -> str:
    """What makes a training run *this* run: its params (less how it shows progress and where it
    runs) and `settings` (the stage's code hash, the data hash, the model config, ...). The trainer
    resumes only a checkpoint of the same fingerprint: after a change to the code DVC reruns the
    stage for, it starts afresh rather than finish (or, finished, merely re-score) the old run."""
    run_settings = {**params.model_dump(mode="json", exclude={"progress", "device"}), **settings}
    return hashlib.sha256(json.dumps(run_settings, sort_keys=True).encode()).hexdigest()


class Trainer:
    """Trains `model` on packed token arrays; checkpoints to `run_dir`, final weights to `out_dir`."""

    def __init__(self, model: LanguageModel, params, train_data: np.ndarray, val_data: np.ndarray, *,
                 run_dir: Path, out_dir: Path, sidecar: dict, val_tokens_per_byte: float,
                 log: Callable[[dict, int], None] = lambda metrics, step: None,
                 csv_path: Path | None = None, eval_csv_path: Path | None = None, fingerprint: str = "",
                 files: dict[str, Path] | None = None,
                 train_labels: np.ndarray | None = None, val_labels: np.ndarray | None = None,
                 eot_id: int | None = None):
        self.p = params
        self.train_labels, self.val_labels = train_labels, val_labels
        # params.isolate_documents: documents (end-of-text after each) are kept apart in every batch
        self.eot_id = eot_id if params.isolate_documents else None
        reason = "no end-of-text id was given" if eot_id is None else model.packing_unsupported()
        if params.isolate_documents and reason:
            raise InputError(f"isolate_documents is on but {reason}: set isolate_documents: false for this "
                             "stage to let packed documents run together")
        self.device = resolve_device(params.device)
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ:
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        self.world = init_world(self.device)
        self.model = model.to(self.device)
        self.strategy = params.parallel
        self.train_module = wrap_for_training(self.model, self.world, self.strategy)
        if params.compile:          # forward/backward only: checkpoints and evaluation use the plain module
            self.train_module = torch.compile(self.train_module)
        longest = max([params.seq_len, *(length for _, length in params.seq_len_curriculum)])
        if len(train_data) < longest + 2:
            stage = sidecar.get("stage", "training")
            raise InputError(f"{stage}: the training data holds {len(train_data):,} tokens, too few for one window of "
                             f"seq_len {longest} (a window takes seq_len + 2): lower {stage}.seq_len (and "
                             "seq_len_curriculum) or give it more data")
        self.train_data, self.val_data = train_data, val_data
        self.run_dir, self.out_dir = Path(run_dir), Path(out_dir)
        self.csv_path, self.eval_csv_path = csv_path, eval_csv_path
        self.sidecar, self.fingerprint, self.files = sidecar, fingerprint, files or {}
        self.val_tokens_per_byte = val_tokens_per_byte
        self.log = log
        self.optimizers = build_optimizers(self.model, params)
        sp = params.sparsity
        self.sparsity = SparsityController(self.model, sp.mlp, sp.mixer, sp.every, sp.regrow, sp.start_step,
                                           round(sp.end_fraction * params.max_steps)) if sp.mlp or sp.mixer else None
        self.step = 0
        self.saved_step: int | None = None    # the step of the checkpoint in run_dir, once one is there
        self.best_val = math.inf
        self.stale_evals = 0
        self.steps: list[dict] = []       # one row per step (csv_path)
        self.history: list[dict] = []     # one row per evaluation (eval_csv_path)
        self.tokens_seen = 0
        self.train_loss = math.nan        # of the last step
        self.step_stats: dict[str, float] = {}
        self.autocast = autocast(self.device)      # bf16 on CUDA; reused step after step, never nested

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
        self.check_weights(weights)
        state = {"step": self.step, "best_val": self.best_val, "stale_evals": self.stale_evals,
                 "steps": self.steps, "history": self.history, "tokens_seen": self.tokens_seen,
                 "train_loss": self.train_loss, "fingerprint": self.fingerprint,
                 "optimizers": opt_states, "sparsity": self.sparsity.state_dict() if self.sparsity else None,
                 "torch_rng": torch.get_rng_state()}
        save_model(self.model, self.run_dir, {**self.sidecar, "step": self.step}, state, self.files, weights=weights)
        self.saved_step = self.step

    def try_resume(self) -> bool:
        """Continue from run_dir if it holds a checkpoint of this very run (same fingerprint)."""
        state = load_resume_state(self.run_dir, self.fingerprint)
        if state is None:
            return False
        load_full_state(self.model, self.optimizers, load_weights(self.run_dir, str(self.device)),
                        state["optimizers"], self.strategy)
        self.model.load_state_files(self.run_dir)
        torch.set_rng_state(state["torch_rng"])
        if self.sparsity:
            self.sparsity.load_state_dict(state["sparsity"])
        self.step, self.best_val = state["step"], state["best_val"]
        self.stale_evals, self.steps, self.history = state["stale_evals"], state["steps"], state["history"]
        self.tokens_seen, self.train_loss = state["tokens_seen"], state.get("train_loss", math.nan)
        self.saved_step = self.step
        return True

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict:
        val_loss = validation_loss(self.model, self.val_data, self.p.eval_batches, self.p.batch_size,
                                   self.p.seq_len, self.device, self.autocast, self.val_labels, self.eot_id)
        self.model.train()
        metrics = {"val_loss": val_loss, "val_bpb": bits_per_byte(val_loss, self.val_tokens_per_byte)}
        metrics.update({f"val_{k}": v for k, v in self.model.pass_stats().items()})     # of the last batch
        return metrics

    def _write_csvs(self) -> None:
        """The step log and the evaluation log as CSV (the columns: every key any row has, in order)."""
        if not self.world.is_main:
            return
        for path, rows in ((self.csv_path, self.steps), (self.eval_csv_path, self.history)):
            if path is None or not rows:
                continue
            atomic_write_csv(path, rows)

    # -- training -----------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step; returns (loss, lr, seq_len) of that step."""
        p = self.p
        mult = lr_multiplier(self.step, p.warmup_steps, p.max_steps, p.min_lr_ratio)
        set_lr(self.optimizers, mult)
        length = seq_len_at(self.step, p.seq_len, p.seq_len_curriculum)
        total = 0.0
        self.step_stats = {}
        self.model.set_train_step(self.step)
        seeds = [batch_seed(p.seed, self.step, micro, p.grad_accum) for micro in range(p.grad_accum)]
        batches = [sample_batch(self.train_data, p.batch_size, length, seed, self.device, self.train_labels)
                   for seed in seeds]
        # the step's loss is the mean over all its targets, on every rank and in every micro-batch: each target
        # weighs the same however the label masks (SFT) share them out, as in one batch of batch_size × grad_accum
        count = sum((y != IGNORE).sum() for _, y in batches).clamp(min=1)
        for x, y in batches:
            x, y = self.world.shard(x), self.world.shard(y)
            with self.autocast:
                local_sum, _ = loss_sum(self.train_module, x, y, self.eot_id)
                loss = local_sum * self.world.size / count               # DDP averages over ranks
                aux = self.model.aux_losses()
                for value in aux.values():                                  # research switches' own losses
                    loss = loss + value / p.grad_accum
            loss.backward()
            for name, value in aux.items():
                self.step_stats[name] = self.step_stats.get(name, 0.0) + float(value.detach()) / p.grad_accum
            total += float(self.world.sum(local_sum.detach())) / float(count)
        self.tokens_seen += int(count)
        self.check_finite(total, {k: v for k, v in self.step_stats.items() if k in aux})
        self.step_stats.update(self.model.pass_stats())
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

    def check_finite(self, loss: float, aux: dict[str, float]) -> None:
        """Stop at once when the loss of the step under way is NaN or infinite: before its update, so
        no checkpoint of diverged weights is ever written and run_dir keeps the last good one."""
        bad = {name: value for name, value in {"training loss": loss, **aux}.items() if not math.isfinite(value)}
        if not bad:
            return
        raise StageError(f"training diverged at step {self.step + 1}: "
                         + ", ".join(f"{name} is {value}" for name, value in bad.items())
                         + f"; stopped before that step's update, nothing of it saved ({self._kept()}). "
                         "Lower the learning rate, add warmup or set grad_clip, then run again")

    def check_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Never save diverged weights: an update can turn them NaN or infinite (an overflowing
        gradient) while the loss that produced it was still finite."""
        bad = [name for name, w in weights.items() if w.is_floating_point() and not torch.isfinite(w).all()]
        if bad:
            raise StageError(f"training diverged at step {self.step}: its update left {len(bad)} weight tensors "
                             f"not finite ({bad[0]}, ...); not saved ({self._kept()}). Lower the learning rate, "
                             "add warmup or set grad_clip, then run again")

    def _kept(self) -> str:
        return (f"the last good checkpoint, of step {self.saved_step}, stays in {self.run_dir}"
                if self.saved_step is not None else f"this run had written no checkpoint to {self.run_dir} yet")

    def fit(self) -> dict:
        p = self.p
        resumed_from = self.step if self.try_resume() else None
        self.model.train()
        t0 = time.perf_counter()
        bar = tqdm(total=p.max_steps, initial=self.step, disable=not (p.progress and self.world.is_main),
                   desc="train", unit="step",
                   mininterval=1.0 if sys.stderr.isatty() else 15.0)
        stopped_early = 0 < p.early_stopping_patience <= self.stale_evals      # a resumed run that had stopped
        while self.step < p.max_steps and not stopped_early:
            self.train_loss, lr, length = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{self.train_loss:.3f}", refresh=False)
            stats = {"train_loss": self.train_loss, "lr": lr, "seq_len": length, **self.step_stats}
            self.log(stats, self.step)
            self.steps.append({"step": self.step, "tokens": self.tokens_seen,
                               **{k: round(v, 6) if isinstance(v, float) else v for k, v in stats.items()}})
            if self.step % p.eval_every == 0 or self.step == p.max_steps:
                metrics = self.evaluate()
                row = {"step": self.step, "train_loss": round(self.train_loss, 5), "lr": lr, "seq_len": length,
                       "val_loss": round(metrics["val_loss"], 5), "val_bpb": round(metrics["val_bpb"], 5),
                       "tokens": self.tokens_seen,
                       **{k: round(v, 5) for k, v in metrics.items() if k not in ("val_loss", "val_bpb")}}
                self.history.append(row)
                self.log(metrics, self.step)
                self._write_csvs()
                if metrics["val_loss"] < self.best_val - 1e-6:
                    self.best_val, self.stale_evals = metrics["val_loss"], 0
                else:
                    self.stale_evals += 1
                    stopped_early = 0 < p.early_stopping_patience <= self.stale_evals
            if self.step % p.checkpoint_every == 0 or self.step == p.max_steps or stopped_early:
                self.save_checkpoint()
        bar.close()
        self._write_csvs()          # also for a finished run resumed (dvc repro --force keeps its run dir)
        final = self.history[-1] if self.history else self.evaluate()
        gathered = self._gathered_state([])
        if gathered is not None:
            self.check_weights(gathered[0])
            save_model(self.model, self.out_dir, {**self.sidecar, "step": self.step}, files=self.files,
                       weights=gathered[0])
        return {"steps": self.step, "final_train_loss": self.train_loss, "val_loss": final["val_loss"],
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
