"""Batch-1 greedy decode speed: the step path (``model.decoder``), eager and compiled, vs its reference
(forward with a cache), after a prompt of C tokens, and the memory bandwidth that bounds a large
model's step.

    python bench/decode.py                                   # toddler and xs, C = 256 and 2048, 1 thread
    python bench/decode.py --sizes toddler --contexts 256 --tokens 64 --repeats 3 --json /tmp/d.json

Each (size, context) is prefilled once; each repeat then decodes --tokens tokens from a copy of that
cache, argmax fed back, as ``hatchling.model.generate.stream`` does (``step_function``), through
each path in turn (interleaved, so the machine's load hits them alike). Rows give the median
ms/token over the repeats and their min-max spread, tokens/s from the median, and each step path vs
the reference. The compiled path (``model.decoder(..., compiled=True)``: torch.compile) is compiled
for each (size, context) before the repeats; the time that took, with its first step, is its
``compile_s`` (less when inductor's on-disk cache already holds the graph). The ``weights_*`` rows are no
way to decode: the fast step's weight matmuls alone (``Decoder.weights``), back to back on fixed random
rows, as a token reads them: the least the eager step can cost on the machine, everything between its
matmuls free; ``weights_plain`` with each weight as one matrix (x @ W), ``weights_blocks`` in a block of
rows per thread (``StepWeight``'s two layouts). The fast step holds them as ``kda.step_weight_parts``
says for the CPU (by its vendor; printed and in the JSON as ``step_weights``): these two rows check that
choice on the machine.

Memory bandwidth: a copy of a 1 GiB float32 tensor (beyond the 260 MiB L3 of the CPU machine),
counting bytes read and written, and a read-only pass (a sum) over it, once per repeat between the
decode rows. A size's "weights stream time" is its parameter bytes over the median bandwidth (one
full read of every weight, the least one batch-1 step must read: the tied head reads the whole
embedding); the ratio is a step path's median ms/token over it. Threads: --threads (default 1,
torch.set_num_threads; the bandwidth too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from hatchling.model import build_model
from hatchling.model.generate import step_function
from hatchling.model.kda import StepWeight, cpu_vendor, row_blocks, step_weight_parts
from hatchling.stats import spread

PATHS = ("reference", "fast", "compiled", "weights_plain", "weights_blocks")


def bandwidth(src: torch.Tensor, dst: torch.Tensor) -> tuple[float, float]:
    """GB/s of one copy src -> dst (bytes read + written) and of one sum over src (bytes read)."""
    nbytes = src.numel() * src.element_size()
    t0 = time.perf_counter()
    dst.copy_(src)
    t1 = time.perf_counter()
    src.sum()
    t2 = time.perf_counter()
    return 2 * nbytes / (t1 - t0) / 1e9, nbytes / (t2 - t1) / 1e9


def decoding_step(model, cache: list[dict], context: int, tokens: int, path: str):
    """`path`'s step for `tokens` tokens after `context`, continuing a copy of a prefilled cache, batch 1."""
    cache = [dict(c) for c in cache]                                # the reference replaces, never mutates
    step = step_function(model, cache, 1, context + tokens, torch.device("cpu"), fast=path != "reference",
                         compiled=path == "compiled")
    if path.startswith("weights_"):
        return weights_alone(step, 1 if path == "weights_plain" else row_blocks())
    return step


def weights_alone(decoder, parts: int):
    """ids -> the head's output from a fixed random row: the decoder's weights alone, in the order a step reads
    them, each in `parts` blocks of rows (StepWeight's; 1: x @ W) on a row of its input size (`weights_*`)."""
    weights = [StepWeight(w.matrix().contiguous(), parts) for w in decoder.weights()]
    rows = [torch.randn(1, w.n_in) for w in weights]

    @torch.inference_mode()
    def step(ids: torch.Tensor) -> torch.Tensor:
        for w, x in zip(weights, rows, strict=True):
            y = w(x)
        return y

    return step


@torch.no_grad()
def first_step_s(model, cache: list[dict], context: int, tokens: int, path: str) -> float:
    """Seconds to build `path`'s step and take its first step (a compiled one's compiling)."""
    t0 = time.perf_counter()
    decoding_step(model, cache, context, tokens, path)(torch.zeros(1, dtype=torch.long))
    return time.perf_counter() - t0


@torch.no_grad()
def decode_ms(model, cache: list[dict], context: int, tokens: int, path: str) -> float:
    """ms per token of `tokens` greedy steps of `path` continuing a copy of a prefilled cache, batch 1."""
    step = decoding_step(model, cache, context, tokens, path)
    token = torch.zeros(1, dtype=torch.long)
    t0 = time.perf_counter()
    for _ in range(tokens):
        token = step(token).argmax(-1)
    return (time.perf_counter() - t0) * 1e3 / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["toddler", "xs"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--vocab-size", type=int, default=4096, help="the pipeline tokenizer's (params.yaml)")
    ap.add_argument("--tokens", type=int, default=128, help="decoded tokens per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bandwidth-gib", type=float, default=1.0)
    ap.add_argument("--json", default="reports/bench_decode.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    models, caches = {}, {}
    for size in args.sizes:
        torch.manual_seed(0)
        models[size] = build_model({"size": size, "vocab_size": args.vocab_size}).eval()
        for context in args.contexts:
            cache = models[size].new_cache()
            with torch.no_grad():
                models[size](torch.randint(0, args.vocab_size, (1, context)), cache)
            caches[size, context] = cache
    compile_s = {(size, context): first_step_s(models[size], cache, context, args.tokens, "compiled")
                 for (size, context), cache in caches.items()}    # compiled once per shape, reused after
    src = torch.ones(int(args.bandwidth_gib * 2**30) // 4)
    dst = torch.empty_like(src)
    bandwidth(src, dst)                                             # touches every page once
    times: dict[tuple, list[float]] = {}
    bw_runs = []
    for _ in range(args.repeats):                                   # interleaved: every row once per repeat
        for (size, context), cache in caches.items():
            for path in PATHS:
                times.setdefault((size, context, path), []).append(
                    decode_ms(models[size], cache, context, args.tokens, path))
        bw_runs.append(bandwidth(src, dst))
    bw = {f"{kind}_gb_s": spread([run[i] for run in bw_runs], 2) for i, kind in enumerate(("copy", "read"))}

    rows = []
    for (size, context, path), ms in times.items():
        row = {"size": size, "params": models[size].num_params(), "context": context, "path": path,
               **spread(ms, 3, "ms_per_token"), "tokens_per_s": round(1e3 / statistics.median(ms), 1)}
        if path == "compiled":
            row["compile_s"] = round(compile_s[size, context], 1)
        if path in ("fast", "compiled"):
            row["vs_reference"] = round(statistics.median(times[size, context, "reference"]) / statistics.median(ms), 2)
        if path != "reference":
            weight_bytes = sum(p.numel() * p.element_size() for p in models[size].parameters())
            for kind in ("copy", "read"):
                stream_ms = weight_bytes / (bw[f"{kind}_gb_s"]["median"] * 1e9) * 1e3
                row[f"weights_stream_ms_{kind}"] = round(stream_ms, 3)
                row[f"vs_stream_{kind}"] = round(statistics.median(ms) / stream_ms, 2)
        rows.append(row)

    step_weights = "plain" if step_weight_parts(torch.device("cpu")) == 1 else "blocks"
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}; "
          f"the fast step's weights on this CPU ({cpu_vendor() or 'vendor unknown'}): {step_weights}")
    copy, read = bw["copy_gb_s"], bw["read_gb_s"]
    print(f"memory bandwidth ({args.bandwidth_gib} GiB), median (min-max) GB/s: copy (read + write) "
          f"{copy['median']} ({copy['min']}-{copy['max']}), read {read['median']} ({read['min']}-{read['max']})")
    header = ["size", "context", "path", "ms/token (min-max)", "tokens/s", "vs ref", "x stream (copy/read)",
              "compile s"]
    print(" | ".join(header))
    for r in rows:
        ms = f"{r['ms_per_token']:.3f} ({r['min']:.3f}-{r['max']:.3f})"
        ratio = f"{r['vs_stream_copy']}/{r['vs_stream_read']}" if "vs_stream_copy" in r else ""
        print(" | ".join(str(c) for c in (r["size"], r["context"], r["path"], ms, r["tokens_per_s"],
                                          r.get("vs_reference", ""), ratio, r.get("compile_s", ""))))
    out = {"machine": platform.processor() or platform.machine(), "vendor": cpu_vendor(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "threads": args.threads, "step_weights": step_weights,
           "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
           "args": vars(args), "bandwidth": bw, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
