"""What every architecture shares: sampling methods, and the embed → blocks → norm → tied-head stack.

Each block takes (x, its per-layer cache dict or None); a model's decoding cache is one dict per
block, so `hatchling.model.generate` drives any of them the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hatchling.model.generate import generate, stream


class LanguageModel(nn.Module):
    """forward(input_ids [B, T], cache) -> logits [B, T, vocab], plus new_cache(); sampling comes free."""

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_ids: tuple[int, ...] = ()) -> torch.Tensor:
        """Prompt [B, T] -> prompt + up to max_new_tokens tokens (greedy when temperature is 0)."""
        return generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling):
        """Yield next-token ids [B] as they are sampled (see hatchling.model.generate.stream)."""
        return stream(self, input_ids, max_new_tokens, **sampling)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class BlockStackLM(LanguageModel):
    """Subclasses set self.embed, self.blocks (ModuleList) and self.norm; the head is the embedding."""

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.blocks]

    def forward(self, input_ids: torch.Tensor, cache: list[dict] | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]. A cache, if given, is read and updated in place."""
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i])
        return F.linear(self.norm(x), self.embed.weight)
