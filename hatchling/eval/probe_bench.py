"""A probe bench in the manner of Zoology (Arora et al., 2023): train a fresh small model of each
architecture on each synthetic task, then score it on held-out items, by sequence length.

The pipeline's checkpoints never saw these tasks, so probing them measures nothing; a model
trained on the task shows what the architecture can learn to do. Each (arch, probe, length) run:

    seed -> build the arch's model (all archs at one parameter count, hatchling.model.sizing)
    -> AdamW (10% warmup, cosine decay) for `steps` steps on freshly sampled batches of about
       `batch_tokens` tokens (batch_tokens // length sequences), loss on the target tokens only
    -> accuracy on `eval_items` held-out items (exact argmax at the targets, teacher-forced;
       hatchling.eval.probes.probe_accuracy), items no training batch contains.

The tasks (`length` is the sequence length in tokens):
- mqar: length/8 key-value pairs (keys distinct, from 64 keys; values from 8, drawn with
  replacement), a separator, then every key queried once at a random place in the rest of the
  sequence, the gaps filled with the separator (Zoology's form); the values after the queried keys
  are the targets. Chance 1/8. The pair count grows with the length (4 at 32 tokens, 16 at 128, 64
  at 512), so a longer sequence holds more bindings for a fixed-size recurrent state. A model that
  ignores which key was asked and answers the context's commonest value scores the "no-recall"
  baseline (reported per length, about 0.3 at 4 pairs): only accuracy above it is recall. The value
  vocabulary is small because with 64 values no arch gets past that baseline in a CPU budget.
- palindrome: (length-1)/2 symbols, a separator, the symbols reversed (all targets). Chance 1/128.
- stack: pushes and pops (a pop marker, then the popped symbol: the target), 2·(length/3) operations,
  everything popped by the end. Chance 1/128.

The models: d_model, n_layers, heads of 32 dims; the hybrid is KDA blocks with NoPE attention every
`attn_every`-th layer (the defaults, 2 layers with attn_every 2: KDA, attention); gpt is RoPE
attention in every layer with its MLP widened to the hybrid's size; bdh and hope have their neurons /
memory width matched likewise. On the CPU everything is seeded and deterministic: the same config
and thread count give the same accuracies.

The defaults are the pipeline's budget (about a minute on a 2-core CPU: hybrid and gpt at 32 and 128
tokens); see docs/ablations.md for what they can and cannot show.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hatchling.eval.probe_grid import HEAD_DIM, MQAR_PAIRS, PROBES, ProbeBenchConfig
from hatchling.eval.probes import Alphabet, ProbeItem, palindrome, probe_accuracy, stack
from hatchling.io import atomic_path
from hatchling.model import build_model
from hatchling.model.sizing import count_params, matched

ALPHABET = Alphabet(symbols=list(range(2, 130)), sep=0, pop=1)
MQAR_KEYS = ALPHABET.symbols[:MQAR_PAIRS]
MQAR_VALUES = ALPHABET.symbols[MQAR_PAIRS:MQAR_PAIRS + 8]
VOCAB = 2 + len(ALPHABET.symbols)


def mqar_item(rng: random.Random, length: int) -> ProbeItem:
    """length/8 pairs (distinct keys from MQAR_KEYS, values from MQAR_VALUES), the separator, then
    each key queried once, in random order, at random two-token slots of the rest (separator filler)."""
    pairs = length // 8
    if not 1 <= pairs <= len(MQAR_KEYS):
        raise ValueError(f"mqar: length {length} gives {pairs} pairs (1 to {len(MQAR_KEYS)} allowed)")
    keys = rng.sample(MQAR_KEYS, pairs)
    values = [rng.choice(MQAR_VALUES) for _ in keys]
    context = [t for kv in zip(keys, values, strict=True) for t in kv] + [ALPHABET.sep]
    slots = sorted(rng.sample(range((length - len(context)) // 2), pairs))
    body = [ALPHABET.sep] * (length - len(context))
    for i, slot in zip(rng.sample(range(pairs), pairs), slots, strict=True):
        body[2 * slot:2 * slot + 2] = [keys[i], values[i]]
    return ProbeItem(context + body, [len(context) + 2 * slot + 1 for slot in slots])


def chance(probe: str) -> float:
    """Accuracy of a uniform guess over the target's alphabet."""
    return 1 / len(MQAR_VALUES) if probe == "mqar" else 1 / len(ALPHABET.symbols)


def no_recall(items: list[ProbeItem]) -> float:
    """MQAR: accuracy of answering every query with the context's commonest value, ignoring the key
    (the best a model can do without binding keys to values, bar eliminating answered queries)."""
    hits = total = 0
    for it in items:
        values = it.tokens[1:it.tokens.index(ALPHABET.sep):2]
        hits += len(it.targets) * max(values.count(v) for v in set(values)) / len(values)
        total += len(it.targets)
    return hits / max(total, 1)


def make_item(probe: str, rng: random.Random, length: int) -> ProbeItem:
    """One item of `probe` at most `length` tokens long."""
    if probe == "mqar":
        return mqar_item(rng, length)
    if probe == "palindrome":
        return palindrome(rng, ALPHABET, (length - 1) // 2)
    if probe == "stack":
        return stack(rng, ALPHABET, 2 * (length // 3))      # an even count: every push is popped
    raise ValueError(f"unknown probe {probe!r} (choose from {', '.join(PROBES)})")


def held_out(probe: str, length: int, n: int, seed: int) -> list[ProbeItem]:
    """The fixed test items of (probe, length, seed)."""
    rng = random.Random(f"heldout:{probe}:{length}:{seed}")
    return [make_item(probe, rng, length) for _ in range(n)]


def training_items(probe: str, rng: random.Random, length: int, n: int, exclude: set[tuple]) -> list[ProbeItem]:
    """n fresh items drawn from `rng`, none of whose token sequences is in `exclude` (the held-out set)."""
    items = []
    while len(items) < n:
        item = make_item(probe, rng, length)
        if tuple(item.tokens) not in exclude:
            items.append(item)
    return items


def collate(items: list[ProbeItem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B, T] right-padded with the separator, and a [B, T] mask of the target positions."""
    width = max(len(it.tokens) for it in items)
    x = torch.full((len(items), width), ALPHABET.sep, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.bool)
    for i, it in enumerate(items):
        x[i, :len(it.tokens)] = torch.tensor(it.tokens)
        mask[i, it.targets] = True
    return x, mask


def model_configs(cfg: ProbeBenchConfig) -> dict[str, dict]:
    """{arch: model config}: the hybrid as the reference, every other arch matched to its size."""
    hybrid = dict(arch="hybrid", vocab_size=VOCAB, d_model=cfg.d_model, n_layers=cfg.n_layers,
                  n_heads=cfg.d_model // HEAD_DIM, head_dim=HEAD_DIM, n_kv_heads=1, mlp_hidden=2 * cfg.d_model,
                  attn_every=cfg.attn_every, chunk_size=32)      # KDA chunks of 32: a quarter faster at 32 tokens
    return {arch: matched(arch, hybrid) for arch in cfg.archs}


def train_and_score(model_cfg: dict, probe: str, length: int, cfg: ProbeBenchConfig,
                    device: torch.device) -> float:
    """Held-out accuracy of a fresh model trained on (probe, length)."""
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg).to(device)
    test = held_out(probe, length, cfg.eval_items, cfg.seed)
    exclude = {tuple(it.tokens) for it in test}
    rng = random.Random(f"train:{probe}:{length}:{cfg.seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    warmup = max(1, cfg.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * max(0, s - warmup) / max(1, cfg.steps - warmup)))))
    model.train()
    for _ in range(cfg.steps):
        x, mask = (t.to(device) for t in collate(training_items(probe, rng, length, cfg.batch(length), exclude)))
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits[mask[:, 1:]].float(), x[:, 1:][mask[:, 1:]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return probe_accuracy(model, test, cfg.batch(length), device=device)


def run_bench(cfg: ProbeBenchConfig, progress: bool = False, device: str | torch.device = "cpu") -> dict:
    """Train and score every (probe, arch, length) of `cfg`. Returns {"accuracy": {probe: {arch:
    {length: accuracy}}}, "chance": {probe: level}, "params": {arch: count}, "seconds": {probe: {arch:
    {length: s}}}, "no_recall": {"mqar": {length: baseline}} (if mqar is probed), "steps", "total_seconds",
    "config"}; lengths are strings (JSON keys)."""
    device = torch.device(device)
    models = model_configs(cfg)
    t_start = time.perf_counter()
    accuracy: dict = {p: {a: {} for a in cfg.archs} for p in cfg.probes}
    seconds: dict = {p: {a: {} for a in cfg.archs} for p in cfg.probes}
    runs = [(p, a, n) for p in cfg.probes for a in cfg.archs for n in cfg.lengths]
    for probe, arch, length in tqdm(runs, desc="probe bench", disable=not progress):
        t0 = time.perf_counter()
        accuracy[probe][arch][str(length)] = train_and_score(models[arch], probe, length, cfg, device)
        seconds[probe][arch][str(length)] = round(time.perf_counter() - t0, 2)
    baselines = {"mqar": {str(n): round(no_recall(held_out("mqar", n, cfg.eval_items, cfg.seed)), 4)
                          for n in cfg.lengths}} if "mqar" in cfg.probes else {}
    return {"accuracy": accuracy, "chance": {p: chance(p) for p in cfg.probes}, "no_recall": baselines,
            "params": {a: count_params(m) for a, m in models.items()}, "steps": cfg.steps,
            "seconds": seconds, "total_seconds": round(time.perf_counter() - t_start, 2),
            "config": cfg.model_dump()}


def markdown(result: dict) -> list[str]:
    """A table: one row per (probe, length), one accuracy column per arch, after the chance level
    and (MQAR) the no-recall baseline."""
    archs = list(result["params"])
    lines = ["| probe | length | chance | no-recall | " + " | ".join(
        f"{a} ({result['params'][a]:,} params)" for a in archs) + " |", "|---|---|---|---|" + "---|" * len(archs)]
    for probe, by_arch in result["accuracy"].items():
        for length in by_arch[archs[0]]:
            base = result.get("no_recall", {}).get(probe, {}).get(length)
            lines.append(f"| {probe} | {length} | {result['chance'][probe]:.3f} | "
                         + ("–" if base is None else f"{base:.3f}") + " | "
                         + " | ".join(f"{by_arch[a][length]:.3f}" for a in archs) + " |")
    return lines


def plot(result: dict, path: str | Path) -> None:
    """Accuracy vs length (log scale), one panel per probe, one line per arch; for no result (the bench
    switched off) a figure that says so, since the eval stage always writes this file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not result:
        fig, ax = plt.subplots(figsize=(4.5, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "probe bench not run (eval.probe_bench is null)", ha="center", va="center")
    else:
        probes = list(result["accuracy"])
        fig, axes = plt.subplots(1, len(probes), figsize=(3.2 * len(probes), 3), squeeze=False)
        for ax, probe in zip(axes[0], probes, strict=True):
            for arch, by_length in result["accuracy"][probe].items():
                ax.plot([int(n) for n in by_length], list(by_length.values()), marker="o", label=arch)
            ax.axhline(result["chance"][probe], color="grey", linestyle="--", linewidth=1, label="chance")
            if probe in result.get("no_recall", {}):
                base = result["no_recall"][probe]
                ax.plot([int(n) for n in base], list(base.values()), color="grey", linestyle=":", linewidth=1,
                        label="no-recall")
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{probe} ({result['steps']} steps)")
            ax.set_xlabel("sequence length")
        axes[0][0].set_ylabel("held-out accuracy")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
