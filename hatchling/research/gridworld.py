"""A tiny curiosity gridworld ("Stage-D"): the language model itself is the policy.

An episode is a token sequence  cell_0 action_0 cell_1 action_1 ...  over a vocabulary of the
grid's cells and four moves. The model reads the history and its logits over the four move tokens
are the policy. The predictive-coding head forecasts each next hidden state; its normalised error
on the cell the agent lands in is the curiosity bonus (new transitions surprise it, familiar ones
stop doing so), added to the extrinsic reward (1 on reaching the goal) and trained with REINFORCE
against a per-batch baseline. Every iteration appends a row to a summary CSV.

    hatchling gridworld --size 4 --iterations 150 --out logs/gridworld.csv
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hatchling.io import atomic_write_csv
from hatchling.model import build_model

MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))          # up, down, left, right


@dataclass
class GridWorld:
    """size x size open grid, start top-left, goal bottom-right; moves off the grid stay put."""

    size: int = 4

    @property
    def start(self) -> int:
        return 0

    @property
    def goal(self) -> int:
        return self.size * self.size - 1

    def step(self, cell: int, move: int) -> int:
        r, c = divmod(cell, self.size)
        dr, dc = MOVES[move]
        r, c = min(max(r + dr, 0), self.size - 1), min(max(c + dc, 0), self.size - 1)
        return r * self.size + c

    def action_token(self, move: int) -> int:
        return self.size * self.size + move

    @property
    def vocab_size(self) -> int:
        return self.size * self.size + len(MOVES)


def policy_model(world: GridWorld, seed: int = 0):
    """A small hybrid LM with the predictive-coding head, vocabulary = cells + moves."""
    torch.manual_seed(seed)
    return build_model(dict(vocab_size=world.vocab_size, d_model=32, n_layers=2, n_heads=2, head_dim=16,
                            n_kv_heads=1, mlp_hidden=64, attn_every=2, chunk_size=16,
                            use_predictive_coding=True))


def move_logits(model, world: GridWorld, history: torch.Tensor) -> torch.Tensor:
    """[B, 4] logits of the four moves after the histories [B, t]."""
    first = world.action_token(0)
    return model(history)[:, -1, first:first + len(MOVES)]


def rollout(model, world: GridWorld, batch: int, max_steps: int, greedy: bool, generator=None):
    """Play `batch` episodes. Returns (histories [B, 1 + 2*steps], log-probs [B, steps],
    reached [B] bool, steps taken [B]); a finished episode keeps standing on the goal."""
    history = torch.full((batch, 1), world.start)
    logps, done = [], torch.zeros(batch, dtype=torch.bool)
    steps = torch.zeros(batch, dtype=torch.long)
    for _ in range(max_steps):
        logp = move_logits(model, world, history).float().log_softmax(-1)
        move = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        logps.append(torch.where(done, 0.0, logp.gather(-1, move[:, None]).squeeze(-1)))
        cells = torch.tensor([world.step(int(c), int(m)) if not d else int(c)
                              for c, m, d in zip(history[:, -1], move, done, strict=True)])
        steps += (~done).long()
        history = torch.cat([history, (move + world.action_token(0))[:, None], cells[:, None]], 1)
        done = done | (cells == world.goal)
        if bool(done.all()):
            break
    return history, torch.stack(logps, 1), done, steps


def train(world: GridWorld, iterations: int, batch: int = 16, max_steps: int | None = None,
          curiosity_coef: float = 0.1, lr: float = 3e-3, seed: int = 0, csv_path: Path | None = None):
    """REINFORCE with the curiosity bonus; returns (model, rows of the summary CSV)."""
    max_steps = max_steps or 3 * world.size
    model = policy_model(world, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for it in range(1, iterations + 1):
        model.train()
        history, logp, reached, steps = rollout(model, world, batch, max_steps, greedy=False, generator=generator)
        model(history)                                     # the predictive head sees the whole episodes
        curiosity = model.curiosity()                      # [B, len-1]: error forecasting state t+1
        landed = curiosity[:, 1::2]                        # forecasts of the cells landed on
        mask = torch.arange(landed.shape[1])[None] < steps[:, None]
        bonus = curiosity_coef * (landed * mask).sum(1) / mask.sum(1).clamp(min=1)
        extrinsic = reached.float() * (1.0 - 0.5 * steps.float() / max_steps)   # sooner is better
        ret = extrinsic + bonus
        advantage = ret - ret.mean()
        loss = -(advantage[:, None] * logp).sum(1).mean() + model.aux_losses()["predictive_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rows.append({"iteration": it, "return_mean": round(float(ret.mean()), 5),
                     "extrinsic_mean": round(float(extrinsic.mean()), 5),
                     "curiosity_bonus": round(float(bonus.mean()), 5),
                     "reached_fraction": round(float(reached.float().mean()), 5),
                     "steps_mean": round(float(steps.float().mean()), 3)})
    if csv_path is not None:
        atomic_write_csv(csv_path, rows)
    return model, rows


@torch.no_grad()
def greedy_episode(model, world: GridWorld, max_steps: int | None = None) -> tuple[bool, int]:
    """(reached the goal, steps) for the greedy policy."""
    model.eval()
    _, _, reached, steps = rollout(model, world, 1, max_steps or 3 * world.size, greedy=True)
    return bool(reached[0]), int(steps[0])
