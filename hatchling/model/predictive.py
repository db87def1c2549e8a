"""Predictive coding: a head that forecasts the next hidden state, and curiosity from its error.

At every position t the head maps the top hidden state h_t to a guess of h_{t+1}. The teacher is
the model's own next state with its gradient stopped (RMS-normalised, so the head cannot win by
shrinking the states), and the loss is the mean squared error, weighted into the training loss.
The per-token error, divided by its mean over the batch, is the curiosity signal: above 1 means
"this continuation surprised my model of its own dynamics". The trainer logs it and RL can add it
to the reward as an intrinsic bonus (``rlvr.use_curiosity_bonus``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hatchling.model.segments import Segments


class NextStateHead(nn.Module):
    def __init__(self, d_model: int, weight: float, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps
        self.predict = nn.Sequential(nn.RMSNorm(d_model, eps=eps), nn.Linear(d_model, d_model, bias=False),
                                     nn.SiLU(), nn.Linear(d_model, d_model, bias=False))
        self.last_aux: dict[str, torch.Tensor] = {}
        self.last_stats: dict[str, float] = {}
        self.curiosity: torch.Tensor | None = None

    def errors(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, d] -> squared error of each forecast of the next state: [B, T - 1]."""
        teacher = F.rms_norm(h[:, 1:].detach().float(), (h.shape[-1],), eps=self.eps)
        guess = self.predict(h[:, :-1]).float()
        return (guess - teacher).pow(2).mean(-1)

    def observe(self, h: torch.Tensor, segments: Segments | None = None) -> None:
        """Record the loss and the curiosity of one forward pass (nothing for a single token). With
        packed documents (segments) no state is forecast across a document start: those pairs count 0."""
        self.last_aux, self.last_stats, self.curiosity = {}, {}, None
        if h.shape[1] < 2:
            return
        err = self.errors(h)
        if segments is None:
            mean = err.mean()
        else:
            within = (segments.ids[:, 1:] == segments.ids[:, :-1]).to(err.dtype)
            err = err * within
            mean = err.sum() / within.sum().clamp(min=1)
        self.last_aux = {"predictive_loss": self.weight * mean}
        self.curiosity = (err / mean.clamp(min=1e-12)).detach()
        self.last_stats = {"predictive_error": float(mean.detach())}
