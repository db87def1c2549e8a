"""KDA fwd+bwd timing: our recurrent and chunked forms, fla's pure-PyTorch naive kernels (loaded
by file path, no Triton needed), and on CUDA fla's Triton ``chunk_kda`` and SDPA flash attention.

    python bench/kda.py [--fla-naive PATH/TO/fla/ops/kda/naive.py] [--out reports/bench_kda.json]

Prints a table and writes JSON. Without --fla-naive it looks for an installed fla-core.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hatchling.model.kda import fla_available, kda_chunked, kda_recurrent

CPU_SHAPES = [(1, 1024, 4, 64), (1, 512, 4, 64), (2, 2048, 2, 64)]
GPU_SHAPES = [(8, 2048, 8, 64), (2, 8192, 8, 64)]


def load_fla_naive(path: str | None):
    if path is None:
        spec = importlib.util.find_spec("fla")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = str(Path(next(iter(spec.submodule_search_locations))) / "ops" / "kda" / "naive.py")
    spec = importlib.util.spec_from_file_location("fla_kda_naive", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(B, T, H, D, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, T, H, D, generator=gen)
    k = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1)
    v = torch.randn(B, T, H, D, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, D, generator=gen) * 3)
    beta = torch.rand(B, T, H, generator=gen)
    cast = [x.to(device=device, dtype=dtype) for x in (q, k, v)] + [x.to(device) for x in (g, beta)]
    return [x.requires_grad_() for x in cast]


def time_fwd_bwd(fn, xs, repeats: int, device: str) -> float:
    """Best wall time of fwd + bwd over `repeats` runs after one warm-up."""
    best = float("inf")
    for i in range(repeats + 1):
        for x in xs:
            x.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        o = fn(*xs)
        o = o[0] if isinstance(o, tuple) else o
        o.float().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def sdpa(q, k, v, g, beta):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fla-naive", help="path of fla/ops/kda/naive.py (fla-core 0.6.0)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="reports/bench_kda.json")
    args = ap.parse_args()
    naive = load_fla_naive(args.fla_naive)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = {"hatchling.kda_recurrent": kda_recurrent, "hatchling.kda_chunked": kda_chunked}
    if naive is not None:
        impls["fla.naive_recurrent_kda"] = naive.naive_recurrent_kda
    if device == "cuda":
        impls.pop("hatchling.kda_recurrent")
        impls.pop("fla.naive_recurrent_kda", None)
        if fla_available():
            from fla.ops.kda import chunk_kda
            impls["fla.chunk_kda"] = lambda *xs: chunk_kda(*xs)
        impls["sdpa_flash_attention"] = sdpa
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    dtypes = [torch.bfloat16, torch.float32] if device == "cuda" else [torch.float32]
    rows = []
    for B, T, H, D in shapes:
        for dtype in dtypes:
            for name, fn in impls.items():
                slow = name.endswith("recurrent_kda") or name.endswith("kda_recurrent")
                if slow and (B, T, H, D) != shapes[0]:
                    continue  # the token loops are timed on the headline shape only
                xs = inputs(B, T, H, D, device, dtype)
                ms = 1e3 * time_fwd_bwd(fn, xs, 2 if slow else args.repeats, device)
                rows.append(dict(impl=name, B=B, T=T, H=H, D=D, dtype=str(dtype).split(".")[-1], ms=ms))
    base = {(r["B"], r["T"], r["dtype"]): r["ms"] for r in rows if r["impl"] == "fla.naive_recurrent_kda"}
    for r in rows:
        ref = base.get((r["B"], r["T"], r["dtype"]))
        r["speedup_vs_fla_naive_recurrent"] = round(ref / r["ms"], 2) if ref else None
    print(f"{'impl':28} {'shape (B,T,H,D)':18} {'dtype':9} {'fwd+bwd ms':>11} {'vs fla naive':>12}")
    for r in rows:
        sp = r["speedup_vs_fla_naive_recurrent"]
        print(f"{r['impl']:28} {str((r['B'], r['T'], r['H'], r['D'])):18} {r['dtype']:9} {r['ms']:11.1f} "
              f"{(f'{sp:.1f}x' if sp else '-'):>12}")
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
