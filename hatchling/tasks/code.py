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

# (name, argument, description, body, n -> [(argument, expected)]): one function per n
TEMPLATES = (
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
)


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
    templates = TEMPLATES
    variants = 6                # functions per template, each with its own n

    def __init__(self, timeout_s: float = 5.0):
        self.timeout_s = timeout_s

    def generate(self, seed: int) -> list[dict]:
        """`variants` functions per template, each with a docstring, a solution and unit tests."""
        rng = random.Random(f"{self.name}:{seed}")
        items = []
        for name, arg, description, body, cases in self.templates:
            for n in rng.sample(range(2, 10), self.variants):
                entry = name.format(n=n)
                prompt = f'def {entry}({arg}):\n    """{description.format(n=n)}."""\n'
                test = "def check(candidate):\n" + "".join(
                    f"    assert candidate({args!r}) == {expected!r}\n" for args, expected in cases(n))
                items.append({"kind": self.name, "task_id": f"hatchling/{entry}", "prompt": prompt,
                              "canonical_solution": f"    {body.format(n=n)}\n", "test": test, "entry_point": entry})
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
