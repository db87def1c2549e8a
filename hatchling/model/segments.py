"""Packed documents: where each one starts in a batch of windows, in the forms the layers use.

The trainer packs documents end to end, each followed by end-of-text, and samples windows [B, T]
from that stream, so one window holds pieces of several documents. :func:`document_starts` marks
the token after each end-of-text; :class:`Segments` turns those marks into what each layer needs
so that no token sees another document's tokens:

* attention: a block-diagonal causal mask (:meth:`Segments.attention_mask`);
* the KDA layer's short convolutions: each token's offset in its segment (a tap that would reach
  back past the segment's start reads zero, as at the start of a sequence);
* KDA: the segment numbers (``ids``): the state restarts from zero where they change (the chunked
  form masks inside its chunks; fla gets ``cu_seqlens`` of the batch flattened to one row, its
  varlen form).

A window's first token always starts a segment: what came before it is not in the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def document_starts(input_ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """[B, T] bool: True on each token that follows an end-of-text token (a new document begins)."""
    return F.pad(input_ids[:, :-1] == eot_id, (1, 0), value=False)


@dataclass(frozen=True)
class Segments:
    ids: torch.Tensor           # [B, T] the segment's number within its row, from 0
    positions: torch.Tensor     # [B, T] the token's offset from its segment's start

    @classmethod
    def from_starts(cls, starts: torch.Tensor) -> Segments:
        """starts [B, T] bool: True where a segment begins (a row's first token always does)."""
        B, T = starts.shape
        starts = starts.clone()
        starts[:, 0] = True
        index = torch.arange(T, device=starts.device).expand(B, T)
        positions = index - torch.where(starts, index, 0).cummax(1).values
        return cls(starts.cumsum(1) - 1, positions)

    def attention_mask(self) -> torch.Tensor:
        """[B, 1, T, T] bool: query t may attend to key s iff s <= t in the same segment."""
        T = self.ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.ids.device).tril()
        return ((self.ids[:, :, None] == self.ids[:, None, :]) & causal)[:, None]

    def gather(self, index: torch.Tensor) -> Segments:
        """The segments of the tokens at `index` [B, T'] of each row, in that order (the kept tokens of
        token dropping): a new segment begins wherever the segment number changes."""
        ids = self.ids.gather(1, index)
        return Segments.from_starts(F.pad(ids[:, 1:] != ids[:, :-1], (1, 0), value=True))
