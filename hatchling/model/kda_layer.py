"""The KDA token mixer in the style of Kimi Linear.

x -> q, k, v projections -> short causal depthwise conv + SiLU -> L2-normalised q, k;
per-channel decay g = -exp(A_log) * softplus(f(x) + dt_bias) from a low-rank projection;
beta = sigmoid(b(x)); KDA; per-head RMSNorm gated by sigmoid of a low-rank projection; output proj.
The L2 norm, the decay and the sigmoid are handed to :func:`~hatchling.model.kda.kda`: on the fla
path they run inside fla's kernel, on the PyTorch paths as the explicit reference ops.

Decoding keeps a constant-size cache per layer: the last ``conv_size - 1`` inputs of each conv
and the [H, K, V] KDA state, whatever the context length.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hatchling.model.config import ModelConfig
from hatchling.model.kda import kda, kda_gate, l2norm
from hatchling.model.segments import Segments
from hatchling.model.spike import LIFGate, kda_skipping_silent


class CausalConv1d(nn.Module):
    """Depthwise conv over time that sees only the past: left padding of kernel-1, never symmetric.

    With a cache (a dict) the last kernel-1 inputs are carried between calls, so feeding a
    sequence in pieces gives exactly the output of feeding it whole. With `positions` (each token's
    offset in its packed document, :class:`~hatchling.model.segments.Segments`) a tap that would
    reach back past the token's document start reads zero, as at the start of a sequence.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, cache: dict | None = None, key: str = "conv",
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, C] -> SiLU(conv(x)): [B, T, C]."""
        x = x.transpose(1, 2)                                               # [B, C, T]
        keep = self.kernel_size - 1
        if positions is not None:
            windows = F.pad(x, (keep, 0)).unfold(-1, self.kernel_size, 1)  # [B, C, T, W]: tap i lags keep - i
            lags = torch.arange(keep, -1, -1, device=x.device)
            windows = windows * (lags <= positions[:, None, :, None]).to(x.dtype)
            return F.silu(windows @ self.weight[:, 0, :, None].to(x.dtype)).squeeze(-1).transpose(1, 2)
        if cache is not None and key in cache:
            past = cache[key]
        else:
            past = x.new_zeros(x.shape[0], x.shape[1], keep)
        x = torch.cat([past.to(x.dtype), x], dim=-1)
        if cache is not None:
            cache[key] = x[..., x.shape[-1] - keep:].detach()
        if x.shape[-1] == self.kernel_size:      # one decoding step: a dot product beats a conv call
            y = (x * self.weight[:, 0].to(x.dtype)).sum(-1, keepdim=True)
        else:
            y = F.conv1d(x, self.weight.to(x.dtype), groups=x.shape[1])
        return F.silu(y).transpose(1, 2)


class GatedHeadNorm(nn.Module):
    """RMSNorm over each head's output, times sigmoid(gate): [B, T, H, D]."""

    def __init__(self, head_dim: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(head_dim, eps=eps)

    def forward(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.norm(o) * torch.sigmoid(gate)


class KDALayer(nn.Module):
    NO_WEIGHT_DECAY = ("A_log", "dt_bias")      # the decay rates: weight decay would pull every layer to one

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, D, d = cfg.n_heads, cfg.head_dim, cfg.d_model
        self.n_heads, self.head_dim = H, D
        self.chunk_size, self.backend = cfg.chunk_size, cfg.kda_backend
        self.q_proj = nn.Linear(d, H * D, bias=False)
        self.k_proj = nn.Linear(d, H * D, bias=False)
        self.v_proj = nn.Linear(d, H * D, bias=False)
        self.q_conv = CausalConv1d(H * D, cfg.conv_size)
        self.k_conv = CausalConv1d(H * D, cfg.conv_size)
        self.v_conv = CausalConv1d(H * D, cfg.conv_size)
        self.f_proj = nn.Sequential(nn.Linear(d, D, bias=False), nn.Linear(D, H * D, bias=False))
        self.b_proj = nn.Linear(d, H, bias=False)
        self.g_proj = nn.Sequential(nn.Linear(d, D, bias=False), nn.Linear(D, H * D, bias=True))
        self.o_norm = GatedHeadNorm(D, cfg.norm_eps)
        self.o_proj = nn.Linear(H * D, d, bias=False)
        # Decay rates: A in [1, 16] per head, dt in [1e-3, 0.1] per channel (as in Mamba / Kimi Linear).
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(H * D) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))      # softplus^-1(dt)
        self.spike = LIFGate(d, H, cfg.spike_threshold, cfg.spike_decay) if cfg.spike else None
        self.last_stats: dict[str, float] = {}

    def forward(self, x: torch.Tensor, cache: dict | None = None, segments: Segments | None = None) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]. With `segments` (packed documents, no cache) neither the convolutions
        nor the KDA state cross a document start (kda's segment_ids)."""
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        positions = None if segments is None else segments.positions
        q = self.q_conv(self.q_proj(x), cache, "q_conv", positions).view(B, T, H, D)
        k = self.k_conv(self.k_proj(x), cache, "k_conv", positions).view(B, T, H, D)
        v = self.v_conv(self.v_proj(x), cache, "v_conv", positions).view(B, T, H, D)
        f, b = self.f_proj(x).view(B, T, H, D), self.b_proj(x)             # raw decay input, beta logits
        state = cache.get("state") if cache is not None else None
        if self.spike is None:   # kda applies l2norm, the gate and the sigmoid: inside fla's kernel on its path
            o, state = kda(q, k, v, f, b, initial_state=state, output_final_state=cache is not None,
                           chunk_size=self.chunk_size, backend=self.backend, use_qk_l2norm=True,
                           use_gate=True, A_log=self.A_log, dt_bias=self.dt_bias, use_beta_sigmoid=True,
                           segment_ids=None if segments is None else segments.ids)
        elif segments is not None:
            raise ValueError("KDALayer: spike-KDA does not keep packed documents apart (its LIF membranes run "
                             "through the whole window)")
        else:                    # the spikes switch off the gated update, so the gates are computed here
            spikes = self.spike(x, cache)
            g = kda_gate(f, self.A_log, self.dt_bias)                       # at least float32
            beta = torch.sigmoid(b.to(g.dtype))
            o, state, skipped = kda_skipping_silent(l2norm(q), l2norm(k), v, g, beta, spikes, initial_state=state,
                                                    output_final_state=cache is not None,
                                                    chunk_size=self.chunk_size, backend=self.backend)
            self.last_stats = {"spike_rate": float(spikes.detach().mean()), "silent_heads_skipped": skipped}
        if cache is not None:
            cache["state"] = state.detach()
        o = self.o_norm(o.to(x.dtype), self.g_proj(x).view(B, T, H, D))
        return self.o_proj(o.reshape(B, T, H * D))
