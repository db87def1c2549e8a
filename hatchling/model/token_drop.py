"""Token dropping for mid-stack KDA blocks (ScTD-lite): a router lets some tokens skip a block.

A linear router scores each token on its own (so the decision is causal and the same in training
and decoding); tokens with score > 0 go through the block, the rest ride the residual stream
unchanged. The kept tokens of each row are gathered into a shorter sequence, so the block really
does less work; in that sequence a KDA block sees only kept tokens, in decoding too (a dropped
token leaves the block's cache untouched).

The forward value of a kept token's update is exactly the block's; gradients reach the router by
the straight-through estimator (keep + p - p.detach()), and a loss (kept share - target)^2 holds
the kept share at 1 - token_drop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from hatchling.model.segments import Segments


class TokenRouter(nn.Module):
    def __init__(self, d_model: int, drop: float, weight: float):
        super().__init__()
        self.score = nn.Linear(d_model, 1)
        self.target, self.weight = 1.0 - drop, weight
        self.last_aux: dict[str, torch.Tensor] = {}
        self.last_stats: dict[str, float] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.constant_(self.score.bias, 1.0)        # keep every token at first; learn what to drop

    def forward(self, x: torch.Tensor, block: Callable, cache: dict | None = None,
                segments: Segments | None = None) -> torch.Tensor:
        """x [B, T, d]; block(x, cache, segments) -> x + update. Returns x with the update on kept tokens
        only. Packed documents (segments) stay apart in the kept sequence too."""
        p = torch.sigmoid(self.score(x).squeeze(-1).float())                     # [B, T]
        keep = p > 0.5
        st = keep.float() + p - p.detach()                                         # 1/0 forward, dp backward
        self.last_aux = {"token_drop_loss": self.weight * (st.mean() - self.target) ** 2} if self.training else {}
        self.last_stats = {"tokens_kept": float(keep.float().mean())}
        if bool(keep.all()):
            return x + (block(x, cache, segments) - x) * st[..., None].to(x.dtype)
        counts = keep.sum(1)
        if int(counts.max()) == 0:
            return x
        if cache is not None and bool((counts != counts.max()).any()):
            return self._rows_apart(x, block, cache)
        # kept positions first, in time order, then padding (positions after every kept token)
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :int(counts.max())]
        idx = order[..., None].expand(-1, -1, x.shape[-1])
        kept = x.gather(1, idx)
        valid = torch.arange(order.shape[1], device=x.device)[None] < counts[:, None]
        kept_segments = None if segments is None else segments.gather(order)
        update = (block(kept, cache, kept_segments) - kept) * (st.gather(1, order) * valid)[..., None].to(x.dtype)
        return x.scatter_add(1, idx, update)

    def _rows_apart(self, x: torch.Tensor, block: Callable, cache: dict) -> torch.Tensor:
        """Decoding a batch whose rows keep different numbers of tokens: one row at a time with its
        own slice of the cache, so no row's padding reaches another row's state. A row without an
        entry yet starts from zeros, which is what a KDA block assumes for a missing entry."""
        stats, rows, outs = self.last_stats, [], []
        for b in range(x.shape[0]):
            rows.append({k: v[b:b + 1] for k, v in cache.items()})
            outs.append(self(x[b:b + 1], block, rows[-1]))
        for key in set().union(*rows):
            like = next(r[key] for r in rows if key in r)
            cache[key] = torch.cat([r.get(key, torch.zeros_like(like)) for r in rows], 0)
        self.last_stats = stats
        return torch.cat(outs, 0)
