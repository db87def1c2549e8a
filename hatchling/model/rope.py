"""Rotary position embedding, shared by BDH (over its neuron space) and the GPT baseline (per head)."""

from __future__ import annotations

import torch


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate consecutive pairs of the last dim of x [..., T, N] by angle position · theta^(-2i/N)."""
    n = x.shape[-1]
    freqs = theta ** (-torch.arange(0, n, 2, device=x.device, dtype=torch.float32) / n)
    angles = positions.to(torch.float32)[:, None] * freqs                  # [T, N/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
