"""Learning at evaluation time: test-time memorization, and forgetting across data segments.

Test-time memorization (Titans, TTT): before an item is scored the model takes a few gradient
steps of next-token loss on the item's own context, so what the weights can absorb from the
context counts, not only what attention can look up. `reset` restores the checkpoint before every
item (each answer sees its own context only) or lets the weights drift from item to item in order
(a reader that keeps learning). It works for every architecture: it trains all the weights.

Forgetting (a continual-learning eval): the model's training text is cut into segments, each with
a held-out tail; the model trains on the segments one after another and after each phase its loss
on every segment's tail is measured. Row i of the matrix is "after training on segment i";
forgetting of segment j = its loss at the end minus the best loss it had once learned (after phase
j or later). The model's weights are restored afterwards.

Both train on the device they are given (the model's), with the forward passes under bf16
autocast on CUDA as in the trainer.
"""

from __future__ import annotations

import numpy as np
import torch

from hatchling.errors import InputError
from hatchling.model.device import autocast
from hatchling.model.lm import lm_loss, sample_batch, validation_loss


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Memorizer:
    """Call with a sample's context token ids before scoring it; restore() when done. The model is on
    `device`."""

    def __init__(self, model, steps: int, lr: float, reset: bool = True, *, device: torch.device):
        self.model, self.steps, self.lr, self.reset, self.device = model, steps, lr, reset, device
        self.initial = _snapshot(model)

    def __call__(self, ids: list[int]) -> None:
        if self.reset:
            self.model.load_state_dict(self.initial)
        if self.steps == 0 or len(ids) < 2:
            return
        x, y = torch.tensor([ids[:-1]], device=self.device), torch.tensor([ids[1:]], device=self.device)
        opt = torch.optim.SGD(self.model.parameters(), lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                with autocast(self.device):
                    loss = lm_loss(self.model, x, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

    def restore(self) -> None:
        self.model.load_state_dict(self.initial)


def forgetting(model, tokens: np.ndarray, segments: int, steps: int, lr: float, batch_size: int, seq_len: int,
               eval_batches: int = 2, seed: int = 0, *, device: torch.device) -> dict:
    """Sequential training of `model` (on `device`) over `segments` slices of `tokens`; returns the
    loss matrix and forgetting."""
    if segments < 2:
        raise ValueError(f"forgetting needs at least 2 segments, got {segments}")
    size = len(tokens) // segments
    tail = max(seq_len + 2, size // 10)
    if size - tail < seq_len + 2:
        raise InputError(f"{len(tokens)} tokens are too few for {segments} segments of seq_len {seq_len}")
    parts = [tokens[i * size:(i + 1) * size] for i in range(segments)]
    train, heldout = [p[:-tail] for p in parts], [p[-tail:] for p in parts]
    initial = _snapshot(model)

    def losses() -> list[float]:
        return [validation_loss(model, h, eval_batches, batch_size, seq_len, device, autocast(device))
                for h in heldout]

    before = losses()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    matrix = []
    try:
        for i, data in enumerate(train):
            model.train()
            for step in range(steps):
                x, y = sample_batch(data, batch_size, seq_len, seed * 1_000_003 + i * 10_007 + step, device)
                with autocast(device):
                    loss = lm_loss(model, x, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            matrix.append(losses())
    finally:
        model.load_state_dict(initial)
        model.eval()
    per_segment = [matrix[-1][j] - min(matrix[i][j] for i in range(j, segments)) for j in range(segments - 1)]
    return {"segments": segments, "steps_per_segment": steps, "loss_before": before, "loss_after": matrix,
            "learned": [before[j] - matrix[j][j] for j in range(segments)],
            "forgetting_per_segment": per_segment, "forgetting": float(np.mean(per_segment))}
