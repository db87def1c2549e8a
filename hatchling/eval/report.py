"""The report card: one row per task × metric, one column per checkpoint (like nanochat's), the
probe table, and a plot of probe accuracy against length."""

from __future__ import annotations

from pathlib import Path

from hatchling.io import atomic_path


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "—"
    low, high = entry["ci"]
    text = f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]" + (" ≈" if entry["at_chance"] else "")
    if "clean" in entry:
        text += f"; clean {entry['clean']['value']:.3f} (n {entry['clean']['n']})"
    return text


def markdown(report: dict) -> str:
    ckpts = report["checkpoints"]
    lines = ["# Eval report card", "",
             "Each score: value [95% interval] (Wilson's for a proportion, else ± 1.96 standard errors); "
             "≈ marks a score whose interval contains the chance level. *found*: scored items that the dedup stage "
             "found in the training data; where there are any, the score on the clean rest follows the full one.",
             "", "| task | metric | n | chance | found | " + " | ".join(ckpts) + " |",
             "|---|---|---|---|---|" + "---|" * len(ckpts)]
    lines += [f"| {r['task']} | {r['metric']} | {r['n']} | {r['chance']:.3f} | {r['found']} | "
              + " | ".join(_cell(r.get(c)) for c in ckpts) + " |" for r in report["rows"]]
    if report["not_run"]:
        lines += ["", "## Not run", ""] + [f"- {task}: {why}" for task, why in report["not_run"].items()]
    lines += ["", "## Long-range probes (accuracy of the target tokens, teacher-forced)", "",
              "| probe | length | chance | " + " | ".join(ckpts) + " |", "|---|---|---|" + "---|" * len(ckpts)]
    first = report["probes"][ckpts[0]]
    for probe, by_length in first.items():
        if probe == "chance":
            continue
        level = first["chance"].get(probe)
        for length in by_length:
            lines.append(f"| {probe} | {length} | {'—' if level is None else f'{level:.3f}'} | "
                         + " | ".join(f"{report['probes'][c][probe][length]:.3f}" for c in ckpts) + " |")
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


def plot_probes(report: dict, path: Path) -> None:
    """Accuracy vs length (log scale), one panel per probe, one line per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = [p for p in report["probes"][report["checkpoints"][0]] if p != "chance"]
    fig, axes = plt.subplots(1, len(probes), figsize=(3.2 * len(probes), 3), squeeze=False)
    for ax, probe in zip(axes[0], probes, strict=True):
        for ckpt in report["checkpoints"]:
            by_length = report["probes"][ckpt][probe]
            ax.plot([int(n) for n in by_length], list(by_length.values()), marker="o", label=ckpt)
        level = report["probes"][report["checkpoints"][0]]["chance"].get(probe)
        if level is not None:
            ax.axhline(level, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(probe)
        ax.set_xlabel("length")
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
