"""Mixed-sparsity training: magnitude pruning to a target, then regrowth where gradients are large.

The blocks' weight matrices are pruned by magnitude on a cubic schedule (Zhu & Gupta, 2017) from
dense at ``start`` to the target sparsity at ``end`` of training; "mixed" because the MLP and the
token mixers (KDA / attention projections) have their own targets. At each update a further share
``regrow`` of the surviving weights is pruned and the same number of pruned positions with the
largest gradient magnitude come back at zero (RigL, Evci et al. 2020), so the sparsity pattern keeps
moving towards the connections the loss wants. Between updates the masks are applied after every
optimizer step, so pruned weights stay exactly zero.
"""

from __future__ import annotations

import torch


def cubic_sparsity(step: int, target: float, start: int, end: int) -> float:
    """0 before start, target after end, target * (1 - (1 - progress)^3) between."""
    if step < start or target == 0:
        return 0.0
    progress = min(1.0, (step - start) / max(1, end - start))
    return target * (1 - (1 - progress) ** 3)


def prune_and_regrow(weight: torch.Tensor, grad: torch.Tensor | None, sparsity: float, regrow: float) -> torch.Tensor:
    """The new mask (bool, shape of weight) holding exactly round((1 - sparsity) * numel) weights."""
    n = weight.numel()
    keep = n - round(sparsity * n)
    grown = min(round(regrow * keep), n - keep) if grad is not None else 0
    survivors = keep - grown
    order = weight.abs().flatten().argsort(descending=True, stable=True)
    mask = torch.zeros(n, dtype=torch.bool, device=weight.device)
    mask[order[:survivors]] = True
    if grown:
        score = grad.abs().flatten().masked_fill(mask, -1.0)           # only pruned positions compete
        mask[score.argsort(descending=True, stable=True)[:grown]] = True
    return mask.view_as(weight)


class SparsityController:
    """Owns the masks of the block matrices; call update() after each optimizer step, before zero_grad."""

    def __init__(self, model: torch.nn.Module, mlp: float, mixer: float, every: int, regrow: float,
                 start: int, end: int):
        self.every, self.regrow, self.start, self.end = every, regrow, start, end
        self.targets: dict[str, float] = {}
        self.params: dict[str, torch.nn.Parameter] = {}
        for name, p in model.named_parameters():
            if p.dim() == 2 and name.startswith("blocks."):          # routers and spike drives stay dense
                target = mlp if ".mlp." in name else mixer if ".mixer." in name and ".spike." not in name else 0.0
                if target > 0:
                    self.params[name], self.targets[name] = p, target
        self.masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """`step` = optimizer steps done. Moves the masks on schedule, then zeroes pruned weights."""
        if step >= self.start and (step - self.start) % self.every == 0:
            for name, p in self.params.items():
                sparsity = cubic_sparsity(step, self.targets[name], self.start, self.end)
                self.masks[name] = prune_and_regrow(p, p.grad, sparsity, self.regrow if step < self.end else 0.0)
        for name, p in self.params.items():
            p.mul_(self.masks[name])

    def sparsity(self) -> float:
        """Share of zero weights over the controlled matrices."""
        total = sum(m.numel() for m in self.masks.values())
        return 1 - sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)

    def state_dict(self) -> dict:
        return {name: m.cpu() for name, m in self.masks.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, mask in state.items():
            self.masks[name] = mask.to(self.params[name].device)
