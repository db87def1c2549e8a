"""Synthetic long-range probes: palindrome, MQAR, stack, and needle-in-a-haystack.

Each probe is a token sequence with the positions the model must predict (``targets``); the score
is the fraction of target tokens the model gets right by argmax, teacher-forced, in one forward
pass. Sequences are seeded, so two evaluations see the same items. The symbols are single-byte
tokens of the model's own tokenizer (letters and digits), so the probes run on any checkpoint.

- palindrome: a random string, a separator, then the string reversed (every reversed token a target)
- MQAR (multi-query associative recall): key-value pairs, a separator, then keys again, each
  followed by its value (values are targets), as in Zoology (Arora et al., 2023); optionally spread
  over a span of filler, as there
- stack: pushes (a symbol) and pops (a pop marker followed by the popped symbol, the target), LIFO
- needle: a sentence holding a number, hidden at a random depth of real held-out text, then the
  question; the number's tokens are targets

`length` is the number of symbols (palindrome, stack ops), of pairs (MQAR), or of context tokens
(needle): the distance over which the model must carry information.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import torch

from hatchling.model.device import autocast


@dataclass(frozen=True)
class ProbeItem:
    tokens: list[int]
    targets: list[int]      # positions t whose token the model must predict from tokens[:t]


@dataclass(frozen=True)
class Alphabet:
    symbols: list[int]      # ids of single-character tokens
    sep: int
    pop: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> Alphabet:
        def single(ch: str) -> int:
            ids = tokenizer.encode(ch).ids
            if len(ids) != 1:
                raise ValueError(f"the tokenizer has no single token for {ch!r}")
            return ids[0]

        return cls([single(c) for c in string.ascii_lowercase + string.digits], single("|"), single("^"))


def palindrome(rng: random.Random, a: Alphabet, length: int) -> ProbeItem:
    s = [rng.choice(a.symbols) for _ in range(length)]
    tokens = s + [a.sep] + s[::-1]
    return ProbeItem(tokens, list(range(length + 1, len(tokens))))


def mqar(rng: random.Random, a: Alphabet, length: int, queries: int = 4, span: int | None = None) -> ProbeItem:
    """With `span`, the queries sit in random two-token slots of `span` tokens after the separator and
    the separator fills the rest (Zoology's form: the distance to each answer varies); without, they
    follow one another."""
    half = len(a.symbols) // 2
    keys = rng.sample(a.symbols[:half], min(length, half)) if length <= half else \
        [rng.choice(a.symbols[:half]) for _ in range(length)]
    pairs = {}
    for k in keys:          # a repeated key is rebound: its latest value is the answer
        pairs[k] = rng.choice(a.symbols[half:])
    tokens = [t for k in keys for t in (k, pairs[k])] + [a.sep]
    asked = rng.sample(list(pairs), min(queries, len(pairs)))
    n_slots = len(asked) if span is None else span // 2
    if n_slots < len(asked):
        raise ValueError(f"mqar: {len(asked)} queries do not fit in a span of {span} tokens")
    slots = range(len(asked)) if span is None else sorted(rng.sample(range(n_slots), len(asked)))
    body = [a.sep] * (2 * n_slots)
    for k, slot in zip(asked, slots, strict=True):
        body[2 * slot:2 * slot + 2] = [k, pairs[k]]
    targets = [len(tokens) + 2 * slot + 1 for slot in slots]
    return ProbeItem(tokens + body, targets)


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
        raise ValueError(f"needle length {length} is too short for the needle and the question")
    start = rng.randrange(0, max(1, len(haystack) - room))
    filler = haystack[start:start + room]
    depth = rng.randrange(0, len(filler) + 1)
    tokens = filler[:depth] + fact + filler[depth:] + question + answer
    return ProbeItem(tokens, list(range(len(tokens) - len(answer), len(tokens))))


PROBES = ("palindrome", "mqar", "stack")


def make_items(name: str, length: int, n: int, seed: int, alphabet: Alphabet) -> list[ProbeItem]:
    rng = random.Random(f"{name}:{length}:{seed}")
    make = {"palindrome": palindrome, "mqar": mqar, "stack": stack}[name]
    return [make(rng, alphabet, length) for _ in range(n)]


def chance(name: str, alphabet: Alphabet) -> float:
    return 1 / (len(alphabet.symbols) // 2) if name == "mqar" else 1 / len(alphabet.symbols)


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
