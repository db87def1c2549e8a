"""Generation tasks: GSM8K (answer extraction, exact match) and HumanEval (sandboxed tests, pass@k)."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from hatchling.sandbox import run_python

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"####\s*(" + _NUMBER.pattern + ")")

GSM8K_STOP = ("Question:", "\n\n")
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def gsm8k_prompt(question: str, shots: list[dict] = ()) -> str:
    """lm-eval's format: "Question: ...\\nAnswer: ..." blocks, then the question to answer."""
    fewshot = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return f"{fewshot}Question: {question}\nAnswer:"


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
    normalized = value.normalize()
    return format(normalized, "f") if normalized != 0 else "0"


def gsm8k_correct(generated: str, reference_answer: str) -> bool:
    gold = normalize_number(extract_answer(reference_answer))
    return gold is not None and normalize_number(extract_answer(generated)) == gold


def humaneval_passes(problem: dict, completion: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    """(passed, sandbox status) of prompt + completion against the problem's own tests."""
    tests = f"{problem['test']}\ncheck({problem['entry_point']})\n"
    result = run_python(problem["prompt"] + completion, tests, timeout_s=timeout_s)
    return result.passed, result.status


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
