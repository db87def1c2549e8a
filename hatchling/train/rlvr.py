"""Stage `rlvr`: reinforcement learning with verifiable rewards, starting from the SFT checkpoint.

Prompts are the training split of the project's tasks (data/tasks), asked as a user turn of the
chat template; each completion gets its task family's reward (hatchling/tasks: math, the number
after ``####`` or the last number equals the answer; code, the function passes its unit tests in
the sandbox), plus the format bonus for a well-formed answer (math: marked with ``####``; code: it
parses). The algorithm lives in hatchling/train/rl.py. With ``rlvr.tier: auto`` it trains on the
tier whose sampled groups hold the most to learn from (``choose_tier``). The held-out pass rate of
that tier is measured before and after, greedy and sampled as RL samples (k completions an item, the
same draws before and after), and every step goes to MLflow and logs/rlvr.csv. Every
`checkpoint_every` steps the whole state of the run (policy, optimizer, KL coefficient, the prompt
sampler's and the token sampler's RNG states, the step, the log so far) is saved in
checkpoints/rlvr-run: a killed run started again with the same params and inputs continues from
there and ends as an uninterrupted run would. The policy,
its frozen reference and the sampling run on `rlvr.device` (by default the run's device).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hatchling.checkpoint import (
    load_checkpoint_tokenizer,
    load_model,
    load_resume_state,
    load_weights,
    read_sidecar,
    save_model,
)
from hatchling.data.chat import render_chat, stop_ids
from hatchling.data.tokenizer import TOKENIZER
from hatchling.errors import ConfigError, MissingInputError, StageError
from hatchling.inference import generate_texts
from hatchling.io import atomic_write_csv, hash_paths, read_jsonl
from hatchling.model.device import resolve_device
from hatchling.stats import wilson_interval
from hatchling.tasks.base import Task, by_tier
from hatchling.tasks.code import Code
from hatchling.tasks.math import Math
from hatchling.train.loop import run_fingerprint
from hatchling.train.rl import KLController, RLConfig, rl_step, same_length, sample_groups


def families(sandbox_timeout_s: float) -> dict[str, Task]:
    """The task families RLVR trains on, by their items' `kind`: each asks, verifies and rewards its own."""
    return {task.name: task for task in (Math(), Code(sandbox_timeout_s))}


def load_items(tasks_dir: Path, kinds: list[str], split: str) -> list[dict]:
    items = []
    for kind in kinds:
        path = tasks_dir / f"{kind}_{split}.jsonl"
        if not path.is_file():
            raise MissingInputError(f"rlvr: no {path} (run the tasks stage first)")
        items += [{**x, "kind": kind} for x in read_jsonl(path)]
    return items


def asked(tokenizer, items: list[dict], tasks: dict[str, Task]) -> list[list[int]]:
    """Each item asked as a user turn of the chat template, ready for the assistant's answer."""
    return [render_chat(tokenizer, [{"role": "user", "content": tasks[x["kind"]].question(x)}],
                        add_generation_prompt=True) for x in items]


@torch.no_grad()
def pass_rate(model, tokenizer, items: list[dict], max_new_tokens: int, tasks: dict[str, Task],
              device: torch.device) -> float:
    """Share of `items` the model (on `device`) answers correctly, greedily, asked as a user turn."""
    model.eval()
    prompts = asked(tokenizer, items, tasks)
    answers = generate_texts(model, prompts, max_new_tokens, tokenizer.decode, stop_ids=stop_ids(tokenizer),
                             device=device)
    return sum(tasks[x["kind"]].score(x, a) for x, a in zip(items, answers, strict=True)) / max(len(items), 1)


@torch.no_grad()
def sampled_pass_rates(model, tokenizer, items: list[dict], k: int, max_new_tokens: int, temperature: float,
                       tasks: dict[str, Task], generator: torch.Generator | None, device: torch.device,
                       prompts_per_batch: int = 32) -> list[float]:
    """Each item's share of `k` completions, sampled at `temperature` as RL samples them, that are
    correct: what RL's group for the item would hold (`generator` None: torch's default one)."""
    prompts = asked(tokenizer, items, tasks)
    rates = [0.0] * len(items)
    for group in same_length(prompts):
        for b in range(0, len(group), prompts_per_batch):
            rows = group[b:b + prompts_per_batch]
            s = sample_groups(model, [prompts[i] for i in rows], k, max_new_tokens, temperature, stop_ids(tokenizer),
                              generator, device)
            tokens, mask = s.tokens.cpu(), s.mask.cpu()
            for row in range(len(tokens)):
                i = rows[row // k]
                answer = tokenizer.decode(tokens[row][mask[row]].tolist())
                rates[i] += tasks[items[i]["kind"]].score(items[i], answer) / k
    return rates


def choose_tier(item_rates: dict[int, list[float]]) -> int:
    """The tier whose groups hold the most to learn from: the largest mean over its probe items of
    p(1 - p), p an item's sampled pass rate (a group of all-right or all-wrong answers has equal
    rewards and teaches nothing; a greedy pass rate cannot tell a tier whose items are each right
    half the time from one whose items are each always right or always wrong). Ties go to the lower tier."""
    def signal(t: int) -> float:
        return round(sum(p * (1 - p) for p in item_rates[t]) / max(len(item_rates[t]), 1), 9)

    return max(item_rates, key=lambda t: (signal(t), -t))


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """torch's default generators (CPU, and `device`'s when CUDA) seeded with `seed` inside, as they
    were after: draws that do not move the training run's own random streams."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-item rates with ± 1.96 standard errors across items."""
    n = len(values)
    mean = sum(values) / max(n, 1)
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0
    return mean, max(0.0, mean - 1.96 * se), min(1.0, mean + 1.96 * se)


def run(ctx) -> dict:
    p, init_dir, run_dir = ctx.params.rlvr, ctx.inputs.init, ctx.outputs.run
    t0 = time.perf_counter()
    init = read_sidecar(init_dir)
    tokenizer = load_checkpoint_tokenizer(init_dir, init)
    torch.manual_seed(p.seed)
    device = resolve_device(p.device)
    policy, _ = load_model(init_dir, device)
    if p.use_curiosity_bonus and not init["model_config"].get("use_predictive_coding"):
        raise ConfigError(f"rlvr.use_curiosity_bonus: the model in {init_dir} has no predictive-coding head "
                         "(train it with model.use_predictive_coding: true)")
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    tasks = families(p.sandbox_timeout_s)
    train_tiers = by_tier(load_items(ctx.inputs.tasks, p.tasks, "train"))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=p.lr, betas=(0.9, 0.95), weight_decay=0.0)
    kl = KLController(p.kl_coef, p.kl_target, p.kl_horizon)
    fingerprint = run_fingerprint(p, code=ctx.code, inputs=hash_paths([init_dir, ctx.inputs.tasks], ctx.root))
    state = load_resume_state(run_dir, fingerprint)
    if state is None:
        probes = {}
        if p.tier == "auto":
            with seeded(p.seed, device):
                probes = {t: sampled_pass_rates(policy, tokenizer, items[:p.tier_probe_items], p.k, p.max_new_tokens,
                                                p.temperature, tasks, None, device)
                          for t, items in train_tiers.items()}
        state = {"step": 0, "history": [], "tier": choose_tier(probes) if p.tier == "auto" else p.tier,
                 "tier_pass_rates": {t: sum(v) / len(v) for t, v in probes.items()}, "fingerprint": fingerprint}
    else:                                        # the run killed after this checkpoint, continued as it was
        policy.load_state_dict(load_weights(run_dir, str(device)))
        policy.load_state_files(run_dir)
        optimizer.load_state_dict(state["optimizer"])
        kl.value = state["kl_coef"]
    tier, history = state["tier"], state["history"]
    if tier not in train_tiers:
        raise ConfigError(f"rlvr.tier = {tier}: the tasks {', '.join(p.tasks)} have tiers "
                          f"{', '.join(map(str, train_tiers))}")
    train = train_tiers[tier]
    heldout = by_tier(load_items(ctx.inputs.tasks, p.tasks, "heldout")).get(tier, [])
    heldout = heldout[:p.eval_items] if p.eval_items else heldout
    prompts = asked(tokenizer, train, tasks)

    def sampled_heldout() -> list[float]:          # the same draws before and after: their difference is RL's
        with seeded(p.seed + 1, device):
            return sampled_pass_rates(policy, tokenizer, heldout, p.k, p.max_new_tokens, p.temperature, tasks, None,
                                      device)

    if "heldout_pass_before" not in state:
        state["heldout_pass_before"] = pass_rate(policy, tokenizer, heldout, p.max_new_tokens, tasks, device)
        state["heldout_sampled_before"] = sampled_heldout()
    resumed_from = state["step"] or None
    rng, generator = random.Random(p.seed), torch.Generator(device).manual_seed(p.seed)
    if resumed_from:
        rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
    cfg = RLConfig(p.k, p.max_new_tokens, p.temperature, p.epsilon_clip, p.rho_max, p.ppo_epochs,
                   curiosity_coef=p.curiosity_coef if p.use_curiosity_bonus else 0.0)
    for step in tqdm(range(state["step"] + 1, p.max_steps + 1), desc="rlvr", disable=not p.progress, unit="step",
                     initial=state["step"], total=p.max_steps):
        chosen = rng.sample(range(len(train)), min(p.prompts_per_step, len(train)))

        def reward(i: int, completion: list[int], chosen=chosen) -> float:
            item = train[chosen[i]]
            return tasks[item["kind"]].reward(item, tokenizer.decode(completion), p.format_reward)

        stats = rl_step(policy, ref, optimizer, [prompts[i] for i in chosen], reward, cfg, kl,
                        stop_ids(tokenizer), generator, p.grad_clip, device=device)
        if not all(math.isfinite(v) for v in stats.values()):
            raise StageError(f"RL diverged at step {step}: " + ", ".join(f"{k} is {v}" for k, v in stats.items()
                                                                        if not math.isfinite(v))
                             + f"; the last checkpoint stays in {run_dir}. Lower rlvr.lr, then run again")
        history.append({"step": step, **{k: round(v, 6) for k, v in stats.items()}})
        ctx.log(stats, step)
        if step % p.checkpoint_every == 0 or step == p.max_steps:
            state.update(step=step, optimizer=optimizer.state_dict(), kl_coef=kl.value, rng=rng.getstate(),
                         generator=generator.get_state(), torch_rng=torch.get_rng_state())
            save_model(policy, run_dir, {"tokenizer_sha256": init["tokenizer_sha256"], "stage": "rlvr-run",
                                         "step": step}, state)
    before = state["heldout_pass_before"]
    after = pass_rate(policy, tokenizer, heldout, p.max_new_tokens, tasks, device)
    sampled_before, sampled_after = mean_interval(state["heldout_sampled_before"]), mean_interval(sampled_heldout())
    atomic_write_csv(ctx.outputs.log, history)
    save_model(policy, ctx.outputs.model, {"tokenizer_sha256": init["tokenizer_sha256"], "stage": "rlvr",
                                    "step": p.max_steps, "init_step": init.get("step")},
               files={TOKENIZER: init_dir / TOKENIZER})
    n = len(heldout)
    return {"steps": p.max_steps, "resumed_from_step": resumed_from, "tier": tier,
            "tier_pass_rates": state["tier_pass_rates"],
            "heldout_pass_before": before, "heldout_pass_after": after, "heldout_gain": after - before,
            "heldout_pass_before_ci": list(wilson_interval(before * n, n)),
            "heldout_pass_after_ci": list(wilson_interval(after * n, n)),
            "heldout_sampled_pass_before": sampled_before[0], "heldout_sampled_pass_after": sampled_after[0],
            "heldout_sampled_gain": sampled_after[0] - sampled_before[0],
            "heldout_sampled_pass_before_ci": list(sampled_before[1:]),
            "heldout_sampled_pass_after_ci": list(sampled_after[1:]),
            "heldout_items": n, "final_reward_mean": history[-1]["reward_mean"],
            "final_kl": history[-1]["kl"], "final_kl_coef": history[-1]["kl_coef"],
            "seconds": round(time.perf_counter() - t0, 2)}
