"""INT8 that pays: PyTorch fp32 decode vs the decode-step ONNX graph on onnxruntime, fp32 and int8.

    python bench/int8.py [--sizes xs toddler] [--prompt-len 256] [--new-tokens 32] [--repeats 5]
                         [--train-steps 8] [--threads N] [--out reports/bench_int8.json]

Per model size: a model briefly trained (--train-steps of AdamW, batch 4 x 128) on text of this Python's
standard library (its *.py files, byte-level BPE of 4096 tokens: local, fixed for a Python version; the last
5 % of tokens held out), written as an fp32 safetensors checkpoint (the size reference), its decode-step
graph in fp32 and in int8 (hatchling/export/onnx.py). Then, side by side: batch-1 latency after a
--prompt-len prompt (prefill, and the median ms per greedy token of a run), interleaved --repeats times
(the median of the runs, their min and max), the held-out loss (4 windows of 128), greedy agreement with
PyTorch fp32 over 4 prompts x --new-tokens, and the artifact sizes. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from safetensors.torch import save_file

from hatchling.data.tokenizer import train_tokenizer
from hatchling.export.onnx import export_onnx, quantize_onnx
from hatchling.export.onnx_runtime import OnnxDecoder
from hatchling.export.stage import greedy_agreement
from hatchling.model import build_model
from hatchling.model.int8 import quantize_state_dict
from hatchling.model.lm import lm_loss, sample_batch, validation_loss

VOCAB, SEQ, BATCH = 4096, 128, 4
GOALS = {"decode_ratio": 0.6, "val_loss_delta_pct": 1.0, "size_ratio": 0.3}


def stdlib_tokens() -> np.ndarray:
    """The standard library's top-level modules as one token stream (a BPE trained on them)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    tokenizer = train_tokenizer(texts, VOCAB)
    return np.concatenate([np.array(tokenizer.encode(t).ids, dtype=np.int64) for t in texts])


def trained(size: str, train: np.ndarray, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model({"size": size, "vocab_size": VOCAB})
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    for step in range(steps):
        loss = lm_loss(model, *sample_batch(train, BATCH, SEQ, step, "cpu"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def latency(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill ms, median ms per greedy token) of one run at batch 1, timed at the tokens `model.stream`
    yields: each runtime's own decode path (PyTorch's step path where the model has one). The median over
    the run's tokens, so a burst of load from other processes moves it less than a mean."""
    t0 = time.perf_counter()
    times = [t0, *(time.perf_counter() for _ in model.stream(prompt, new_tokens))]
    return (times[1] - t0) * 1e3, float(statistics.median(np.diff(times[1:]))) * 1e3


def bench_size(size: str, tokens: np.ndarray, args, tmp: Path) -> dict:
    split = int(len(tokens) * 0.95)
    train, val = tokens[:split], tokens[split:]
    t0 = time.perf_counter()
    model = trained(size, train, args.train_steps)
    trained_s = time.perf_counter() - t0
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / f"{size}.safetensors"))
    save_file(quantize_state_dict(model), str(tmp / f"{size}.int8.safetensors"))
    fp32_graph = export_onnx(model, tmp / f"{size}.onnx")
    int8_graph = quantize_onnx(fp32_graph, tmp / f"{size}.int8.onnx")
    variants = {"torch fp32": model, "onnxruntime fp32": OnnxDecoder(fp32_graph, args.threads),
                "onnxruntime int8": OnnxDecoder(int8_graph, args.threads)}
    files = {"torch fp32": tmp / f"{size}.safetensors", "onnxruntime fp32": fp32_graph,
             "onnxruntime int8": int8_graph}
    prompts = sample_batch(val, 4, args.prompt_len, 2024, "cpu")[0]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for m in variants.values():                                      # warm-up: allocators, thread pools
        latency(m, prompts[:1, :16], 4)
    for _ in range(args.repeats):                                    # interleaved: drift hits every variant alike
        for name, m in variants.items():
            runs[name].append(latency(m, prompts[:1], args.new_tokens))
    reference = model.generate(prompts, args.new_tokens)[:, args.prompt_len:]
    rows = {}
    for name, m in variants.items():
        decode = [d for _, d in runs[name]]
        greedy = m.generate(prompts, args.new_tokens)[:, args.prompt_len:]
        rows[name] = {"bytes": files[name].stat().st_size,
                      "val_loss": validation_loss(m, val, 1, BATCH, SEQ),
                      "prefill_ms": statistics.median(p for p, _ in runs[name]),
                      "decode_ms_per_token": statistics.median(decode),
                      "decode_ms_min": min(decode), "decode_ms_max": max(decode),
                      "greedy_agreement": greedy_agreement(list(reference), list(greedy))}
    base, ort32 = rows["torch fp32"], rows["onnxruntime fp32"]
    for row in rows.values():
        row["size_ratio"] = row["bytes"] / base["bytes"]
        row["val_loss_delta_pct"] = 100 * (row["val_loss"] / base["val_loss"] - 1)
        row["decode_ratio"] = row["decode_ms_per_token"] / base["decode_ms_per_token"]
        row["decode_ratio_vs_onnxruntime_fp32"] = row["decode_ms_per_token"] / ort32["decode_ms_per_token"]
    int8 = rows["onnxruntime int8"]
    return {"params": model.num_params(), "train_steps": args.train_steps, "train_seconds": round(trained_s, 1),
            "int8_safetensors_bytes": (tmp / f"{size}.int8.safetensors").stat().st_size, "rows": rows,
            "goals": {f"{k}<={v}": int8[k] <= v for k, v in GOALS.items()}}


def cpu() -> dict:
    """The CPU's model name and the int8-relevant flags of /proc/cpuinfo (Linux; else the platform's name)."""
    path = Path("/proc/cpuinfo")
    lines = path.read_text().splitlines() if path.is_file() else []
    fields = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in lines if ":" in line)}
    return {"cpu": fields.get("model name", platform.processor() or platform.machine()),
            "flags": sorted(set(fields.get("flags", "").split()) & {"avx2", "avx512f", "avx512_vnni", "avx_vnni"})}


def table(result: dict) -> list[str]:
    lines = ["| size | runtime | artifact MB (x fp32) | val loss (delta) | greedy agreement | prefill ms "
             "| decode ms/token median [min-max] | x torch fp32 | x onnxruntime fp32 |", "|" + "---|" * 9]
    for size, r in result["sizes"].items():
        for name, row in r["rows"].items():
            lines.append(f"| {size} | {name} | {row['bytes'] / 1e6:.1f} ({row['size_ratio']:.3f}) "
                         f"| {row['val_loss']:.4f} ({row['val_loss_delta_pct']:+.2f} %) "
                         f"| {100 * row['greedy_agreement']:.0f} % | {row['prefill_ms']:.0f} "
                         f"| {row['decode_ms_per_token']:.2f} [{row['decode_ms_min']:.2f}-{row['decode_ms_max']:.2f}] "
                         f"| {row['decode_ratio']:.2f} | {row['decode_ratio_vs_onnxruntime_fp32']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["xs", "toddler"])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: torch's)")
    ap.add_argument("--out", default="reports/bench_int8.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = stdlib_tokens()
    result = {"machine": {**cpu(), "threads": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "command": " ".join(sys.argv),
              "data": f"{len(tokens)} tokens of the Python {platform.python_version()} standard library",
              "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            result["sizes"][size] = bench_size(size, tokens, args, Path(tmp))
            print(f"{size}: done", file=sys.stderr)
    print("\n".join(table(result)))
    for size, r in result["sizes"].items():
        print(f"{size} ({r['params']:,} parameters, {r['train_steps']} training steps): onnxruntime int8 goals "
              + ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in r["goals"].items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
