"""Evaluate one checkpoint on every task whose data is present: rows of (task, metric, value, n,
chance, stderr), and probe accuracy by length; every pass on the device the model was loaded on."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from hatchling.data.benchmarks import SCHEMAS
from hatchling.data.chat import render_chat, stop_ids
from hatchling.data.tokenizer import EOT, document_ids
from hatchling.errors import ConfigError
from hatchling.eval.continual import Memorizer
from hatchling.eval.probes import needle, probe_accuracy
from hatchling.eval.scoring import loglikelihoods
from hatchling.inference import generate_text, generate_texts
from hatchling.stats import Z95, wilson_interval
from hatchling.tasks.base import Task, by_tier
from hatchling.tasks.code import Code, pass_at_k
from hatchling.tasks.math import Math
from hatchling.tasks.multiple_choice import MULTIPLE_CHOICE, MultipleChoice


@dataclass
class Row:
    task: str
    metric: str
    value: float
    n: int
    chance: float
    stderr: float
    ci: tuple[float, float]         # 95% interval: Wilson's for a proportion, else mean ± 1.96 stderr
    ids: tuple[str, ...] = ()       # the items scored, in order (for clean-subset scores)
    values: tuple[float, ...] = ()  # each item's score
    tier: int | None = None         # the ladder's tier (the project's tiered task sets)

    @property
    def at_chance(self) -> bool:
        """Whether chance lies within the score's 95% interval."""
        return self.ci[0] <= self.chance <= self.ci[1]

    @property
    def below_chance(self) -> bool:
        """Whether the score's 95% interval lies below chance: a systematic preference, not knowledge."""
        return self.ci[1] < self.chance


def mean_row(task: str, metric: str, values: list[float], chance: float, ids: list[str] = ()) -> Row:
    """Mean, its standard error (sample std / sqrt(n), as lm-eval reports it) and 95% interval."""
    n = len(values)
    mean = float(np.mean(values)) if n else float("nan")
    stderr = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    if all(v in (0.0, 1.0) for v in values):
        ci = wilson_interval(sum(values), n)
    else:
        half = Z95 * (0.0 if math.isnan(stderr) else stderr)
        ci = (max(0.0, mean - half), min(1.0, mean + half))
    return Row(task, metric, mean, n, chance, stderr, ci, tuple(ids), tuple(values))


class Evaluator:
    """A model on `device` and its tokenizer, with the scoring settings of params.eval. A chat model
    (SFT, RL) gets generation prompts as a user turn of the chat template and answers until <|end|>;
    log-likelihood tasks score it exactly like a base model."""

    def __init__(self, model, tokenizer, cfg, *, device: torch.device, chat: bool = False):
        self.model, self.tokenizer, self.cfg, self.chat, self.device = model, tokenizer, cfg, chat, device
        self.bos = tokenizer.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def answer(self, task: Task, item: dict, max_new_tokens: int, temperature: float = 0.0,
               seed: int | None = None) -> str:
        """The model's answer to a generation item: a chat model is asked the task's question, a base
        model continues the task's prompt up to its stop strings or the end of its document (<|endoftext|>:
        what follows would be the next document, not the answer)."""
        ids = self.prompt_ids(task, item)
        return generate_text(self.model, ids, max_new_tokens, self.decode, () if self.chat else task.stop,
                             self.cfg.max_len, temperature, seed, self.stop_ids(), device=self.device)

    def stop_ids(self) -> tuple[int, ...]:
        """The tokens that end an answer: a chat model's end of turn (and of text), a base model's end of text."""
        return stop_ids(self.tokenizer) if self.chat else (self.bos,)

    def prompt_ids(self, task: Task, item: dict) -> list[int]:
        """A chat model is asked the task's question as a user turn; a base model gets the task's prompt."""
        if self.chat:
            return render_chat(self.tokenizer, [{"role": "user", "content": task.question(item)}],
                               add_generation_prompt=True)
        return document_ids(self.tokenizer, task.prompt(item))

    def answers(self, task: Task, items: list[dict], max_new_tokens: int) -> list[str]:
        """Greedy answers to many items, batched (each equal to `answer` at temperature 0)."""
        return generate_texts(self.model, [self.prompt_ids(task, x) for x in items], max_new_tokens, self.decode,
                              () if self.chat else task.stop, self.cfg.max_len, self.stop_ids(), self.cfg.batch_size,
                              device=self.device)

    def multiple_choice(self, task: MultipleChoice, records: list[dict], memorizer: Memorizer | None = None,
                        suffix: str = "") -> list[Row]:
        """acc (and acc_norm) rows; with a memorizer, each item's context is memorized before its
        choices are scored (one item at a time) and the metrics get `suffix`."""
        per_doc = [task.requests(d) for d in records]
        if memorizer is None:
            flat = [r for reqs in per_doc for r in reqs]
            scores = iter(loglikelihoods(self.model, self.encode, flat, self.cfg.max_len, self.cfg.batch_size,
                                         self.bos, self.cfg.progress, device=self.device))
        else:
            scored = []
            for reqs in per_doc:
                # what every choice's context shares: WinoGrande's contexts end with their own option
                memorizer([self.bos, *self.encode(os.path.commonprefix([context for context, _ in reqs]))])
                scored += loglikelihoods(self.model, self.encode, reqs, self.cfg.max_len, self.cfg.batch_size,
                                         self.bos, device=self.device)
            memorizer.restore()
            scores = iter(scored)
        acc, acc_norm, chances = [], [], []
        for d, reqs in zip(records, per_doc, strict=True):
            s = [next(scores) for _ in reqs]
            gold = task.gold(d)
            acc.append(float(int(np.argmax([x.logprob for x in s])) == gold))
            # lm-eval normalizes by the choice's length in characters, without the " " delimiter
            lengths = [len(c.removeprefix(" ")) for _, c in reqs]
            acc_norm.append(float(int(np.argmax([x.logprob / n for x, n in zip(s, lengths, strict=True)])) == gold))
            chances.append(1 / len(reqs))
        chance_level = float(np.mean(chances))
        ids = [d["id"] for d in records]
        rows = [mean_row(task.name, "acc" + suffix, acc, chance_level, ids)]
        if task.norm:
            rows.append(mean_row(task.name, "acc_norm" + suffix, acc_norm, chance_level, ids))
        return rows

    def gsm8k(self, records: list[dict], shots: list[dict], name: str = "gsm8k") -> list[Row]:
        task = Math(shots)
        answers = self.answers(task, records, self.cfg.gsm8k_max_new_tokens)
        correct = [float(task.score(d, a)) for d, a in zip(records, answers, strict=True)]
        return [mean_row(name, "exact_match", correct, task.chance(records), [d["id"] for d in records])]

    def humaneval(self, problems: list[dict], name: str = "humaneval") -> list[Row]:
        c, task = self.cfg, Code(self.cfg.sandbox_timeout_s)
        answers = self.answers(task, problems, c.humaneval_max_new_tokens)
        greedy = [float(task.score(p, a)) for p, a in zip(problems, answers, strict=True)]
        passes = []
        for i, p in enumerate(tqdm(problems, desc=name, disable=not c.progress or not c.humaneval_samples,
                                   leave=False)):
            if c.humaneval_samples:
                passes.append(sum(task.score(p, self.answer(task, p, c.humaneval_max_new_tokens, c.temperature,
                                                            seed=c.seed * 100_003 + i * 1009 + j))
                                  for j in range(c.humaneval_samples)))
        ids = [p["id"] for p in problems]
        rows = [mean_row(name, "pass@1_greedy", greedy, 0.0, ids)]
        for k in c.humaneval_k if c.humaneval_samples else ():
            rows.append(mean_row(name, f"pass@{k}", [pass_at_k(c.humaneval_samples, n, k) for n in passes], 0.0,
                                 ids))
        return rows

    def needle(self, haystack: list[int]) -> dict[str, dict[str, float]]:
        """{"needle": {length: accuracy}} (and "needle_ttm", the same needles after memorizing each
        haystack, when eval.memorize_steps is set)."""
        c = self.cfg
        rng = random.Random(f"needle:{c.seed}")
        needles = {n: [needle(rng, self.tokenizer, haystack, n) for _ in range(c.needle_items)]
                   for n in c.needle_lengths}
        out = {"needle": {str(n): probe_accuracy(self.model, items, c.batch_size, device=self.device)
                          for n, items in needles.items()}}
        if c.memorize_steps:            # the same needles, each haystack memorized before the question
            memorizer = Memorizer(self.model, c.memorize_steps, c.memorize_lr, c.memorize_reset, device=self.device)
            out["needle_ttm"] = {str(n): probe_accuracy(self.model, items, c.batch_size, memorizer, device=self.device)
                                 for n, items in needles.items()}
        return out


def tier_task(name: str, tier: int | None) -> str:
    """A tier's row name: hatchling_math_t1 (a set without tiers keeps its name)."""
    return name if tier is None else f"{name}_t{tier}"


def run_task(ev: Evaluator, name: str, records: list[dict], shots: list[dict]) -> list[Row]:
    """The rows of one benchmark; a tiered set (the project's ladder) gets rows per tier, named
    `tier_task(name, tier)`."""
    if name in MULTIPLE_CHOICE:
        rows = ev.multiple_choice(MULTIPLE_CHOICE[name], records)
        c = ev.cfg
        if c.memorize_steps:              # test-time memorization, reported beside the plain score
            rows += ev.multiple_choice(MULTIPLE_CHOICE[name], records,
                                       Memorizer(ev.model, c.memorize_steps, c.memorize_lr, c.memorize_reset,
                                                 device=ev.device),
                                       suffix="_ttm")
        return rows
    score = {"gsm8k": lambda group, task: ev.gsm8k(group, shots, task),
             "humaneval": lambda group, task: ev.humaneval(group, task)}.get(SCHEMAS.get(name))
    if score is None:
        raise ConfigError(f"no eval task named {name!r}")
    return [replace(row, tier=tier) for tier, group in by_tier(records).items()
            for row in score(group, tier_task(name, tier))]


def tier_about(name: str, tier: int) -> str:
    """What a tier of the project's task set `name` asks (hatchling/tasks: Math.tiers, Code.tiers)."""
    return {"gsm8k": Math, "humaneval": Code}[SCHEMAS[name]].tiers[tier][0]
