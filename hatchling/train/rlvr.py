"""Stage `rlvr`: reinforcement learning with verifiable rewards, starting from the SFT checkpoint.

Prompts are the training split of the project's tasks (data/tasks), asked as a user turn of the
chat template; completions are rewarded by verifiers (math: the number after ``####`` or the last
number equals the answer; code: the function passes its unit tests in the sandbox), plus an
optional format reward (math: the answer is marked with ``####``; code: it parses). The algorithm
lives in hatchling/train/rl.py. Held-out reward (greedy, on the held-out split) is measured before
and after, and every step goes to MLflow and logs/rlvr.csv.
"""

from __future__ import annotations

import ast
import copy
import csv
import io
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hatchling.data.chat import render_chat, stop_ids
from hatchling.data.tasks import CODE_INSTRUCTION
from hatchling.data.tokenizer import load_tokenizer
from hatchling.errors import ConfigError, MissingInputError
from hatchling.eval.generation import extract_answer, gsm8k_correct, humaneval_passes
from hatchling.eval.scoring import generate_text
from hatchling.io import atomic_write_text, read_jsonl
from hatchling.train.checkpoint import TOKENIZER, load_model, read_sidecar, save_model
from hatchling.train.rl import KLController, RLConfig, rl_step

INIT = Path("checkpoints/sft")
OUT = Path("checkpoints/rlvr")
LOG = Path("logs/rlvr.csv")
TASKS = Path("data/tasks")


def question(item: dict) -> str:
    return item["question"] if item["kind"] == "math" else CODE_INSTRUCTION + item["prompt"]


def verify(item: dict, completion: str, timeout_s: float) -> bool:
    if item["kind"] == "math":
        return gsm8k_correct(completion, item["answer"])
    return humaneval_passes(item, completion, timeout_s)[0]


def well_formed(item: dict, completion: str) -> bool:
    if item["kind"] == "math":
        return "####" in completion and extract_answer(completion.split("####")[-1]) is not None
    try:
        ast.parse(completion)
    except SyntaxError:
        return False
    return True


def load_items(root: Path, kinds: list[str], split: str) -> list[dict]:
    items = []
    for kind in kinds:
        path = root / TASKS / f"{kind}_{split}.jsonl"
        if not path.is_file():
            raise MissingInputError(f"rlvr: no {path} (run the tasks stage first)")
        items += [{**x, "kind": kind} for x in read_jsonl(path)]
    return items


@torch.no_grad()
def heldout_reward(model, tokenizer, items: list[dict], max_new_tokens: int, timeout_s: float) -> float:
    """Mean verifier reward of greedy answers."""
    model.eval()
    passed = 0
    for item in items:
        ids = render_chat(tokenizer, [{"role": "user", "content": question(item)}], add_generation_prompt=True)
        text = generate_text(model, ids, max_new_tokens, tokenizer.decode, stop_ids=stop_ids(tokenizer))
        passed += verify(item, text, timeout_s)
    return passed / max(len(items), 1)


def run(params, root: Path = Path("."), log=lambda metrics, step: None) -> dict:
    p, root = params.rlvr, Path(root)
    t0 = time.perf_counter()
    init = read_sidecar(root / INIT)
    tokenizer = load_tokenizer(root / INIT / TOKENIZER)
    torch.manual_seed(p.seed)
    policy, _ = load_model(root / INIT)
    if p.use_curiosity_bonus and not init["model_config"].get("use_predictive_coding"):
        raise ConfigError(f"rlvr.use_curiosity_bonus: the model in {root / INIT} has no predictive-coding head "
                         "(train it with model.use_predictive_coding: true)")
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    train, heldout = load_items(root, p.tasks, "train"), load_items(root, p.tasks, "heldout")[:p.eval_items]
    prompts = [render_chat(tokenizer, [{"role": "user", "content": question(x)}], add_generation_prompt=True)
               for x in train]
    before = heldout_reward(policy, tokenizer, heldout, p.max_new_tokens, p.sandbox_timeout_s)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=p.lr, betas=(0.9, 0.95), weight_decay=0.0)
    kl = KLController(p.kl_coef, p.kl_target, p.kl_horizon)
    cfg = RLConfig(p.k, p.max_new_tokens, p.temperature, p.epsilon_clip, p.rho_max, p.ppo_epochs,
                   curiosity_coef=p.curiosity_coef if p.use_curiosity_bonus else 0.0)
    rng, generator = random.Random(p.seed), torch.Generator().manual_seed(p.seed)
    history = []
    for step in tqdm(range(1, p.max_steps + 1), desc="rlvr", disable=not p.progress, unit="step"):
        chosen = rng.sample(range(len(train)), min(p.prompts_per_step, len(train)))

        def reward(i: int, completion: list[int], chosen=chosen) -> float:
            item, text = train[chosen[i]], tokenizer.decode(completion)
            return float(verify(item, text, p.sandbox_timeout_s)) + p.format_reward * well_formed(item, text)

        stats = rl_step(policy, ref, optimizer, [prompts[i] for i in chosen], reward, cfg, kl,
                        stop_ids(tokenizer), generator, p.grad_clip)
        history.append({"step": step, **{k: round(v, 6) for k, v in stats.items()}})
        log(stats, step)
    after = heldout_reward(policy, tokenizer, heldout, p.max_new_tokens, p.sandbox_timeout_s)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(root / LOG, buf.getvalue())
    save_model(policy, root / OUT, {"tokenizer_sha256": init["tokenizer_sha256"], "stage": "rlvr",
                                    "step": p.max_steps, "init_step": init.get("step")},
               files={TOKENIZER: root / INIT / TOKENIZER})
    return {"steps": p.max_steps, "heldout_reward_before": before, "heldout_reward_after": after,
            "heldout_items": len(heldout), "final_reward_mean": history[-1]["reward_mean"],
            "final_kl": history[-1]["kl"], "final_kl_coef": history[-1]["kl_coef"],
            "seconds": round(time.perf_counter() - t0, 2)}
