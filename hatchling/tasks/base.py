"""What a verifiable task family provides, in the manner of nanochat's task classes.

A family reads items in one benchmark's public schema (GSM8K's for math, HumanEval's for code),
whether a benchmark's own or made by the project (``generate``). It knows how an item is asked —
as a chat question or as a base-model prompt — what the reference answer is, and how an answer is
judged: ``score`` is both the eval's metric and RLVR's verifier, and ``reward`` adds the format
bonus. The tasks stage, RLVR and the eval all go through it, so the three cannot drift apart.

Multiple-choice benchmarks are scored by log-likelihood, not by judging an answer:
hatchling/tasks/multiple_choice.py holds their request formats.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod


class Task(ABC):
    """A family of items with a checkable answer. Subclasses set `name` and `stop` and define how
    an item is keyed, asked, answered and judged."""

    name: str                   # the family, the `kind` of the items it makes: data/tasks/{name}_{split}.jsonl
    stop: tuple[str, ...]       # where a base model's answer to `prompt` ends

    @abstractmethod
    def key(self, item: dict) -> str:
        """The text that names an item: its hash decides the item's split."""

    @abstractmethod
    def text(self, item: dict) -> str:
        """The item's whole text, asked and answered, as the contamination check scans it."""

    @abstractmethod
    def question(self, item: dict) -> str:
        """The user turn that asks a chat model the item."""

    @abstractmethod
    def answer(self, item: dict) -> str:
        """The reference assistant turn: what SFT teaches, and an answer `score` accepts."""

    @abstractmethod
    def prompt(self, item: dict) -> str:
        """The text a base model continues with its answer (lm-eval's format)."""

    @abstractmethod
    def score(self, item: dict, completion: str) -> bool:
        """Whether the completion answers the item correctly: the eval's metric and RLVR's verifier."""

    @abstractmethod
    def well_formed(self, item: dict, completion: str) -> bool:
        """Whether the completion has the form an answer must have, right or wrong."""

    def reward(self, item: dict, completion: str, format_bonus: float) -> float:
        """RLVR's reward: 1 for a correct answer, plus `format_bonus` for a well-formed one."""
        return float(self.score(item, completion)) + format_bonus * self.well_formed(item, completion)

    def messages(self, item: dict) -> dict:
        """The item as a chat for SFT: the user asks, the assistant answers as the verifier expects."""
        return {"messages": [{"role": "user", "content": self.question(item)},
                             {"role": "assistant", "content": self.answer(item)}]}

    def split(self, items: list[dict], heldout_fraction: float) -> tuple[list[dict], list[dict]]:
        """(train, held-out): an item is held out when the hash of its key falls in the first
        `heldout_fraction` of the range, so the same problem never lands on both sides."""
        train, heldout = [], []
        for item in items:
            bucket = int(hashlib.sha1(self.key(item).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            (heldout if bucket < heldout_fraction else train).append(item)
        return train, heldout


def by_tier(items: list[dict]) -> dict[int | None, list[dict]]:
    """Items of the project's task ladder grouped by their `tier`, lowest first ({None: items} for a
    set without tiers), each group in its original order."""
    out: dict[int | None, list[dict]] = {}
    for item in items:
        out.setdefault(item.get("tier"), []).append(item)
    return dict(sorted(out.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))
