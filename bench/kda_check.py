"""KDA agreement check across implementations: outputs, final state and gradients.

    python bench/kda_check.py [--fla-naive PATH/TO/fla/ops/kda/naive.py] [--out reports/kda_check.json]

On CPU it compares kda_chunked (and fla's naive kernel, when given) with kda_recurrent in
float64 and float32. On CUDA with fla installed (the ``gpu`` extra) it compares fla's Triton
``chunk_kda`` (inputs in bf16 and in fp32) with kda_chunked computed in float64, at a size and in
bf16 that the CI test of the same kernels under Triton's CPU interpreter (tests/test_kda_fla.py:
float32, T <= 70) cannot reach. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from kda import load_fla_naive  # bench/kda.py, beside this file

from hatchling.model.kda import fla_available, kda_chunked, kda_recurrent

NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dbeta")


def make_inputs(B, T, H, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen)
    k = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1)
    v = torch.randn(B, T, H, D, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, D, generator=gen) * 2)
    beta = torch.rand(B, T, H, generator=gen)
    s0 = torch.randn(B, H, D, D, generator=gen)
    return [q, k, v, g, beta], s0


def run(fn, xs, s0, device, dtype):
    """Outputs, final state and input gradients of a fixed weighted loss, as float64 on CPU."""
    gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32   # g and beta stay >= fp32
    leaves = [x.detach().to(device=device, dtype=dtype if i < 3 else gate_dtype).clone().requires_grad_()
              for i, x in enumerate(xs)]
    o, s = fn(*leaves, initial_state=s0.to(device=device, dtype=gate_dtype), output_final_state=True)
    w = torch.linspace(-1, 1, o.numel(), device=device).view_as(o)
    ((o.float() * w).sum() + s.float().sum()).backward()
    return [t.detach().double().cpu() for t in (o, s, *(x.grad for x in leaves))]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fla-naive", help="path of fla/ops/kda/naive.py to compare as well")
    ap.add_argument("--out", default="reports/kda_check.json")
    args = ap.parse_args()
    rows = []
    if torch.cuda.is_available():
        xs, s0 = make_inputs(2, 1000, 4, 64)
        ref = run(kda_chunked, [x.double() for x in xs], s0.double(), "cpu", torch.float64)
        candidates = [("kda_chunked", kda_chunked, torch.float32)]
        if fla_available():
            from fla.ops.kda import chunk_kda
            candidates += [("fla.chunk_kda", chunk_kda, torch.float32), ("fla.chunk_kda", chunk_kda, torch.bfloat16)]
        device = "cuda"
    else:
        xs, s0 = make_inputs(2, 257, 2, 32)
        ref = run(kda_recurrent, [x.double() for x in xs], s0.double(), "cpu", torch.float64)
        candidates = [("kda_chunked", kda_chunked, torch.float64), ("kda_chunked", kda_chunked, torch.float32)]
        if args.fla_naive:
            naive = load_fla_naive(args.fla_naive)
            candidates.append(("fla.naive_recurrent_kda", naive.naive_recurrent_kda, torch.float32))
        device = "cpu"
    for name, fn, dtype in candidates:
        errs = [rel(a, b) for a, b in zip(run(fn, xs, s0, device, dtype), ref, strict=True)]
        rows.append({"impl": name, "dtype": str(dtype).split(".")[-1], **dict(zip(NAMES, errs, strict=True))})
    print(f"{'impl':26} {'dtype':9} " + " ".join(f"{n:>11}" for n in NAMES))
    for r in rows:
        print(f"{r['impl']:26} {r['dtype']:9} " + " ".join(f"{r[n]:11.2e}" for n in NAMES))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "reference": "float64", "rows": rows}, indent=2))
    print(f"wrote {args.out} (relative L2 errors vs the float64 reference)")


if __name__ == "__main__":
    main()
