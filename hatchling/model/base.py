"""What every architecture shares: the interface the trainer, RL and the checkpoint loader use,
sampling methods, and the embed → blocks → norm → tied-head stack.

Each block takes (x, its per-layer cache dict or None); a model's decoding cache is one dict per
block, so `hatchling.model.generate` drives any of them the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hatchling.model.generate import generate, stream


class LanguageModel(nn.Module):
    """forward(input_ids [B, T], cache, doc_starts) -> logits [B, T, vocab], plus new_cache(); sampling
    comes free. doc_starts [B, T] bool (training passes, no cache) marks where packed documents begin
    (hatchling/model/segments.py): a model that keeps them apart lets no token see another document's.

    The other methods are what the trainer, RL and the checkpoint loader ask of every model; the
    defaults here are those of a plain LM, and an architecture overrides what it has.
    """

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

    # -- what training reads after each forward pass -------------------------------------------
    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Losses of the last forward pass that training adds to the next-token loss, by name."""
        return {}

    def pass_stats(self) -> dict[str, float]:
        """Statistics of the last forward pass, by name (logged per step, and as val_<name> on validation)."""
        return {}

    def curiosity(self) -> torch.Tensor | None:
        """Per-token curiosity [B, T - 1] of the last forward pass (how badly the model forecast its
        own next state; RL's intrinsic reward), or None for a model that makes no such forecast."""
        return None

    def packing_unsupported(self) -> str | None:
        """Why this model cannot keep packed documents apart (forward's doc_starts), or None when it can."""
        return f"{type(self).__name__} does not keep packed documents apart"

    def set_train_step(self, step: int) -> None:
        """Told the trainer's step before each one (e.g. the episodic memory stamps entries with it)."""

    # -- optimizer groups ------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that take no weight decay: every one with fewer than two
        dimensions (norm gains, biases, per-head scalars); subclasses add matrices of their own."""
        return {name for name, p in self.named_parameters() if p.dim() < 2}

    def param_groups(self, weight_decay: float, exclude: Iterable[nn.Parameter] = ()) -> list[dict]:
        """The trainable parameters not in `exclude` (those another optimizer updates) as two
        optimizer groups, in parameter order: [decayed by weight_decay, no_weight_decay()]."""
        skip = {id(p) for p in exclude}
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in skip]
        no_decay = self.no_weight_decay()
        return [{"params": [p for n, p in named if n not in no_decay], "weight_decay": weight_decay},
                {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0}]

    # -- state that lives beside the weights ----------------------------------------------------
    def save_state_files(self, directory: Path) -> None:
        """Write files that belong with the weights (not tensors: e.g. a memory store) into a
        checkpoint directory being written."""

    def load_state_files(self, directory: Path) -> None:
        """Read back what save_state_files wrote (after the weights are loaded)."""


class BlockStackLM(LanguageModel):
    """Subclasses set self.embed, self.blocks (ModuleList) and self.norm; the head is the embedding."""

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.blocks]

    def forward(self, input_ids: torch.Tensor, cache: list[dict] | None = None,
                doc_starts: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]. A cache, if given, is read and updated in place."""
        if doc_starts is not None:
            raise ValueError(self.packing_unsupported())
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i])
        return F.linear(self.norm(x), self.embed.weight)
