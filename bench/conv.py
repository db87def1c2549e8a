"""The KDA layer's q|k|v conv, forward + backward on the CPU: :class:`~hatchling.model.kda_layer.ConvOverTime` (its
backward written out) against autograd through the same conv (mkldnn's backward), side by side.

    python bench/conv.py [--shapes 4x1024x384 1x4096x384 4x1024x1536 1x4096x1536 16x128x384]
                         [--repeats 7] [--threads N] [--out reports/bench_conv.json]

A shape is B x T x C: the toddler's q|k|v is C = 384 and xs's 1536; 4 x 1024 and 1 x 4096 are
bench/train_throughput.py's 4,096 tokens a step, 16 x 128 SFT's. Each round times both forms once per shape,
one after the other (interleaved, so the machine's load hits both alike); a row gives the median over the rounds,
the min-max spread and the speedup taken within each round, and the largest difference of the gradients.
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from hatchling.model.kda_layer import ConvOverTime, _conv_over_time
from hatchling.stats import spread

WIDTH = 4           # the layers' conv_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["4x1024x384", "1x4096x384", "4x1024x1536", "1x4096x1536",
                                                     "16x128x384"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's")
    ap.add_argument("--out", default="reports/bench_conv.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    cases = []
    for shape in args.shapes:
        B, T, C = (int(n) for n in shape.split("x"))
        x = torch.randn(B, T + WIDTH - 1, C, generator=gen)
        cases.append((shape, x, torch.randn(C, WIDTH, generator=gen), torch.randn(B, T, C, generator=gen)))

    forms = {"autograd": _conv_over_time, "by_hand": ConvOverTime.apply}

    def run(form, x, taps, dy):
        x, taps = x.clone().requires_grad_(), taps.clone().requires_grad_()
        torch.autograd.backward(forms[form](x, taps), dy)
        return x.grad, taps.grad

    times = {(shape, form): [] for shape, *_ in cases for form in forms}
    diffs = {}
    for shape, x, taps, dy in cases:             # warm up, and the two forms' gradients side by side
        ref, ours = run("autograd", x, taps, dy), run("by_hand", x, taps, dy)
        diffs[shape] = max(float((a - b).abs().max()) for a, b in zip(ref, ours, strict=True))
    for _ in range(args.repeats):
        for shape, x, taps, dy in cases:
            for form in forms:
                start = time.perf_counter()
                run(form, x, taps, dy)
                times[shape, form].append(1e3 * (time.perf_counter() - start))

    rows = []
    print(f"threads={torch.get_num_threads()}  torch={torch.__version__}  loadavg={os.getloadavg()}")
    print(f"{'B x T x C':>12} | {'autograd ms':>22} | {'by hand ms':>22} | {'speedup':>20} | max |grad diff|")
    for shape, *_ in cases:
        ref, ours = times[shape, "autograd"], times[shape, "by_hand"]
        row = {"shape": shape, "autograd_ms": spread(ref), "by_hand_ms": spread(ours),
               "speedup": spread([a / b for a, b in zip(ref, ours, strict=True)]), "max_grad_diff": diffs[shape]}
        rows.append(row)
        fmt = "{median} ({min}-{max})".format
        print(f"{shape:>12} | {fmt(**row['autograd_ms']):>22} | {fmt(**row['by_hand_ms']):>22} | "
              f"{fmt(**row['speedup']):>20} | {diffs[shape]:.1e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                          "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
