"""Log-likelihood primitives every multiple-choice eval task is built from (generation: hatchling.inference).

`loglikelihoods` follows lm-evaluation-harness: the continuation's tokens are scored given the
context, the context is cut from the left when the pair is longer than the window, and the pair
is split into tokens at the boundary (context tokens + continuation tokens) so the continuation's
score never depends on how BPE would merge across it. Requests are deduplicated (multiple-choice
tasks share contexts and many items share continuations) and batched by length. Batches go to the
device given, the model's; on CUDA the forward pass runs under bf16 autocast and the scores are taken in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hatchling.model.device import autocast


@dataclass(frozen=True)
class Scored:
    logprob: float      # sum of the continuation tokens' log-probabilities
    tokens: int         # continuation length in tokens
    greedy: bool        # every continuation token is the argmax given what precedes it


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids); trailing spaces of the context move into the continuation,
    as lm-eval does, so " answer" is scored as one word-with-space token sequence."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    return encode(stripped), encode(continuation)


@torch.no_grad()
def loglikelihoods(model, encode: Callable[[str], list[int]], requests: Sequence[tuple[str, str]],
                   max_len: int, batch_size: int = 16, bos: int | None = None, progress: bool = False, *,
                   device: torch.device) -> list[Scored]:
    """Score each (context, continuation) pair of strings with `model` (on `device`); identical
    pairs are computed once."""
    unique = list(dict.fromkeys(requests))
    pairs = []
    for context, continuation in unique:
        ctx, cont = encode_pair(encode, context, continuation)
        pairs.append(([bos, *ctx] if bos is not None else ctx, cont))
    by_request = dict(zip(unique, token_loglikelihoods(model, pairs, max_len, batch_size, progress, device=device),
                          strict=True))
    return [by_request[r] for r in requests]


@torch.no_grad()
def token_loglikelihoods(model, pairs: Sequence[tuple[list[int], list[int]]], max_len: int, batch_size: int = 16,
                         progress: bool = False, *, device: torch.device) -> list[Scored]:
    """Score each (context ids, continuation ids) pair with `model` (on `device`), longest first in
    right-padded batches (the model is causal: padding after a sequence cannot change its scores)."""
    encoded = []
    for ctx, cont in pairs:
        if not cont:
            raise ValueError(f"empty continuation after context {ctx[-8:]}")
        seq = (ctx + cont)[-max_len:]            # cut the context from the left, keep the continuation
        encoded.append((seq, max(len(seq) - len(cont), 1)))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: dict[int, Scored] = {}
    model.eval()
    for b in tqdm(range(0, len(order), batch_size), desc="loglikelihood", disable=not progress, leave=False):
        idx = order[b:b + batch_size]
        width = max(len(encoded[i][0]) for i in idx)
        batch = torch.zeros(len(idx), width, dtype=torch.long)
        for j, i in enumerate(idx):
            batch[j, :len(encoded[i][0])] = torch.tensor(encoded[i][0])
        batch = batch.to(device)
        with autocast(device):
            logits = model(batch).float()
        logp = F.log_softmax(logits, dim=-1)
        for j, i in enumerate(idx):
            seq, start = encoded[i]
            positions = torch.arange(start, len(seq), device=device)
            target = batch[j, positions]
            lp = logp[j, positions - 1].gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((logits[j, positions - 1].argmax(-1) == target).all())
            results[i] = Scored(float(lp.sum()), len(positions), greedy)
    return [results[i] for i in range(len(encoded))]
