"""Code: Python functions written from a signature and docstring, in HumanEval's schema — HumanEval
itself and the project's small functions.

An item is ``{"task_id", "prompt", "canonical_solution", "test", "entry_point"}``: the prompt is
the function's signature and docstring, the test defines ``check(candidate)``. An answer is correct
when prompt + answer passes the item's own tests in the sandbox (hatchling/sandbox.py). The
project's functions are made from a seed by templates, each with its unit tests.
"""

from __future__ import annotations

import ast
import math
import random

from hatchling.sandbox import Result, run_python
from hatchling.tasks.base import Task

# A template: (name, argument, description, body, n -> [(argument, expected)]), one function per n.
# Bodies may span lines ("\n" + 4 spaces per level); arguments are one value, or () for none.
CONSTANTS = (
    ("get_{n}", "", "returns the number {n}", "return {n}", lambda n: [((), n)]),
    ("answer_{n}", "", "returns {n}", "return {n}", lambda n: [((), n)]),
    ("word_{n}", "", "returns the string 'n{n}'", "return 'n{n}'", lambda n: [((), f"n{n}")]),
)
EXPRESSIONS = (
    ("add_{n}", "x", "returns x plus {n}", "return x + {n}", lambda n: [(v, v + n) for v in (0, 3, -5, 10)]),
    ("times_{n}", "x", "returns x multiplied by {n}", "return x * {n}", lambda n: [(v, v * n) for v in (0, 2, -3, 7)]),
    ("is_multiple_of_{n}", "x", "returns True when x is divisible by {n}", "return x % {n} == 0",
     lambda n: [(v, v % n == 0) for v in (0, n, n + 1, 3 * n, 2 * n - 1)]),
    ("first_{n}", "items", "returns the first {n} elements of the list items", "return items[:{n}]",
     lambda n: [(list(range(12)), list(range(12))[:n]), ([], []), ([7], [7][:n])]),
    ("repeat_{n}", "s", "returns the string s repeated {n} times", "return s * {n}",
     lambda n: [("ab", "ab" * n), ("", ""), ("x", "x" * n)]),
)
LOOPS = (
    ("count_above_{n}", "items", "returns how many numbers in items are greater than {n}",
     "total = 0\n    for v in items:\n        if v > {n}:\n            total += 1\n    return total",
     lambda n: [([n - 1, n, n + 1, n + 5], 2), ([], 0), ([n + 2] * 3, 3)]),
    ("sum_times_{n}", "items", "returns the sum of the numbers in items, each multiplied by {n}",
     "total = 0\n    for v in items:\n        total += v * {n}\n    return total",
     lambda n: [([1, 2, 3], 6 * n), ([], 0), ([-4, 4, 5], 5 * n)]),
    ("multiples_of_{n}", "limit", "returns the list of the multiples of {n} from 0 up to but not including limit",
     "out = []\n    for v in range(0, limit, {n}):\n        out.append(v)\n    return out",
     lambda n: [(0, []), (1, [0]), (4 * n + 1, [0, n, 2 * n, 3 * n, 4 * n])]),
)
# tier -> (what it asks, its templates)
TIERS = {
    1: ("return a constant", CONSTANTS),
    2: ("one-line expressions", EXPRESSIONS),
    3: ("loops", LOOPS),
}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


class Code(Task):
    """Items in HumanEval's schema. A base model continues the prompt (HumanEval's format, zero-shot)
    with the function's body; a chat model is asked, after an instruction, for the whole function.
    Each answer runs in the sandbox for at most `timeout_s` seconds."""

    name = "code"
    stop = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
    instruction = "Complete this Python function.\n"
    tiers = TIERS

    def __init__(self, timeout_s: float = 5.0):
        self.timeout_s = timeout_s

    def generate(self, per_template: int, seed: int) -> list[dict]:
        """`per_template` functions per template of each tier (n drawn from 2..99 without repeats),
        each with a docstring, a solution and unit tests."""
        items = []
        for tier, (_, templates) in self.tiers.items():
            rng = random.Random(f"{self.name}:{tier}:{seed}")
            for name, arg, description, body, cases in templates:
                for n in rng.sample(range(2, 100), per_template):
                    entry = name.format(n=n)
                    prompt = f'def {entry}({arg}):\n    """{description.format(n=n)}."""\n'
                    test = "def check(candidate):\n" + "".join(
                        f"    assert candidate({'' if args == () else repr(args)}) == {expected!r}\n"
                        for args, expected in cases(n))
                    items.append({"kind": self.name, "tier": tier, "task_id": f"hatchling/{entry}", "prompt": prompt,
                                  "canonical_solution": f"    {body.format(n=n)}\n", "test": test,
                                  "entry_point": entry})
        return items

    def key(self, item: dict) -> str:
        return item["prompt"]

    def text(self, item: dict) -> str:
        return item["prompt"] + item["canonical_solution"]

    def question(self, item: dict) -> str:
        return self.instruction + item["prompt"]

    def answer(self, item: dict) -> str:
        return item["prompt"] + item["canonical_solution"]

    def prompt(self, item: dict) -> str:
        return item["prompt"]

    def execute(self, item: dict, completion: str) -> Result:
        """The sandbox's result of prompt + completion against the item's own tests."""
        tests = f"{item['test']}\ncheck({item['entry_point']})\n"
        return run_python(item["prompt"] + completion, tests, timeout_s=self.timeout_s)

    def score(self, item: dict, completion: str) -> bool:
        return self.execute(item, completion).passed

    def well_formed(self, item: dict, completion: str) -> bool:
        """The completion parses as Python."""
        try:
            ast.parse(completion)
        except SyntaxError:
            return False
        return True
