"""Packed documents in KDA, fwd+bwd: the chunked form with segment_ids (masked inside its chunks,
what the layer runs), the per-sequence reference it replaced (each document a row of its own,
padded to the longest: `kda(..., cu_seqlens=...)` on the PyTorch paths), and no packing at all.

    python bench/packed_kda.py [--repeats 5] [--out reports/bench_packed_kda.json]

Shapes are SFT's windows on the toddler: [16, 128] tokens, 2 heads of 64, documents ~40 tokens
(a chat) cut at random. Prints a table (median and spread over interleaved repeats) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hatchling.model.kda import cu_seqlens_of, kda
from hatchling.model.segments import Segments


def inputs(B: int, T: int, H: int, D: int, mean_doc: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, T, H, D, generator=gen), F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1),
          torch.randn(B, T, H, D, generator=gen), F.logsigmoid(torch.randn(B, T, H, D, generator=gen)),
          torch.rand(B, T, H, generator=gen)]
    starts = torch.rand(B, T, generator=gen) < 1 / mean_doc
    ids = Segments.from_starts(starts).ids
    return xs, ids, cu_seqlens_of(ids)


def fwd_bwd(run, xs) -> float:
    leaves = [x.clone().requires_grad_() for x in xs]
    t0 = time.perf_counter()
    run(leaves)[0].sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="reports/bench_packed_kda.json")
    args = ap.parse_args()
    B, T, H, D = 16, 128, 2, 64
    xs, ids, cu = inputs(B, T, H, D, mean_doc=40)
    forms = {
        "unpacked (no documents)": lambda leaves: kda(*leaves, backend="chunked"),
        "segment_ids (masked chunks)": lambda leaves: kda(*leaves, backend="chunked", segment_ids=ids),
        "cu_seqlens (a row per document)": lambda leaves: kda(
            *(x.reshape(1, B * T, *x.shape[2:]) for x in leaves), backend="chunked", cu_seqlens=cu),
    }
    for run in forms.values():                      # warm-up
        fwd_bwd(run, xs)
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.repeats):                   # interleaved: a noisy machine hits every form alike
        for name, run in forms.items():
            times[name].append(fwd_bwd(run, xs))
    base = statistics.median(times["unpacked (no documents)"])
    rows = [{"form": name, "median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "max_ms": 1e3 * max(t),
             "vs_unpacked": statistics.median(t) / base} for name, t in times.items()]
    print(f"KDA fwd+bwd, [B, T, H, D] = {[B, T, H, D]}, {len(cu) - 1} documents, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats")
    print("| form | median ms | min–max ms | × unpacked |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['form']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}–{r['max_ms']:.1f} | {r['vs_unpacked']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": [B, T, H, D], "documents": len(cu) - 1, "threads": torch.get_num_threads(),
                               "machine": platform.processor() or platform.machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
