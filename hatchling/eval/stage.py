"""Stage `eval`: every benchmark in params.benchmarks (the project's task ladder tier by tier among
them) for each checkpoint in params.eval.checkpoints, the probe bench (fresh small models of each
architecture trained on synthetic recall tasks, hatchling/eval/probe_bench.py), plus (when switched
on) the needle probe, test-time memorization beside the plain multiple-choice scores and the
forgetting eval; reports/eval.json, the report card reports/eval.md with what the training stages
report of themselves (pretraining against its baselines, RL's gain), and its figures
reports/eval_training.png and reports/eval_probes.png.

Each score comes with its 95% interval, n and chance level. The items the dedup stage found in the
training data (reports/contamination.json) are counted per benchmark, and where there are any the
score on the clean rest is reported beside the full one (lm-eval's "decontaminate" convention).
A benchmark whose file is absent is reported as "not run: no data at PATH", never dropped and
never scored on made-up items. Each checkpoint is loaded onto `eval.device` (by default the run's
device) and scored, generates, is probed and trains (memorization, forgetting) there.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

from hatchling.checkpoint import load_for_inference
from hatchling.data.benchmarks import load_records
from hatchling.data.packed import check_same_tokenizer, load_split, read_meta
from hatchling.errors import MissingInputError
from hatchling.eval.continual import forgetting
from hatchling.eval.harness import Evaluator, Row, mean_row, run_task, tier_about
from hatchling.eval.probe_bench import plot as plot_bench
from hatchling.eval.probe_bench import run_bench
from hatchling.eval.report import markdown, plot_training
from hatchling.io import atomic_write_text
from hatchling.model.device import resolve_device
from hatchling.model.lm import bits_per_byte, split_loss, tokens_per_byte
from hatchling.tasks.base import by_tier


def haystack_tokens(tokenized: Path, limit: int = 1 << 16) -> list[int]:
    """Held-out text for the needle probe: the first tokens of the validation split."""
    return load_split(tokenized, "val")[:limit].astype(int).tolist()


def fewshot(cfg, root: Path) -> list[dict]:
    if not cfg.gsm8k_fewshot:
        return []
    records, status = load_records("gsm8k", cfg.gsm8k_fewshot_path, root)
    if records is None:
        raise MissingInputError(f"eval.gsm8k_fewshot_path: {status}")
    return records[:cfg.gsm8k_fewshot]


def contaminated_ids(report_path: Path) -> dict[str, set[str]]:
    """{benchmark: ids of its items found in the training data}, from the dedup stage's report, of the benchmarks
    the check ran on (a set it could not read there is absent: unchecked, not clean)."""
    report = json.loads(report_path.read_text())
    return {name: set(info["found_ids"]) for name, info in report.items() if info["status"] == "ok"}


def entry(row: Row, found: set[str]) -> dict:
    """A checkpoint's cell of the report: the score, its interval and, when some of the scored items
    were found in the training data (`found`, the ids of those), the score on the clean rest."""
    cell = {"value": row.value, "stderr": None if math.isnan(row.stderr) else row.stderr, "ci": list(row.ci),
            "at_chance": row.at_chance, "below_chance": row.below_chance}
    if found:
        clean = [v for i, v in zip(row.ids, row.values, strict=True) if i not in found]
        clean_row = mean_row(row.task, row.metric, clean, row.chance)
        cell["clean"] = {"value": clean_row.value, "n": clean_row.n, "ci": list(clean_row.ci)}
    return cell


def scores(rows, checkpoints) -> dict:
    """{checkpoint: {task: {metric: value}}}: the report card's values as nested scalars, the form
    `dvc metrics show/diff` and `dvc exp show` display (they skip lists such as the rows)."""
    out: dict = {}
    for row in rows:
        for ckpt in checkpoints:
            out.setdefault(ckpt, {}).setdefault(row["task"], {})[row["metric"]] = row[ckpt]["value"]
    return out


def training(ctx) -> dict:
    """What the training stages report about themselves that the card shows: pretraining against its
    baselines, RL's tier and its held-out pass rate before and after."""
    pretrain = json.loads(ctx.inputs.pretrain_report.read_text())
    rlvr = json.loads(ctx.inputs.rlvr_report.read_text())
    return {"pretrain": {k: pretrain[k] for k in ("steps", "val_bpb", "full_val_bpb", "step0_val_bpb",
                                                  "unigram_val_bpb", "bigram_val_bpb", "bigram_add_k")},
            "rlvr": {k: rlvr[k] for k in ("steps", "tier", "tier_pass_rates", "heldout_items", "heldout_pass_before",
                                          "heldout_pass_after", "heldout_gain", "heldout_pass_before_ci",
                                          "heldout_pass_after_ci", "heldout_sampled_pass_before",
                                          "heldout_sampled_pass_after", "heldout_sampled_gain",
                                          "heldout_sampled_pass_before_ci", "heldout_sampled_pass_after_ci")}}


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run(ctx) -> dict:
    cfg, log = ctx.params.eval, ctx.log
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    data, not_run = {}, {}
    for name, path in ctx.params.benchmarks.items():
        records, status = load_records(name, path, ctx.root)
        if records is None:
            not_run[name] = status
        else:
            limit = cfg.limit_for(name)       # of each tier, in a tiered set
            data[name] = [r for group in by_tier(records).values() for r in (group[:limit] if limit else group)]
    found = contaminated_ids(ctx.inputs.contamination)
    shots, haystack = fewshot(cfg, ctx.root), haystack_tokens(ctx.inputs.tokenized)
    val = load_split(ctx.inputs.tokenized, "val")
    split = read_meta(ctx.inputs.tokenized)["val"]
    per_byte = tokens_per_byte(split["tokens"], split["bytes"])
    rows: dict[tuple[str, str], dict] = {}
    needles, forgot, text_bpb = {}, {}, {}
    for ckpt in cfg.checkpoints:
        model, tokenizer, meta = load_for_inference(ctx.inputs[ckpt], device=device)
        check_same_tokenizer(ctx.inputs.tokenized, ctx.inputs[ckpt], meta.get("tokenizer_sha256"))
        # plain text as pretraining read it: what SFT and RL keep of it
        text_bpb[ckpt] = round(bits_per_byte(split_loss(model, val, cfg.text_seq_len, cfg.batch_size, device),
                                             per_byte), 5)
        log({f"{ckpt}.text_val_bpb": text_bpb[ckpt]}, 0)
        ev = Evaluator(model, tokenizer, cfg, device=device, chat=meta.get("stage") in ("sft", "rlvr"))
        for name, records in data.items():
            for row in run_task(ev, name, records, shots):
                scored = found[name] & set(row.ids) if name in found else None          # None: not checked
                line = rows.setdefault((row.task, row.metric), {
                    "task": row.task, "metric": row.metric, "n": row.n, "chance": row.chance,
                    "found": None if scored is None else len(scored),
                    **({"benchmark": name, "tier": row.tier, "about": tier_about(name, row.tier)}
                       if row.tier is not None else {})})
                line[ckpt] = entry(row, scored or set())
                log({f"{ckpt}.{row.task}.{row.metric}".replace("@", "_at_"): row.value}, 0)   # MLflow: no "@"
        if cfg.needle_items:
            needles[ckpt] = ev.needle(haystack)
            for probe, by_length in needles[ckpt].items():
                for length, acc in by_length.items():
                    log({f"{ckpt}.{probe}": acc}, int(length))
        if cfg.forgetting_segments:
            forgot[ckpt] = forgetting(model, load_split(ctx.inputs.tokenized, "train"), cfg.forgetting_segments,
                                      cfg.forgetting_steps, cfg.forgetting_lr, cfg.batch_size,
                                      min(cfg.max_len, 128), seed=cfg.seed, device=device)
            log({f"{ckpt}.forgetting": forgot[ckpt]["forgetting"]}, 0)
    bench = {} if cfg.probe_bench is None else run_bench(cfg.probe_bench, cfg.progress, device)
    report = {"checkpoints": list(cfg.checkpoints), "training": training(ctx), "text_val_bpb": text_bpb,
              "rows": list(rows.values()),
              "not_run": not_run, "scores": scores(rows.values(), cfg.checkpoints), "probe_bench": bench,
              "needle": needles, "forgetting": forgot, "seconds": round(time.perf_counter() - t0, 2)}
    plot_training({name: read_csv(ctx.inputs[f"{name}_log"]) for name in ("pretrain_eval", "sft", "sft_eval", "rlvr")},
                  report["training"]["pretrain"], ctx.outputs.training_plot)
    plot_bench(bench, ctx.outputs.probes_plot)
    atomic_write_text(ctx.outputs.report, markdown(report))       # last: a failed plot leaves the old card
    return report

