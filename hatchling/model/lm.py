"""Next-token loss on packed token arrays: the batches, the loss and the validation loss that
pretraining, SFT, the export's measurements and the continual-learning eval all share."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from hatchling.errors import InputError
from hatchling.model.segments import document_starts

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


def loss_sum(model, x: torch.Tensor, y: torch.Tensor, eot_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token losses over the targets that are not IGNORE, their count). With `eot_id` the
    documents packed in x are kept apart: each begins after an end-of-text (see model/segments.py)."""
    logits = model(x) if eot_id is None else model(x, doc_starts=document_starts(x, eot_id))
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                            reduction="sum")
    return total, (y != IGNORE).sum()


def lm_loss(model, x: torch.Tensor, y: torch.Tensor, eot_id: int | None = None) -> torch.Tensor:
    """Mean next-token loss over the targets that are not IGNORE (0 when a batch has none)."""
    total, count = loss_sum(model, x, y, eot_id)
    return total / count.clamp(min=1)


@torch.no_grad()
def validation_loss(model, data: np.ndarray, batches: int, batch_size: int, seq_len: int, device="cpu",
                    autocast=None, labels: np.ndarray | None = None, eot_id: int | None = None) -> float:
    """Mean next-token loss (nats) per trained target over fixed, seeded windows of `data`: the same for
    every call (documents kept apart at each `eot_id`, as in loss_sum). Every target weighs the same, so a
    window with none (SFT: only user turns) counts for nothing rather than as a loss of 0."""
    model.eval()
    length = min(seq_len, len(data) - 2)
    total, count = 0.0, 0
    for i in range(batches):
        x, y = sample_batch(data, batch_size, length, 10**9 + i, device, labels)
        with autocast or contextlib.nullcontext():
            batch_total, batch_count = loss_sum(model, x, y, eot_id)
        total, count = total + batch_total.item(), count + int(batch_count)
    return total / max(count, 1)


@torch.no_grad()
def split_loss(model, data: np.ndarray, seq_len: int, batch_size: int, device="cpu", autocast=None,
               eot_id: int | None = None) -> float:
    """Mean next-token loss (nats) over every token of `data` after the first, in consecutive windows
    of `seq_len` (each window starts without context): the whole split, where validation_loss samples."""
    model.eval()
    data = np.asarray(data, dtype=np.int64)
    starts = list(range(0, len(data) - 1, seq_len))
    total, count = 0.0, 0
    for b in range(0, len(starts), batch_size):
        rows = [data[s:s + seq_len + 1] for s in starts[b:b + batch_size]]
        width = max(len(r) for r in rows) - 1
        x = torch.zeros(len(rows), width, dtype=torch.long)
        y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, :len(r) - 1], y[i, :len(r) - 1] = torch.from_numpy(r[:-1]), torch.from_numpy(r[1:])
        with autocast or contextlib.nullcontext():
            s, n = loss_sum(model, x.to(device), y.to(device), eot_id)
        total, count = total + float(s), count + int(n)
    return total / count


def tokens_per_byte(tokens: int, n_bytes: int) -> float:
    """Tokens per UTF-8 byte of the text they encode (a text of no bytes counts as one)."""
    return tokens / max(n_bytes, 1)


def bits_per_byte(loss: float, tokens_per_byte: float) -> float:
    """A mean next-token loss in nats as bits per byte of text: comparable across tokenizers."""
    return loss / math.log(2) * tokens_per_byte
