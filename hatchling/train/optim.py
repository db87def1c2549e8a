"""Optimizers and the learning-rate schedule.

AdamW decays only what the model does not exempt (LanguageModel.no_weight_decay: norms, biases, the
KDA decay parameters). Muon orthogonalises the updates of the blocks' weight matrices; embeddings
and everything 1-D stay on AdamW. AdaPM is AdamW with a momentum coefficient per output channel
(hatchling/train/adapm.py).
"""

from __future__ import annotations

import math

import torch

from hatchling.model.base import LanguageModel
from hatchling.train.adapm import AdaPM


def build_optimizers(model: LanguageModel, p) -> list[torch.optim.Optimizer]:
    """p: TrainParams-like (optimizer, lr, muon_lr, weight_decay, betas). Returns 1 or 2 optimizers."""
    named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    fused = all(q.is_cuda for _, q in named)
    muon = []
    if p.optimizer == "muon":            # Muon decays what it updates: never a parameter the model exempts
        exempt = model.no_weight_decay()
        muon = [q for n, q in named if q.dim() == 2 and n.startswith("blocks.") and n not in exempt]
    groups = model.param_groups(p.weight_decay, exclude=muon)
    if p.optimizer == "adapm":
        opts = [AdaPM(groups, lr=p.lr, betas=tuple(p.betas), beta_range=tuple(p.adapm_beta_range), rate=p.adapm_rate)]
    else:
        opts = [torch.optim.AdamW(groups, lr=p.lr, betas=tuple(p.betas), fused=fused or None)]
    if muon:
        opts.append(torch.optim.Muon(muon, lr=p.muon_lr, weight_decay=p.weight_decay))
    for opt in opts:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return opts


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * multiplier
