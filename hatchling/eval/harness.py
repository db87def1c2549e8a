"""Evaluate one checkpoint on every task whose data is present: rows of (task, metric, value, n,
chance, stderr), and probe accuracy by length; every pass on the device the model was loaded on."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from hatchling.data.benchmarks import SCHEMAS
from hatchling.data.chat import render_chat, stop_ids
from hatchling.data.tokenizer import EOT
from hatchling.errors import ConfigError
from hatchling.eval.continual import Memorizer
from hatchling.eval.probes import PROBES, Alphabet, chance, make_items, needle, probe_accuracy
from hatchling.eval.scoring import loglikelihoods
from hatchling.inference import generate_text
from hatchling.tasks.base import Task
from hatchling.tasks.code import Code, pass_at_k
from hatchling.tasks.math import Math
from hatchling.tasks.multiple_choice import MULTIPLE_CHOICE, MultipleChoice

Z95 = 1.959964     # the standard normal's 97.5th percentile


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

    @property
    def at_chance(self) -> bool:
        """Whether chance lies within the score's 95% interval."""
        return self.ci[0] <= self.chance <= self.ci[1]


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion: sound at 0 and 1 and for small n, unlike mean ± z·se."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


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
        model continues the task's prompt up to its stop strings."""
        if self.chat:
            ids = render_chat(self.tokenizer, [{"role": "user", "content": task.question(item)}],
                              add_generation_prompt=True)
            return generate_text(self.model, ids, max_new_tokens, self.decode, (), self.cfg.max_len, temperature,
                                 seed, stop_ids(self.tokenizer), device=self.device)
        return generate_text(self.model, [self.bos, *self.encode(task.prompt(item))], max_new_tokens, self.decode,
                             task.stop, self.cfg.max_len, temperature, seed, device=self.device)

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
                memorizer([self.bos, *self.encode(reqs[0][0])])
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
        correct = []
        for d in tqdm(records, desc=name, disable=not self.cfg.progress, leave=False):
            correct.append(float(task.score(d, self.answer(task, d, self.cfg.gsm8k_max_new_tokens))))
        return [mean_row(name, "exact_match", correct, 0.0, [d["id"] for d in records])]

    def humaneval(self, problems: list[dict], name: str = "humaneval") -> list[Row]:
        c, task = self.cfg, Code(self.cfg.sandbox_timeout_s)
        greedy, passes = [], []
        for i, p in enumerate(tqdm(problems, desc=name, disable=not c.progress, leave=False)):
            greedy.append(float(task.score(p, self.answer(task, p, c.humaneval_max_new_tokens))))
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

    def probes(self, haystack: list[int]) -> dict[str, dict[str, float]]:
        """{probe: {length: accuracy}} for the synthetic probes and the needle."""
        c = self.cfg
        alphabet = Alphabet.from_tokenizer(self.tokenizer)
        out: dict[str, dict[str, float]] = {}
        for name in PROBES:
            out[name] = {str(n): probe_accuracy(self.model, make_items(name, n, c.probe_items, c.seed, alphabet),
                                                c.batch_size, device=self.device) for n in c.probe_lengths}
        rng = random.Random(f"needle:{c.seed}")
        needles = {n: [needle(rng, self.tokenizer, haystack, n) for _ in range(c.needle_items)]
                   for n in c.needle_lengths}
        out["needle"] = {str(n): probe_accuracy(self.model, items, c.batch_size, device=self.device)
                         for n, items in needles.items()}
        if c.memorize_steps:            # the same needles, each haystack memorized before the question
            memorizer = Memorizer(self.model, c.memorize_steps, c.memorize_lr, c.memorize_reset, device=self.device)
            out["needle_ttm"] = {str(n): probe_accuracy(self.model, items, c.batch_size, memorizer, device=self.device)
                                 for n, items in needles.items()}
        out["chance"] = {name: chance(name, alphabet) for name in PROBES}   # the needle's has no one value
        return out


def run_task(ev: Evaluator, name: str, records: list[dict], shots: list[dict]) -> list[Row]:
    if name in MULTIPLE_CHOICE:
        rows = ev.multiple_choice(MULTIPLE_CHOICE[name], records)
        c = ev.cfg
        if c.memorize_steps:              # test-time memorization, reported beside the plain score
            rows += ev.multiple_choice(MULTIPLE_CHOICE[name], records,
                                       Memorizer(ev.model, c.memorize_steps, c.memorize_lr, c.memorize_reset,
                                                 device=ev.device),
                                       suffix="_ttm")
        return rows
    if SCHEMAS.get(name) == "gsm8k":
        return ev.gsm8k(records, shots, name)
    if SCHEMAS.get(name) == "humaneval":
        return ev.humaneval(records, name)
    raise ConfigError(f"no eval task named {name!r}")
