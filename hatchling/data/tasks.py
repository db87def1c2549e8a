"""Verifiable tasks made by the project: arithmetic word problems and small Python functions.

Every item carries what a verifier needs — the number after ``####``, or unit tests and the name
of the function — so the same items serve SFT (with worked solutions), RLVR (rewards) and eval
(held-out split, which the contamination check also guards). Items are generated from a seed:
the same seed always gives the same items, and the held-out split is disjoint from train by
construction (split on the item's text hash, so the same problem never lands on both sides).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kira", "Leo", "Maya",
         "Noah", "Olive", "Priya", "Quinn", "Ravi", "Sara", "Tom"]
THINGS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "stamps", "shells", "cards", "coins"]


def _math_add(rng: random.Random) -> tuple[str, str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    return (f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?",
            f"{name} starts with {a} and gets {b} more, so {a} + {b} = {a + b}.", a + b)


def _math_sub(rng: random.Random) -> tuple[str, str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(10, 90)
    b = rng.randint(1, a - 1)
    return (f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?",
            f"{name} had {a} and gave away {b}, so {a} - {b} = {a - b}.", a - b)


def _math_mul(rng: random.Random) -> tuple[str, str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return (f"{name} buys {a} boxes with {b} {thing} in each box. How many {thing} is that?",
            f"There are {a} boxes of {b}, so {a} * {b} = {a * b}.", a * b)


def _math_two_step(rng: random.Random) -> tuple[str, str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, a * b - 1)
    return (f"{name} packs {a} bags with {b} {thing} each, then eats {c}. How many {thing} remain?",
            f"First {a} * {b} = {a * b}. Then {a * b} - {c} = {a * b - c}.", a * b - c)


MATH_TEMPLATES: list[Callable[[random.Random], tuple[str, str, int]]] = [_math_add, _math_sub, _math_mul,
                                                                         _math_two_step]

# (name, signature, description, body, [(args, expected)] generator)
CODE_TEMPLATES = [
    ("add_{n}", "x", "returns x plus {n}", "return x + {n}", lambda n: [(v, v + n) for v in (0, 3, -5, 10)]),
    ("times_{n}", "x", "returns x multiplied by {n}", "return x * {n}", lambda n: [(v, v * n) for v in (0, 2, -3, 7)]),
    ("is_multiple_of_{n}", "x", "returns True when x is divisible by {n}", "return x % {n} == 0",
     lambda n: [(v, v % n == 0) for v in (0, n, n + 1, 3 * n, 2 * n - 1)]),
    ("first_{n}", "items", "returns the first {n} elements of the list items", "return items[:{n}]",
     lambda n: [(list(range(10)), list(range(10))[:n]), ([], []), ([7], [7][:n])]),
    ("repeat_{n}", "s", "returns the string s repeated {n} times", "return s * {n}",
     lambda n: [("ab", "ab" * n), ("", ""), ("x", "x" * n)]),
    ("count_above_{n}", "items", "returns how many numbers in items are greater than {n}",
     "return sum(1 for v in items if v > {n})",
     lambda n: [([n - 1, n, n + 1, n + 5], 2), ([], 0), ([n + 2] * 3, 3)]),
]


CODE_INSTRUCTION = "Complete this Python function.\n"


def _split(text: str, heldout_fraction: float) -> str:
    bucket = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if bucket < heldout_fraction else "train"


def math_items(n: int, seed: int) -> list[dict]:
    """Arithmetic word problems in GSM8K's schema (question, answer with a rationale and #### N)."""
    rng = random.Random(f"math:{seed}")
    items, seen = [], set()
    while len(items) < n:
        question, rationale, value = rng.choice(MATH_TEMPLATES)(rng)
        if question not in seen:
            seen.add(question)
            items.append({"kind": "math", "question": question, "answer": f"{rationale}\n#### {value}"})
    return items


def code_items(seed: int) -> list[dict]:
    """Small Python functions in HumanEval's schema (prompt, canonical_solution, test, entry_point)."""
    rng = random.Random(f"code:{seed}")
    items = []
    for name, arg, description, body, cases in CODE_TEMPLATES:
        for n in rng.sample(range(2, 10), 6):
            entry = name.format(n=n)
            prompt = f'def {entry}({arg}):\n    """{description.format(n=n)}."""\n'
            test = "def check(candidate):\n" + "".join(
                f"    assert candidate({args!r}) == {expected!r}\n" for args, expected in cases(n))
            items.append({"kind": "code", "task_id": f"hatchling/{entry}", "prompt": prompt,
                          "canonical_solution": f"    {body.format(n=n)}\n", "test": test, "entry_point": entry})
    return items


def split_items(items: list[dict], heldout_fraction: float) -> tuple[list[dict], list[dict]]:
    train, heldout = [], []
    for item in items:
        key = item.get("question") or item["prompt"]
        (heldout if _split(key, heldout_fraction) == "heldout" else train).append(item)
    return train, heldout


def to_messages(item: dict) -> dict:
    """The chat form of an item for SFT: the user asks, the assistant answers as a verifier expects."""
    if item["kind"] == "math":
        return {"messages": [{"role": "user", "content": item["question"]},
                             {"role": "assistant", "content": item["answer"]}]}
    return {"messages": [{"role": "user", "content": CODE_INSTRUCTION + item["prompt"]},
                         {"role": "assistant", "content": item["prompt"] + item["canonical_solution"]}]}


def docs_qa(docs: list[dict], limit: int) -> list[dict]:
    """Question/answer chats derived from crawled documents: a page's title asks what it covers, and
    its opening sentences answer. Real text, so SFT keeps the model's prose anchored in the corpus."""
    out = []
    for doc in docs:
        lines = [ln.strip() for ln in doc["text"].splitlines() if ln.strip()]
        if len(lines) < 2:
            continue
        title = lines[0].rstrip("¶").strip()
        sentences = " ".join(lines[1:4]).split(". ")
        answer = ". ".join(sentences[:2]).strip()
        if len(title) < 3 or len(answer) < 40:
            continue
        out.append({"messages": [{"role": "user", "content": f"What does the page \"{title}\" cover?"},
                                 {"role": "assistant", "content": answer if answer.endswith(".") else answer + "."}]})
        if len(out) >= limit:
            break
    return out
