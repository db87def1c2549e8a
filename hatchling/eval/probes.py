"""Synthetic long-range probes: palindrome, stack and needle-in-a-haystack items, and their score.

Each probe is a token sequence with the positions the model must predict (``targets``); the score
(:func:`probe_accuracy`) is the fraction of target tokens the model gets right by argmax,
teacher-forced, in one forward pass.

- palindrome: a random string, a separator, then the string reversed (every reversed token a target)
- stack: pushes (a symbol) and pops (a pop marker followed by the popped symbol, the target), LIFO
- needle: a sentence holding a number, hidden at a random depth of real held-out text, then the
  question; the number's tokens are targets

`length` is the number of symbols (palindrome, stack ops) or of context tokens (needle): the
distance over which the model must carry information. The probe bench (hatchling/eval/probe_bench.py)
trains fresh models on palindrome, stack and its MQAR; the eval stage scores the needle.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from hatchling.errors import ConfigError
from hatchling.model.device import autocast


@dataclass(frozen=True)
class ProbeItem:
    tokens: list[int]
    targets: list[int]      # positions t whose token the model must predict from tokens[:t]


@dataclass(frozen=True)
class Alphabet:
    symbols: list[int]      # the token ids items draw their symbols from
    sep: int
    pop: int


def palindrome(rng: random.Random, a: Alphabet, length: int) -> ProbeItem:
    s = [rng.choice(a.symbols) for _ in range(length)]
    tokens = s + [a.sep] + s[::-1]
    return ProbeItem(tokens, list(range(length + 1, len(tokens))))


def stack(rng: random.Random, a: Alphabet, length: int) -> ProbeItem:
    tokens, targets, held = [], [], []
    for i in range(length):
        must_pop = len(held) >= length - i          # pop everything before the end
        if held and (must_pop or rng.random() < 0.4):
            tokens += [a.pop, held.pop()]
            targets.append(len(tokens) - 1)
        else:
            held.append(rng.choice(a.symbols))
            tokens.append(held[-1])
    return ProbeItem(tokens, targets)


def needle(rng: random.Random, tokenizer, haystack: list[int], length: int) -> ProbeItem:
    number = str(rng.randrange(1000, 10000))
    fact = tokenizer.encode(f" The secret number is {number}. ").ids
    question = tokenizer.encode(" What is the secret number? The secret number is").ids
    answer = tokenizer.encode(f" {number}").ids
    room = length - len(fact) - len(question) - len(answer)
    if room < 1:
        raise ConfigError(f"eval.needle_lengths: {length} tokens is too short for the needle, the question and the "
                          f"answer ({length - room + 1} tokens at least with this tokenizer)")
    start = rng.randrange(0, max(1, len(haystack) - room))
    filler = haystack[start:start + room]
    depth = rng.randrange(0, len(filler) + 1)
    tokens = filler[:depth] + fact + filler[depth:] + question + answer
    return ProbeItem(tokens, list(range(len(tokens) - len(answer), len(tokens))))


@torch.no_grad()
def probe_accuracy(model, items: list[ProbeItem], batch_size: int = 16, memorizer=None, *,
                   device: torch.device) -> float:
    """Fraction of target tokens predicted exactly (argmax, teacher-forced) by `model` on `device`.
    With a memorizer (hatchling/eval/continual.py) each item's tokens before its first target are
    memorized first."""
    if memorizer is not None:
        hits = []
        for it in items:
            memorizer(it.tokens[:min(it.targets)])
            hits.append(probe_accuracy(model, [it], device=device) * len(it.targets))
        memorizer.restore()
        return sum(hits) / max(sum(len(it.targets) for it in items), 1)
    correct = total = 0
    model.eval()
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        width = max(len(it.tokens) for it in chunk)
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, it in enumerate(chunk):
            batch[i, :len(it.tokens)] = torch.tensor(it.tokens)
        batch = batch.to(device)
        with autocast(device):
            pred = model(batch).argmax(-1)
        for i, it in enumerate(chunk):
            t = torch.tensor(it.targets, device=device)
            correct += int((pred[i, t - 1] == batch[i, t]).sum())
            total += len(it.targets)
    return correct / max(total, 1)
