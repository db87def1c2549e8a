"""Eval task definitions, in the prompt formats of lm-evaluation-harness so numbers compare.

A multiple-choice task is data, not code: how to read the context, the choices and the gold index
from one record of its public schema. Each choice is scored by the log-likelihood of its
continuation; ``acc`` picks the highest sum, ``acc_norm`` the highest sum per character of the
choice (lm-eval's convention: the " " delimiter is not counted).
WinoGrande uses *partial* scoring: each option fills the blank of the context, and the shared rest
of the sentence is the scored continuation. GSM8K and HumanEval are generation tasks (gsm8k.py,
humaneval.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from hatchling.errors import InputError


@dataclass(frozen=True)
class MultipleChoice:
    name: str
    requests: Callable[[dict], list[tuple[str, str]]]   # record -> [(context, continuation)] per choice
    gold: Callable[[dict], int]
    norm: bool = True                                    # report acc_norm beside acc


def _same_context(context: Callable[[dict], str], choices: Callable[[dict], list[str]]):
    return lambda d: [(context(d), " " + str(c)) for c in choices(d)]


def _labelled_choices(d: dict) -> tuple[list[str], list[str]]:
    """(labels, texts) of ARC-style choices: {"label": [...], "text": [...]} or [{"label", "text"}]."""
    c = d["choices"]
    if isinstance(c, dict):
        return list(c["label"]), list(c["text"])
    return [x["label"] for x in c], [x["text"] for x in c]


def _answer_key(d: dict) -> int:
    labels, _ = _labelled_choices(d)
    key = str(d["answerKey"]).strip()
    if key not in labels:
        raise InputError(f"answerKey {key!r} is not one of the labels {labels}")
    return labels.index(key)


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: WikiHow "[title]" markers and bracketed tags removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_context(d: dict) -> str:
    ctx = f"{d['ctx_a']} {d['ctx_b'].capitalize()}" if "ctx_a" in d else d["ctx"]
    label = d.get("activity_label")
    return hellaswag_clean(f"{label}: {ctx}" if label else ctx)


def _winogrande_requests(d: dict) -> list[tuple[str, str]]:
    blank = d["sentence"].index("_")
    rest = " " + d["sentence"][blank + 1:].strip()
    return [(d["sentence"][:blank] + d[f"option{i}"], rest) for i in (1, 2)]


def _boolq_gold(d: dict) -> int:
    value = d["label"] if "label" in d else d["answer"]
    return int(value in (True, 1, "true", "True", "yes"))


_ARC = dict(requests=_same_context(lambda d: f"Question: {d['question']}\nAnswer:", lambda d: _labelled_choices(d)[1]),
            gold=_answer_key)

MULTIPLE_CHOICE = {t.name: t for t in (
    MultipleChoice("arc_easy", **_ARC),
    MultipleChoice("arc_challenge", **_ARC),
    MultipleChoice("openbookqa", _same_context(lambda d: d["question_stem"], lambda d: _labelled_choices(d)[1]),
                   _answer_key),
    MultipleChoice("commonsense_qa", **_ARC),
    MultipleChoice("hellaswag", _same_context(_hellaswag_context,
                                              lambda d: [hellaswag_clean(e) for e in d["endings"]]),
                   lambda d: int(d["label"])),
    MultipleChoice("piqa", _same_context(lambda d: f"Question: {d['goal']}\nAnswer:", lambda d: [d["sol1"], d["sol2"]]),
                   lambda d: int(d["label"])),
    MultipleChoice("boolq", _same_context(lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
                                          lambda d: ["no", "yes"]), _boolq_gold),
    MultipleChoice("siqa", _same_context(lambda d: f"Q: {d['context']} {d['question']}\nA:",
                                         lambda d: [d["answerA"], d["answerB"], d["answerC"]]),
                   lambda d: int(d["label"]) - 1),
    MultipleChoice("winogrande", _winogrande_requests, lambda d: int(d["answer"]) - 1, norm=False),
)}
