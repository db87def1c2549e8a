"""NoPE global attention: causal softmax attention with no position encoding at all.

Position comes from the causal mask and from the KDA layers around it. Grouped-query KV
(``n_kv_heads`` < ``n_heads``; 1 = multi-query) keeps the decoding KV cache small.
``RoPEAttention`` is the same layer with rotary positions: every layer of the GPT baseline
(``arch: gpt``) that the hybrid is measured against.

Packed documents (``segments``) are kept apart by a block-diagonal causal mask. Neither layer resets
positions at a document start: NoPE has none, and a RoPE score depends only on the distance t - s,
so a document's scores are the same wherever it sits in the window.

:class:`AttentionStep` decodes one token at a time into a preallocated KV cache (forward with a
cache, which grows its KV by concatenation, is its reference).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hatchling.model.config import ModelConfig
from hatchling.model.kda import StepWeight, folded_norm, unit
from hatchling.model.rope import rope
from hatchling.model.segments import Segments


class NoPEAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.kv_proj = nn.Linear(cfg.d_model, 2 * cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cache: dict | None = None, segments: Segments | None = None) -> torch.Tensor:
        """x: [B, T, d]. With a cache (a dict), keys and values of earlier calls are attended to; with
        `segments` (packed documents, no cache), only keys of the query's own document."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        past = cache["k"].shape[2] if cache is not None and "k" in cache else 0
        q, k = self.encode_positions(q, k, past)
        if cache is not None:
            if past:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k.detach(), v.detach()
        if segments is not None:
            mask, causal = segments.attention_mask(), False
        elif past == 0:
            mask, causal = None, True
        elif T == 1:
            mask, causal = None, False                                      # one new query sees all
        else:                                                               # a block after a prefix
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def encode_positions(self, q: torch.Tensor, k: torch.Tensor, past: int) -> tuple[torch.Tensor, torch.Tensor]:
        """NoPE: none. q [B, H, T, D], k [B, Hkv, T, D] of tokens at positions past, past+1, ..."""
        return q, k

    def encode_at(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encode_positions with the T positions given as a tensor (a compiled step's, which no shape
        or branch may depend on)."""
        return q, k


class RoPEAttention(NoPEAttention):
    """Causal GQA attention with rotary positions (cached keys are stored already rotated)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.rope_theta = cfg.rope_theta

    def encode_positions(self, q: torch.Tensor, k: torch.Tensor, past: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_at(q, k, torch.arange(past, past + q.shape[2], device=q.device))

    def encode_at(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)


class AttentionStep:
    """x + attention(norm(x)) for one token at a time, from the cache a prefill left (`layer(x, cache)`):
    the pre-norm folded into one matmul for q, k and v (:func:`~hatchling.model.kda.folded_norm`),
    the token's key and value written in place into a KV cache allocated once for `max_len` positions,
    one SDPA call with each KV head's query heads as its queries (grouped-query attention without
    repeating the keys), and the output projection fused with the residual add."""

    def __init__(self, layer: NoPEAttention, norm: nn.RMSNorm, cache: dict, batch: int, max_len: int,
                 parts: int | None = None):
        self.layer = layer
        w_qkv, self.root_eps = folded_norm(norm, torch.cat([layer.q_proj.weight, layer.kv_proj.weight]))
        self.w_qkv, self.w_out = StepWeight(w_qkv, parts), StepWeight(layer.o_proj.weight.T.contiguous(), parts)
        self.pos = cache["k"].shape[2] if "k" in cache else 0
        shape = (batch, layer.n_kv_heads, max_len, layer.head_dim)
        self.k, self.v = w_qkv.new_zeros(shape), w_qkv.new_zeros(shape)
        if self.pos:
            self.k[:, :, :self.pos], self.v[:, :, :self.pos] = cache["k"], cache["v"]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The token's q [B, H, 1, D], k and v [B, Hkv, 1, D] (before positions)."""
        H, Hkv, D = self.layer.n_heads, self.layer.n_kv_heads, self.layer.head_dim
        qkv = self.w_qkv(unit(x, self.root_eps))
        return qkv.view(x.shape[0], H + 2 * Hkv, 1, D).split([H, Hkv, Hkv], dim=1)

    def attend(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **sdpa) -> torch.Tensor:
        """x + the output projection of q's attention over keys k and values v [B, Hkv, L, D]."""
        B = x.shape[0]
        H, Hkv, D = self.layer.n_heads, self.layer.n_kv_heads, self.layer.head_dim
        y = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), k, v, **sdpa)
        return self.w_out(y.view(B, H * D), x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d] (one token's residual stream) -> x + layer(norm(x))."""
        q, k, v = self.project(x)
        q, k = self.layer.encode_positions(q, k, self.pos)
        self.k.narrow(2, self.pos, 1).copy_(k)
        self.v.narrow(2, self.pos, 1).copy_(v)
        self.pos += 1
        return self.attend(x, q, self.k.narrow(2, 0, self.pos), self.v.narrow(2, 0, self.pos))


class StaticAttentionStep(AttentionStep):
    """AttentionStep in fixed shapes, for a compiled decoding step (torch.compile): the position is a
    tensor, the token's key and value are written at it by index, and the query attends over the whole
    preallocated cache with the slots not yet written masked out. Each step costs as much as the last
    one of `max_len`, in return for one compiled graph for every step."""

    def __init__(self, layer: NoPEAttention, norm: nn.RMSNorm, cache: dict, batch: int, max_len: int,
                 parts: int | None = None):
        super().__init__(layer, norm, cache, batch, max_len, parts)
        self.position = torch.tensor([self.pos], device=self.k.device)     # of the next token (self.pos: the first)
        self.slots = torch.arange(max_len, device=self.k.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        q, k = self.layer.encode_at(q, k, self.position)
        self.k.index_copy_(2, self.position, k)
        self.v.index_copy_(2, self.position, v)
        visible = (self.slots <= self.position)[None]
        self.position.add_(1)
        return self.attend(x, q, self.k, self.v, attn_mask=visible)
