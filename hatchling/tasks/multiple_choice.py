"""Multiple-choice benchmarks (ARC, OpenBookQA, CommonsenseQA, HellaSwag, PIQA, BoolQ, SIQA,
WinoGrande), in the prompt formats of lm-evaluation-harness so numbers compare.

A multiple-choice task is data, not code: how to read the context and the choices from one
canonical record (every accepted form of a benchmark's file is read into one by
hatchling.data.benchmarks, which also gives the gold index as ``label``). Each choice is scored by
the log-likelihood of its continuation; ``acc`` picks the highest sum, ``acc_norm`` the highest sum per character of the
choice (lm-eval's convention: the " " delimiter is not counted).
WinoGrande uses *partial* scoring: each option fills the blank of the context, and the shared rest
of the sentence is the scored continuation. GSM8K and HumanEval are generation tasks (math.py, code.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class MultipleChoice:
    """A task over canonical records (hatchling.data.benchmarks): the gold choice is `record["label"]`."""

    name: str
    requests: Callable[[dict], list[tuple[str, str]]]   # record -> [(context, continuation)] per choice
    norm: bool = True                                    # report acc_norm beside acc

    @staticmethod
    def gold(record: dict) -> int:
        return record["label"]


def _same_context(context: Callable[[dict], str], choices: Callable[[dict], list[str]]):
    return lambda d: [(context(d), " " + str(c)) for c in choices(d)]


def _winogrande_requests(d: dict) -> list[tuple[str, str]]:
    blank = d["sentence"].index("_")
    rest = " " + d["sentence"][blank + 1:].strip()
    return [(d["sentence"][:blank] + d[f"option{i}"], rest) for i in (1, 2)]


_ARC = _same_context(lambda d: f"Question: {d['question']}\nAnswer:", lambda d: d["choices"])

MULTIPLE_CHOICE = {t.name: t for t in (
    MultipleChoice("arc_easy", _ARC),
    MultipleChoice("arc_challenge", _ARC),
    MultipleChoice("openbookqa", _same_context(lambda d: d["question"], lambda d: d["choices"])),
    MultipleChoice("commonsense_qa", _ARC),
    MultipleChoice("hellaswag", _same_context(lambda d: d["query"], lambda d: d["endings"])),
    MultipleChoice("piqa", _same_context(lambda d: f"Question: {d['goal']}\nAnswer:",
                                         lambda d: [d["sol1"], d["sol2"]])),
    MultipleChoice("boolq", _same_context(lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
                                          lambda d: ["no", "yes"])),
    MultipleChoice("siqa", _same_context(lambda d: f"Q: {d['context']} {d['question']}\nA:", lambda d: d["answers"])),
    MultipleChoice("winogrande", _winogrande_requests, norm=False),
)}
