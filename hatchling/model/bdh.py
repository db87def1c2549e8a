"""BDH-GPU, the "Dragon Hatchling" (Kosowski et al., arXiv 2509.26507, Appendix E), as ``model.arch: bdh``.

A shared encoder lifts the residual stream (d_model) into a large space of ``bdh.neurons`` per
head through ReLU, so activations are non-negative and sparse. Attention is *linear* over those
neurons with RoPE, strictly causal (a token reads only earlier tokens), and its output is lifted
again and gated by the first activation (x_sparse * y_sparse) before a decoder brings it back.
Every LayerNorm is without affine parameters, as in the paper. ``bdh.per_layer`` gives each layer
its own encoder/decoder (the BDH seed's largest quality gain) instead of one set shared by all.

Linear attention has a recurrent form: with k_s = RoPE_s(x_sparse_s) the state
S_t = S_{t-1} + k_t v_tᵀ (N × d_model per head) turns decoding into a constant-size update, so
`forward` with a cache matches the full pass token for token.

Options from the BDH seed (``model.bdh``), each off by default:

- ``window: W`` — each token reads only the W tokens before it (decoding keeps those W keys
  and values instead of the state);
- ``forget: true`` — a learned forget gate per head, S_t = γ S_{t-1} + k_t v_tᵀ, computed in
  chunks of ``chunk`` tokens with the state carried between chunks (memory O(T·chunk), not
  O(T²)); `decayed_attention` is its full-matrix reference;
- ``differential: true`` — differential attention: the neurons split into two halves, each
  attends on its own, and the second's read-out is subtracted with a learned weight λ per head,
  cancelling what both halves retrieve alike (Ye et al., 2024).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hatchling.model.base import LanguageModel
from hatchling.model.config import ModelConfig
from hatchling.model.rope import rope


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:])


def decayed_attention(k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor, window: int = 0) -> torch.Tensor:
    """Reference: y_t = sum_{j<t, t-j<=window} gamma^(t-1-j) (k_t . k_j) v_j, as one T x T matrix.
    k [B,H,T,N]; v [B,1,T,D]; log_gamma [H] (0 = no forgetting); window 0 = unlimited."""
    t = k.shape[2]
    i = torch.arange(t, device=k.device)[:, None]
    j = torch.arange(t, device=k.device)[None]
    mask = j < i
    if window:
        mask &= j >= i - window
    decay = (log_gamma[:, None, None] * (i - 1 - j).clamp(min=0)).exp() * mask            # [H,T,T]
    return ((k @ k.transpose(-1, -2)) * decay.to(k.dtype)) @ v


def chunked_forget_attention(k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor, chunk: int,
                             state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """decayed_attention (no window) chunk by chunk, carrying S = sum_j gamma^(t-1-j) k_j v_j^T.
    Returns (y [B,H,T,D], the state after the last token [B,H,N,D])."""
    b, h, t, n = k.shape
    if state is None:
        state = k.new_zeros(b, h, n, v.shape[-1])
    g = log_gamma.to(k.dtype)[:, None]                                               # [H,1]
    outs = []
    for c0 in range(0, t, chunk):
        kc, vc = k[:, :, c0:c0 + chunk], v[:, :, c0:c0 + chunk]
        c = kc.shape[2]
        pos = torch.arange(c, device=k.device, dtype=k.dtype)
        inside = decayed_attention(kc, vc, log_gamma)                                 # within the chunk
        carried = (g * pos).exp()[None, :, :, None] * (kc @ state)                    # gamma^i k_t S_prev
        outs.append(inside + carried)
        # S_end = gamma^c S_prev + sum_i gamma^(c-1-i) k_i v_i^T
        weights = (g * (c - 1 - pos)).exp()[None, :, :, None]                         # [1,H,c,1]
        state = (g * c).exp()[None, :, :, None] * state + (kc * weights).transpose(-1, -2) @ vc
    return torch.cat(outs, dim=2), state


class BDHLayerParams(nn.Module):
    INT8_MATRICES = ("encoder", "encoder_v", "decoder")      # used as x @ W (hatchling/model/int8.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d, n = cfg.n_heads, cfg.d_model, cfg.bdh.neurons
        self.encoder = nn.Parameter(torch.randn(h, d, n) * cfg.init_std)
        self.encoder_v = nn.Parameter(torch.randn(h, d, n) * cfg.init_std)
        self.decoder = nn.Parameter(torch.randn(h * n, d) * cfg.init_std)
        if cfg.bdh.forget:        # gamma = sigmoid(logit) ~ 0.95 at the start: a memory of ~20 tokens
            self.forget_logit = nn.Parameter(torch.full((h,), 3.0))
        if cfg.bdh.differential:
            self.diff_lambda = nn.Parameter(torch.full((h,), 0.5))


class BDHLM(LanguageModel):
    INT8_MATRICES = ("lm_head",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.layers = nn.ModuleList(BDHLayerParams(cfg) for _ in range(cfg.n_layers if cfg.bdh.per_layer else 1))
        self.lm_head = nn.Parameter(torch.randn(cfg.d_model, cfg.vocab_size) * cfg.init_std)
        self.active_fraction = float("nan")      # share of neurons > 0 in the last forward pass

    def pass_stats(self) -> dict[str, float]:
        """The share of neurons that fired (> 0) in the last forward pass."""
        return {"active_fraction": self.active_fraction}

    def new_cache(self) -> list[dict]:
        return [{} for _ in range(self.config.n_layers)]

    def _attend(self, k: torch.Tensor, v: torch.Tensor, cache: dict | None, p: BDHLayerParams) -> torch.Tensor:
        """Strictly causal linear attention; k [B,H,T,N] (RoPE'd, also the query), v [B,1,T,D]."""
        if self.config.bdh.differential:
            half = k.shape[-1] // 2
            first = self._attend_one(k[..., :half], v, cache, p, "a")
            return first - p.diff_lambda[None, :, None, None] * self._attend_one(k[..., half:], v, cache, p, "b")
        return self._attend_one(k, v, cache, p, "")

    def _attend_one(self, k: torch.Tensor, v: torch.Tensor, cache: dict | None, p: BDHLayerParams,
                    key: str) -> torch.Tensor:
        cfg = self.config.bdh
        if cfg.window:                     # attend over the cached last-W keys too; keep the newest W
            past_k = cache.get("k" + key) if cache is not None else None
            if past_k is not None:
                k_all, v_all = torch.cat([past_k, k], 2), torch.cat([cache["v" + key], v], 2)
            else:
                k_all, v_all = k, v
            if cache is not None:
                cache["k" + key], cache["v" + key] = k_all[:, :, -cfg.window:], v_all[:, :, -cfg.window:]
            zero = torch.zeros(k.shape[1], device=k.device)
            return decayed_attention(k_all, v_all, zero, cfg.window)[:, :, k_all.shape[2] - k.shape[2]:]
        if cfg.forget:
            state = cache.get("state" + key) if cache is not None else None
            y, state = chunked_forget_attention(k, v, F.logsigmoid(p.forget_logit), cfg.chunk, state)
            if cache is not None:
                cache["state" + key] = state
            return y
        t = k.shape[2]
        mask = torch.ones(t, t, dtype=torch.bool, device=k.device).tril(diagonal=-1)
        y = (k @ k.transpose(-1, -2)).masked_fill(~mask, 0.0) @ v           # [B,H,T,D]
        if cache is not None:
            state = cache.get("state" + key)
            if state is not None:
                y = y + k @ state
            update = k.transpose(-1, -2) @ v                                  # [B,H,N,D]
            cache["state" + key] = update if state is None else state + update
        return y

    def packing_unsupported(self) -> str | None:
        return "arch bdh's linear attention (and its forget gate's carried state) runs across packed documents"

    def forward(self, input_ids: torch.Tensor, cache: list[dict] | None = None,
                doc_starts: torch.Tensor | None = None) -> torch.Tensor:
        if doc_starts is not None:
            raise ValueError(self.packing_unsupported())
        cfg = self.config
        b, t = input_ids.shape
        start = cache[0].get("pos", 0) if cache else 0
        positions = torch.arange(start, start + t, device=input_ids.device)
        x = layer_norm(self.embed(input_ids))[:, None]                       # [B,1,T,D]
        active = []
        for i in range(cfg.n_layers):
            p = self.layers[i if cfg.bdh.per_layer else 0]
            x_sparse = F.relu(x @ p.encoder)                                  # [B,H,T,N]
            k = rope(x_sparse, positions, cfg.rope_theta)
            y = layer_norm(self._attend(k, x, None if cache is None else cache[i], p))
            y_sparse = F.relu(y @ p.encoder_v)
            xy = (x_sparse * y_sparse).transpose(1, 2).reshape(b, 1, t, -1)   # [B,1,T,H*N]
            x = layer_norm(x + layer_norm(xy @ p.decoder))
            active.append((x_sparse > 0).float().mean())
            if cache is not None:
                cache[i]["pos"] = start + t
        self.active_fraction = float(torch.stack(active).mean())
        return x[:, 0] @ self.lm_head
