"""The report card (reports/eval.md): what pretraining learned against its baselines, the task
ladder tier by tier, RL's gain, the benchmarks (one row per task × metric, one column per checkpoint,
like nanochat's), the probe bench; each section says in one line what it measures. Beside it the
figures it links: training curves and probe accuracy by length."""

from __future__ import annotations

from pathlib import Path

from hatchling.eval.probe_bench import markdown as bench_markdown
from hatchling.io import atomic_path


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "—"
    low, high = entry["ci"]
    text = f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]" + (" ≈" if entry["at_chance"] else "") \
        + (" ↓" if entry.get("below_chance") else "")
    if "clean" in entry:
        text += f"; clean {entry['clean']['value']:.3f} (n {entry['clean']['n']})"
    return text


WHAT = {
    "pretrain": "Bits per byte on the whole validation split (lower is better): the pretrained model against its "
                "own initialisation and against n-gram models of the same training tokens.",
    "ladder": "The project's generated tasks in tiers from the easiest, on held-out items never trained on; exact "
              "match of the final number (math) or the function passing its unit tests (code), greedy. The base "
              "model (pretrain) continues the prompt format; chat checkpoints answer as a user turn.",
    "rlvr": "RLVR trains on the tier whose sampled answers are most often mixed, right and wrong, per training "
            "item (a group of equal rewards teaches nothing); the tier's held-out pass rate before and after, greedy "
            "and sampled as RL samples (k answers an item at its temperature, the same draws before and after: "
            "the quantity RL raises).",
    "benchmarks": "Real eval sets scored as lm-evaluation-harness scores them: multiple choice by log-likelihood "
                  "(acc; acc_norm divides by the choice's length in characters), GSM8K and HumanEval by generation. "
                  "A model of this size is expected at chance here (≈).",
    "probe_bench": "Fresh small models of each architecture (equal parameter counts) trained on synthetic recall "
                   "tasks, held-out accuracy by sequence length: where a recurrent state and attention differ "
                   "(Zoology). `hatchling bench probes` runs the whole grid; results in docs/ablations.md.",
    "needle": "Needle in a haystack: a number hidden in held-out text, asked for at the end; accuracy of its tokens, "
              "teacher-forced (with _ttm: after test-time memorization of the haystack).",
}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _pretrain_section(p: dict, text: dict) -> list[str]:
    """`p`: reports/pretrain.json's measures; `text`: the eval's bits/byte of each checkpoint on the same split."""
    rows = [["unigram (add-1)", f"{p['unigram_val_bpb']:.3f}"],
            [f"bigram (add-k, k = {p['bigram_add_k']:g} chosen on training text)", f"{p['bigram_val_bpb']:.3f}"],
            ["the model at step 0", f"{p['step0_val_bpb']:.3f}"],
            [f"the pretrained model ({p['steps']} steps)", f"**{p['full_val_bpb']:.3f}**"]]
    chat = {name: text[ckpt] for ckpt, name in (("sft", "SFT"), ("rlvr", "RLVR")) if ckpt in text}
    rows += [[f"after {name} (a chat checkpoint, on the same text)", f"{bpb:.3f}"] for name, bpb in chat.items()]
    verdict = ("below" if p["full_val_bpb"] < p["bigram_val_bpb"] else "not below") + " the bigram baseline"
    lines = ["## Pretraining", "", WHAT["pretrain"], "", *_table(["model", "val bits/byte"], rows), "",
             f"The pretrained model is {verdict} ({p['full_val_bpb'] - p['bigram_val_bpb']:+.3f} bits/byte)."]
    gain = p["step0_val_bpb"] - p["full_val_bpb"]
    if chat and gain > 0:
        kept = ", ".join(f"{name} {(p['step0_val_bpb'] - bpb) / gain:.0%}" for name, bpb in chat.items())
        lines[-1] += (f" Of what pretraining gained on plain text over step 0, the chat checkpoints keep: {kept} "
                      "(they train on conversations alone).")
    return lines + [""]


def _rlvr_section(r: dict) -> list[str]:
    n = r["heldout_items"]
    before, after = r["heldout_pass_before"], r["heldout_pass_after"]
    (bl, bh), (al, ah) = r["heldout_pass_before_ci"], r["heldout_pass_after_ci"]
    rates = ", ".join(f"tier {t}: {v:.2f}" for t, v in r["tier_pass_rates"].items()) or "set by rlvr.tier"
    sb, sa = r["heldout_sampled_pass_before"], r["heldout_sampled_pass_after"]
    (sbl, sbh), (sal, sah) = r["heldout_sampled_pass_before_ci"], r["heldout_sampled_pass_after_ci"]
    return ["## RLVR", "", WHAT["rlvr"], "",
            f"Tier {r['tier']} (sampled pass rates: {rates}); {r['steps']} steps. Held-out pass rate (n {n}), "
            f"greedy: {before:.3f} [{bl:.3f}, {bh:.3f}] before, {after:.3f} [{al:.3f}, {ah:.3f}] after: "
            f"**{100 * (after - before):+.1f} points**; sampled: {sb:.3f} [{sbl:.3f}, {sbh:.3f}] before, "
            f"{sa:.3f} [{sal:.3f}, {sah:.3f}] after: **{100 * (sa - sb):+.1f} points**.", ""]


def markdown(report: dict) -> str:
    ckpts = report["checkpoints"]
    lines = ["# Eval report card", "",
             "Each score: value [95% interval] (Wilson's for a proportion, else ± 1.96 standard errors); "
             "≈ marks a score whose interval contains the chance level, ↓ one whose interval lies below it (a "
             "systematic preference, not knowledge); chance is 1 / choices for "
             "multiple choice and, for exact match, the share of the most common answer (a model that always gives "
             "it scores that). *found*: scored items that the dedup stage "
             "found in the training data (unchecked: a set the check could not read); where there are any, the score "
             "on the clean rest follows the full one. "
             "Figures: training curves ([eval_training.png](eval_training.png))"
             + (", probe bench ([eval_probes.png](eval_probes.png))." if report.get("probe_bench") else "."), ""]
    training = report.get("training", {})
    if "pretrain" in training:
        lines += _pretrain_section(training["pretrain"], report.get("text_val_bpb", {}))
    ladder = [r for r in report["rows"] if r.get("tier") is not None]
    if ladder:
        # what each tier asks below the table, not in a column: the table then fits a page as the benchmarks' does
        # (the Prefect UI clips a wider one)
        asks = {}
        for r in ladder:
            asks.setdefault(r["benchmark"], []).append(f"{r['tier']}. {r['about']}")
        lines += ["## Task ladder", "", WHAT["ladder"], "",
                  *_table(["task", "tier", "n", *ckpts],
                          [[r["benchmark"], str(r["tier"]), str(r["n"]), *(_cell(r.get(c)) for c in ckpts)]
                           for r in ladder]), "",
                  *(f"- {task}: " + "; ".join(tiers) for task, tiers in asks.items()), ""]
    if "rlvr" in training:
        lines += _rlvr_section(training["rlvr"])
    lines += ["## Benchmarks", "", WHAT["benchmarks"], "",
              *_table(["task", "metric", "n", "chance", "found", *ckpts],
                      [[r["task"], r["metric"], str(r["n"]), f"{r['chance']:.3f}",
                        "unchecked" if r["found"] is None else str(r["found"]), *(_cell(r.get(c)) for c in ckpts)]
                       for r in report["rows"] if r.get("tier") is None])]
    if report["not_run"]:
        lines += ["", "## Not run", ""] + [f"- {task}: {why}" for task, why in report["not_run"].items()]
    if report.get("probe_bench"):
        b = report["probe_bench"]
        lines += ["", "## Probe bench", "", WHAT["probe_bench"], "", *bench_markdown(b), "",
                  f"{b['steps']} training steps per model; {b['total_seconds']:.0f} s in all."]
    if report.get("needle"):
        first = report["needle"][ckpts[0]]
        lines += ["", "## Needle in a haystack", "", WHAT["needle"], "",
                  *_table(["probe", "length", *ckpts],
                          [[probe, length, *(f"{report['needle'][c][probe][length]:.3f}" for c in ckpts)]
                           for probe, by_length in first.items() for length in by_length])]
    if report.get("forgetting"):
        lines += ["", "## Forgetting across training segments (held-out loss, nats/token)", ""]
        for ckpt, f in report["forgetting"].items():
            n = f["segments"]
            lines += [f"**{ckpt}**: {f['steps_per_segment']} steps per segment; mean forgetting "
                      f"{f['forgetting']:.4f} (loss regained on earlier segments), learned per segment "
                      + ", ".join(f"{x:.3f}" for x in f["learned"]), "",
                      "| after | " + " | ".join(f"seg {j}" for j in range(n)) + " |", "|---|" + "---|" * n,
                      "| (start) | " + " | ".join(f"{x:.3f}" for x in f["loss_before"]) + " |"]
            lines += [f"| seg {i} | " + " | ".join(f"{x:.3f}" for x in row) + " |"
                      for i, row in enumerate(f["loss_after"])]
            lines.append("")
    return "\n".join(lines) + "\n"


def plot_training(logs: dict[str, list[dict]], pretrain: dict, path: Path) -> None:
    """Three panels: pretraining's validation bits/byte by step against its baselines, SFT's train and
    validation loss, RLVR's reward and pass rate by step. `logs`: the rows of logs/pretrain_eval.csv,
    logs/sft.csv, logs/sft_eval.csv and logs/rlvr.csv, by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(12, 3.4))
    rows = logs["pretrain_eval"]
    a.plot([0] + [int(r["step"]) for r in rows], [pretrain["step0_val_bpb"]] + [float(r["val_bpb"]) for r in rows],
           marker="o", label="model (sampled windows)")
    for name, style in (("bigram", "--"), ("unigram", ":")):
        a.axhline(pretrain[f"{name}_val_bpb"], color="grey", linestyle=style, linewidth=1, label=name)
    a.set(title="pretrain: val bits/byte", xlabel="step", ylim=(0, None))
    a.legend(fontsize=7)
    b.plot([int(r["step"]) for r in logs["sft"]], [float(r["train_loss"]) for r in logs["sft"]], alpha=0.5,
           label="train")
    b.plot([int(r["step"]) for r in logs["sft_eval"]], [float(r["val_loss"]) for r in logs["sft_eval"]], marker="o",
           label="val")
    b.set(title="sft: loss (assistant tokens)", xlabel="step")
    b.legend(fontsize=7)
    for key in ("reward_mean", "pass_rate"):
        c.plot([int(r["step"]) for r in logs["rlvr"]], [float(r[key]) for r in logs["rlvr"]], label=key)
    c.set(title="rlvr: training reward", xlabel="step", ylim=(-0.02, 1.12))
    c.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
