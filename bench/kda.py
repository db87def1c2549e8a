"""KDA fwd+bwd timing: our recurrent and chunked forms, fla's pure-PyTorch naive kernels (loaded
by file path, no Triton needed), and on CUDA fla's Triton ``chunk_kda`` and SDPA flash attention.

    python bench/kda.py [--fla-naive PATH/TO/fla/ops/kda/naive.py] [--repeats 5] [--threads 1]

Each repeat is a round that times one fwd + bwd of every (shape, impl) in turn (interleaved, so a
shared machine's load hits each alike), after one warm-up round. Rows give the median ms and the
min-max spread over the rounds; the speedup over fla's naive recurrent kernel is taken within each
round (same shape and dtype), and its median and min-max follow. Prints a table and writes JSON
(--out). Without --fla-naive it looks for an installed fla-core.

The gates are log-sigmoids of N(0, 9) draws ("init"); on the CPU the chunked form is also timed with
one channel in 32 six times as strong ("trained": 3 % of the 32-token chunk-channels span more than
2 SAFE_SPAN and take the exact pairs, as in the default pipeline's trained checkpoints: 0-2.8 % per
layer on validation text, up to 8 % past SAFE_SPAN, where a chunk's largest span reached 113-415).
--baseline REV adds git revision REV's chunked form (its hatchling/model/kda.py, loaded by file path:
it imports torch only) on the same inputs, in the same rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hatchling.model.kda import fla_available, kda_chunked, kda_recurrent
from hatchling.stats import spread

CPU_SHAPES = [(1, 1024, 4, 64), (1, 512, 4, 64), (2, 2048, 2, 64)]
GPU_SHAPES = [(8, 2048, 8, 64), (2, 8192, 8, 64)]


def load_module(path: str | Path, name: str):
    """The Python file at `path` as a module (no package import needed)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_fla_naive(path: str | None):
    if path is None:
        spec = importlib.util.find_spec("fla")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = str(Path(next(iter(spec.submodule_search_locations))) / "ops" / "kda" / "naive.py")
    return load_module(path, "fla_kda_naive")


def load_baseline(rev: str):
    """git revision `rev`'s hatchling/model/kda.py as a module (it imports torch only)."""
    repo = Path(__file__).resolve().parents[1]
    text = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:hatchling/model/kda.py"], capture_output=True)
    if text.returncode:
        sys.exit(f"--baseline {rev}: git show failed: {text.stderr.decode().strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kda_baseline.py"
        path.write_bytes(text.stdout)
        return load_module(path, "kda_baseline")


def inputs(B, T, H, D, device, dtype, trained_gates: bool = False):
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, T, H, D, generator=gen)
    k = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1)
    v = torch.randn(B, T, H, D, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, D, generator=gen) * 3)
    if trained_gates:
        g[..., ::32] *= 6
    beta = torch.rand(B, T, H, generator=gen)
    cast = [x.to(device=device, dtype=dtype) for x in (q, k, v)] + [x.to(device) for x in (g, beta)]
    return [x.requires_grad_() for x in cast]


def time_fwd_bwd(fn, xs, device: str) -> float:
    """Wall seconds of one fwd + bwd."""
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
    return time.perf_counter() - t0


def sdpa(q, k, v, g, beta):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fla-naive", help="path of fla/ops/kda/naive.py (fla-core 0.6.0)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds after one warm-up round")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default: torch's")
    ap.add_argument("--baseline", metavar="REV", help="also time git revision REV's kda_chunked")
    ap.add_argument("--out", default="reports/bench_kda.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    naive = load_fla_naive(args.fla_naive)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = {"hatchling.kda_recurrent": kda_recurrent, "hatchling.kda_chunked": kda_chunked}
    if args.baseline:
        impls[f"kda_chunked@{args.baseline}"] = load_baseline(args.baseline).kda_chunked
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
    cases = []                                   # the token loops are timed on the headline shape only
    gates = ["init"] + (["trained"] if device == "cpu" else [])
    for B, T, H, D in shapes:
        for dtype in dtypes:
            for gate, (name, fn) in itertools.product(gates, impls.items()):
                if name.endswith(("recurrent_kda", "kda_recurrent")) and ((B, T, H, D) != shapes[0] or gate != "init"):
                    continue
                row = dict(impl=name, B=B, T=T, H=H, D=D, dtype=str(dtype).split(".")[-1], gates=gate)
                cases.append((row, fn, inputs(B, T, H, D, device, dtype, gate == "trained")))
    load_before = os.getloadavg()
    times = {id(row): [] for row, _, _ in cases}
    for i in range(args.repeats + 1):
        for row, fn, xs in cases:
            seconds = time_fwd_bwd(fn, xs, device)
            if i:
                times[id(row)].append(seconds * 1e3)
    rows = [row for row, _, _ in cases]
    base = {(r["B"], r["T"], r["dtype"]): times[id(r)] for r in rows if r["impl"] == "fla.naive_recurrent_kda"}
    for r in rows:                                          # fla's naive kernel costs the same at any gates
        ref = base.get((r["B"], r["T"], r["dtype"]))
        r["ms"] = spread(times[id(r)], 2)
        r["speedup_vs_fla_naive_recurrent"] = spread([a / b for a, b in zip(ref, times[id(r)], strict=True)], 2) \
            if ref else None
    print(f"{'impl':26} {'B, T, H, D':18} {'dtype':8} {'gates':7} {'fwd+bwd ms: median (min-max)':>30} "
          f"{'vs fla naive: median (min-max)':>31}")
    for r in rows:
        ms, sp = r["ms"], r["speedup_vs_fla_naive_recurrent"]
        sp_text = f"{sp['median']:.1f}x ({sp['min']:.1f}-{sp['max']:.1f})" if sp else "-"
        print(f"{r['impl']:26} {str((r['B'], r['T'], r['H'], r['D'])):18} {r['dtype']:8} {r['gates']:7} "
              f"{ms['median']:>11.1f} ({ms['min']:.1f}-{ms['max']:.1f}){'':>4} {sp_text:>31}")
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), repeats=args.repeats,
                loadavg_before=load_before, loadavg_after=os.getloadavg())
    print("  ".join(f"{k}={v}" for k, v in meta.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
