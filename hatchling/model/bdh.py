"""BDH-GPU, the "Dragon Hatchling" (Kosowski et al., arXiv 2509.26507, Appendix E), as ``model.arch: bdh``.

A shared encoder lifts the residual stream (d_model) into a large space of ``bdh_neurons`` per
head through ReLU, so activations are non-negative and sparse. Attention is *linear* over those
neurons with RoPE, strictly causal (a token reads only earlier tokens), and its output is lifted
again and gated by the first activation (x_sparse * y_sparse) before a decoder brings it back.
Every LayerNorm is without affine parameters, as in the paper. ``bdh_per_layer`` gives each layer
its own encoder/decoder (the BDH seed's largest quality gain) instead of one set shared by all.

Linear attention has a recurrent form: with k_s = RoPE_s(x_sparse_s) the state
S_t = S_{t-1} + k_t v_tᵀ (N × d_model per head) turns decoding into a constant-size update, so
`forward` with a cache matches the full pass token for token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hatchling.model.base import LanguageModel
from hatchling.model.config import ModelConfig


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:])


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate consecutive pairs of the last dim of x [..., T, N] by angle position · theta^(-2i/N)."""
    n = x.shape[-1]
    freqs = theta ** (-torch.arange(0, n, 2, device=x.device, dtype=torch.float32) / n)
    angles = positions.to(torch.float32)[:, None] * freqs                  # [T, N/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class BDHLayerParams(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d, n = cfg.n_heads, cfg.d_model, cfg.bdh_neurons
        self.encoder = nn.Parameter(torch.randn(h, d, n) * cfg.init_std)
        self.encoder_v = nn.Parameter(torch.randn(h, d, n) * cfg.init_std)
        self.decoder = nn.Parameter(torch.randn(h * n, d) * cfg.init_std)


class BDHLM(LanguageModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.bdh_neurons % 2:
            raise ValueError(f"model.bdh_neurons must be even (RoPE rotates pairs), got {cfg.bdh_neurons}")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.layers = nn.ModuleList(BDHLayerParams(cfg) for _ in range(cfg.n_layers if cfg.bdh_per_layer else 1))
        self.lm_head = nn.Parameter(torch.randn(cfg.d_model, cfg.vocab_size) * cfg.init_std)
        self.active_fraction = float("nan")      # share of neurons > 0 in the last forward pass

    def new_cache(self) -> list[dict]:
        return [{} for _ in range(self.config.n_layers)]

    def _attend(self, k: torch.Tensor, v: torch.Tensor, cache: dict | None) -> torch.Tensor:
        """Strictly causal linear attention; k [B,H,T,N] (RoPE'd, also the query), v [B,1,T,D]."""
        t = k.shape[2]
        mask = torch.ones(t, t, dtype=torch.bool, device=k.device).tril(diagonal=-1)
        y = (k @ k.transpose(-1, -2)).masked_fill(~mask, 0.0) @ v           # [B,H,T,D]
        if cache is not None:
            state = cache.get("state")
            if state is not None:
                y = y + k @ state
            update = k.transpose(-1, -2) @ v                                  # [B,H,N,D]
            cache["state"] = update if state is None else state + update
        return y

    def forward(self, input_ids: torch.Tensor, cache: list[dict] | None = None) -> torch.Tensor:
        cfg = self.config
        b, t = input_ids.shape
        start = cache[0].get("pos", 0) if cache else 0
        positions = torch.arange(start, start + t, device=input_ids.device)
        x = layer_norm(self.embed(input_ids))[:, None]                       # [B,1,T,D]
        active = []
        for i in range(cfg.n_layers):
            p = self.layers[i if cfg.bdh_per_layer else 0]
            x_sparse = F.relu(x @ p.encoder)                                  # [B,H,T,N]
            k = rope(x_sparse, positions, cfg.rope_theta)
            y = layer_norm(self._attend(k, x, None if cache is None else cache[i]))
            y_sparse = F.relu(y @ p.encoder_v)
            xy = (x_sparse * y_sparse).transpose(1, 2).reshape(b, 1, t, -1)   # [B,1,T,H*N]
            x = layer_norm(x + layer_norm(xy @ p.decoder))
            active.append((x_sparse > 0).float().mean())
            if cache is not None:
                cache[i]["pos"] = start + t
        self.active_fraction = float(torch.stack(active).mean())
        return x[:, 0] @ self.lm_head
