"""Math: word problems answered with a number, in GSM8K's schema — GSM8K itself and the project's
arithmetic problems.

An item is ``{"question", "answer"}`` where the answer is a worked rationale ending in ``#### N``.
The project's problems form a ladder of tiers (``TIERS``), from one-digit sums to two-step word
problems, so a tiny model has a rung it can reach and the next one to climb; each item carries its
``tier``. They are made from a seed by templates (each returns the question, the rationale and the
value); the same seed always gives the same problems. An answer is correct when its number (after
``####``, else its last number) equals the reference's, as GSM8K is scored.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from decimal import Context, Decimal, InvalidOperation

from hatchling.errors import ConfigError
from hatchling.tasks.base import Task

# a number starts where no digit or point precedes it (".5" is one half, not 5)
_NUMBER = re.compile(r"(?<![\d.])-?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_FINAL = re.compile(r"####\s*(" + _NUMBER.pattern + ")")

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kira", "Leo", "Maya",
         "Noah", "Olive", "Priya", "Quinn", "Ravi", "Sara", "Tom"]
THINGS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "stamps", "shells", "cards", "coins"]


def extract_answer(text: str) -> str | None:
    """The number after "####", else the last number in the text; None when there is none."""
    final = _FINAL.search(text)
    if final:
        return final.group(1)
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_number(text: str | None) -> str | None:
    """"$1,000.00" -> "1000", "-3.50" -> "-3.5": dollar signs, thousands commas, trailing zeros and
    a sentence's final period do not change the answer."""
    if text is None:
        return None
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return cleaned
    normalized = value.normalize(Context(prec=len(cleaned) + 1))     # exact: the default 28 digits would round
    return format(normalized, "f") if normalized != 0 else "0"


def _sum1(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    question = rng.choice((f"What is {a} + {b}?", f"What is {a} plus {b}?", f"Add {a} and {b}.",
                           f"{name} has {a} {thing} and finds {b} more. How many {thing} does {name} have?"))
    return question, f"{a} + {b} = {a + b}.", a + b


def _sum_diff2(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return rng.choice((f"What is {a} + {b}?", f"Add {a} and {b}.")), f"{a} + {b} = {a + b}.", a + b
    a, b = max(a, b), min(a, b)
    return rng.choice((f"What is {a} - {b}?", f"Subtract {b} from {a}.")), f"{a} - {b} = {a - b}.", a - b


def _add(rng: random.Random) -> tuple[str, str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    return (f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?",
            f"{name} starts with {a} and gets {b} more, so {a} + {b} = {a + b}.", a + b)


def _sub(rng: random.Random) -> tuple[str, str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(10, 90)
    b = rng.randint(1, a - 1)
    return (f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?",
            f"{name} had {a} and gave away {b}, so {a} - {b} = {a - b}.", a - b)


def _mul(rng: random.Random) -> tuple[str, str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return (f"{name} buys {a} boxes with {b} {thing} in each box. How many {thing} is that?",
            f"There are {a} boxes of {b}, so {a} * {b} = {a * b}.", a * b)


def _two_step(rng: random.Random) -> tuple[str, str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, a * b - 1)
    return (f"{name} packs {a} bags with {b} {thing} each, then eats {c}. How many {thing} remain?",
            f"First {a} * {b} = {a * b}. Then {a * b} - {c} = {a * b - c}.", a * b - c)


def _gain_loss(rng: random.Random) -> tuple[str, str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(5, 50), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    return (f"{name} has {a} {thing}, buys {b} more and then gives {c} to a friend. How many {thing} does "
            f"{name} have?", f"First {a} + {b} = {a + b}. Then {a + b} - {c} = {a + b - c}.", a + b - c)


Template = Callable[[random.Random], tuple[str, str, int]]   # generator -> (question, rationale, value)

# tier -> (what it asks, its templates); a tier's problems are drawn from its templates in turn at random
TIERS: dict[int, tuple[str, tuple[Template, ...]]] = {
    1: ("one-digit sums (100 facts; held-out items are unseen wordings)", (_sum1,)),
    2: ("two-digit sums and differences", (_sum_diff2,)),
    3: ("one-step word problems (+, -, x)", (_add, _sub, _mul)),
    4: ("two-step word problems", (_two_step, _gain_loss)),
}


class Math(Task):
    """Items in GSM8K's schema. A base model is prompted in lm-eval's GSM8K format, after the solved
    `shots` (canonical GSM8K records) when given; a chat model is asked the bare question."""

    name = "math"
    stop = ("Question:", "\n\n")
    tiers = TIERS

    def __init__(self, shots: Sequence[dict] = ()):
        self.shots = list(shots)

    def generate(self, per_tier: int, seed: int) -> list[dict]:
        """`per_tier` distinct problems of each tier, each answered with a rationale and ``#### N``; a
        ConfigError when a tier's templates cannot give that many (tier 1 has 20,300 wordings, most of them rare)."""
        items = []
        for tier, (_, templates) in self.tiers.items():
            rng, seen = random.Random(f"{self.name}:{tier}:{seed}"), set()
            for draws in itertools.count():
                if len(seen) == per_tier:
                    break
                if draws == 20 * per_tier + 10_000:
                    raise ConfigError(f"tasks.math_per_tier={per_tier}: tier {tier}'s templates gave only "
                                      f"{len(seen)} distinct problems in {draws} draws; ask for fewer")
                question, rationale, value = rng.choice(templates)(rng)
                if question not in seen:
                    seen.add(question)
                    items.append({"kind": self.name, "tier": tier, "question": question,
                                  "answer": f"{rationale}\n#### {value}"})
        return items

    def key(self, item: dict) -> str:
        return item["question"]

    def text(self, item: dict) -> str:
        return f"{item['question']} {item['answer']}"

    def question(self, item: dict) -> str:
        return item["question"]

    def answer(self, item: dict) -> str:
        return item["answer"]

    def prompt(self, item: dict) -> str:
        """lm-eval's format: "Question: ...\\nAnswer: ..." blocks, then the question to answer."""
        fewshot = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in self.shots)
        return f"{fewshot}Question: {item['question']}\nAnswer:"

    def score(self, item: dict, completion: str) -> bool:
        gold = normalize_number(extract_answer(item["answer"]))
        return gold is not None and normalize_number(extract_answer(completion)) == gold

    def chance(self, items: list[dict]) -> float:
        """The exact match of a model that gives every item one answer, the most common gold one: what a
        score must pass to show more than a guess (of one-digit sums, one in ten or so share an answer)."""
        golds = Counter(normalize_number(extract_answer(item["answer"])) for item in items)
        golds.pop(None, None)                        # an item without a number is matched by no answer
        return max(golds.values()) / len(items) if golds else 0.0

    def well_formed(self, item: dict, completion: str) -> bool:
        """The answer is marked: a number follows the last ``####``."""
        return "####" in completion and extract_answer(completion.split("####")[-1]) is not None
