"""Training and decoding throughput of the hybrid vs a same-size GPT, and the KDA layer vs its raw op.

    python bench/train_throughput.py                       # the H100 run: xs, T = 2k/8k/16k, decode 4k/32k
    python bench/train_throughput.py --size toddler xs --vocab-size 4096 --seq 1024 4096 \\
        --tokens-per-step 4096 --decode-context --steps 1 --threads 1   # the CPU run in docs/benchmarks.md

The GPT is ``arch: gpt`` (RoPE GQA attention through SDPA in every layer, the same SwiGLU blocks)
with its MLP widened until its parameter count matches the hybrid's (``hatchling.model.sizing.matched``,
to a multiple of 64 hidden units), so the comparison is at equal size. On CUDA: bf16 autocast, fused AdamW, fla's
``chunk_kda`` for KDA (when installed) and SDPA's flash kernel for attention.

The process keeps the memory it frees for its next allocations (``keep_freed_memory``, as a pipeline
stage's process does; --malloc-default leaves glibc's malloc as it is: the hybrid's step then maps
and faults in its large temporaries anew each time).

Every measurement is built once and then taken --repeats times, in rounds that visit all of them in
turn (interleaved, so a shared machine's load hits each alike); a row gives the median over the rounds
and the min-max spread, and each ratio is taken within a round (hybrid and GPT back to back) first.

Rows (printed as a table, written as JSON):
- train: tokens/s of forward + backward + AdamW step at each T (the median of --steps steps per
  round), with the same tokens per step (batch = tokens / T); peak memory; MFU = model FLOPs/s /
  --peak-tflops (989: H100 SXM, bf16 dense). Model FLOPs per token = 6 x parameters in matmuls (tied
  head included, embedding lookup not) + 6 x T x H x Dh per softmax-attention layer (causal scores
  and values). The KDA recurrence's own FLOPs are not counted, so the hybrid's MFU is a lower bound.
- decode: batch-1 tokens/s after a prefill of C tokens (forward with a cache), the cache's bytes and,
  on CUDA, the peak memory while decoding.
- kda_layer: fwd + bwd of a whole KDALayer (projections, convs, gates, norms) vs the raw op
  ``hatchling.model.kda.kda`` (fla's ``chunk_kda`` on CUDA) on the layer's shapes, back to back; the
  op's inputs are the layer's own (normalised q, k, its decay gates and beta at init), since the chunked
  form's cost depends on the decay spans (chunk-channels past 2 ``SAFE_SPAN`` take exact pairs:
  ``hatchling.model.kda.chunk_scores``). Beside them the layer's matmuls alone: fwd + bwd of its
  weights (the six input projections as the layer's one matmul, the two second low-rank factors, the
  output projection) on inputs of their shapes, which no fusion of the rest removes. Ratios per round:
  layer / op, (op + matmuls) / op (the floor of layer / op for this op on this machine) and
  layer / (op + matmuls) (what the convs, gates, norms and copies add).
- bound: per T, hybrid / GPT training tokens/s were the hybrid's KDA layers cheaper, from the same round's
  times: with the op free (the hybrid's step less its KDA layers' op time) and with each KDA layer costing
  its matmuls alone (less layer - matmuls): how far a faster op, or any fusion around it, could take the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hatchling.malloc import keep_freed_memory
from hatchling.model import ModelConfig, build_model
from hatchling.model.kda import fla_available, kda, kda_gate, l2norm
from hatchling.model.kda_layer import KDALayer
from hatchling.model.sizing import matched
from hatchling.stats import spread


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None


def flops_per_token(model, cfg: ModelConfig, seq: int) -> float:
    matmul_params = model.num_params() - sum(p.numel() for n, p in model.named_parameters()
                                             if n.endswith("norm.weight"))     # the tied head counts once
    attn_layers = sum(kind == "attn" for kind in cfg.layer_kinds())
    return 6 * matmul_params + attn_layers * 6 * seq * cfg.n_heads * cfg.head_dim


def train_bench(name: str, model_cfg: dict, seq: int, args, device: torch.device):
    """(the row's fixed fields, measure() -> {"tokens_per_s": ...} for one round) of training at T = seq."""
    torch.manual_seed(0)
    cfg = ModelConfig(**model_cfg)
    model = build_model(cfg).to(device).train()
    batch = max(1, args.tokens_per_step // seq)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def measure() -> dict:
        peak_reset(device)
        tokens_per_s = batch * seq / timed(step, device, args.steps)
        out = {"tokens_per_s": tokens_per_s}
        if device.type == "cuda":
            out |= {"peak_mib": peak_mib(device),
                    "mfu": tokens_per_s * flops_per_token(model, cfg, seq) / (args.peak_tflops * 1e12)}
        return out

    for _ in range(args.warmup):
        step()
    return {"kind": "train", "size": cfg.size, "model": name, "params": model.num_params(), "seq": seq,
            "batch": batch}, measure


def decode_bench(name: str, model_cfg: dict, context: int, args, device: torch.device):
    """(fixed fields, measure() for one round) of batch-1 decoding after a prefill of `context` tokens."""
    torch.manual_seed(0)
    cfg = ModelConfig(**model_cfg)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, context), device=device)
    fixed = {"kind": "decode", "size": cfg.size, "model": name, "context": context}

    @torch.no_grad()
    def measure() -> dict:
        cache = model.new_cache()
        peak_reset(device)
        model(prompt, cache)
        token = prompt[:, -1:]
        peak_reset(device)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.decode_tokens):
            token = model(token, cache)[:, -1:].argmax(-1)
        sync(device)
        seconds = time.perf_counter() - t0
        fixed["cache_mib"] = round(sum(t.numel() * t.element_size() for c in cache for t in c.values()) / 2**20, 2)
        return {"tokens_per_s": args.decode_tokens / seconds} | ({"peak_mib": peak_mib(device)}
                                                                  if device.type == "cuda" else {})

    return fixed, measure


def kda_layer_bench(model_cfg: dict, seq: int, args, device: torch.device):
    """(fixed fields, measure() for one round) of a KDALayer's fwd + bwd and the raw op's, back to back."""
    torch.manual_seed(0)
    cfg = ModelConfig(**model_cfg)
    B, H, D = max(1, args.tokens_per_step // seq), cfg.n_heads, cfg.head_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = KDALayer(cfg).to(device)
    x = torch.randn(B, seq, cfg.d_model, device=device, requires_grad=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def layer_step():
        with autocast:
            y = layer(x)
        y.float().sum().backward()

    # The op's inputs as the layer makes them (less the conv): on the CPU its cost depends on the gates' decay spans.
    with torch.no_grad():
        q, k, v = (l2norm(proj(x).view(B, seq, H, D)) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
        g = kda_gate(layer.f_proj(x).view(B, seq, H, D), layer.A_log, layer.dt_bias)
        beta = torch.sigmoid(layer.b_proj(x))
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v, g, beta)]

    def op_step():
        o, _ = kda(*inputs, chunk_size=cfg.chunk_size, backend=cfg.kda_backend)
        o.float().sum().backward()

    # The layer's matmuls alone, with its weights: [x -> six input projections], [f -> decay], [gate -> gate],
    # [o -> output], each input a leaf of its shape, so that backward computes both the input's and the weight's grad.
    w_in = torch.cat([p.weight for p in layer.input_projections()]).detach().requires_grad_()
    matmuls = [(x, w_in)] + [(torch.randn(B, seq, linear.in_features, device=device, requires_grad=True), linear.weight)
                             for linear in (layer.f_proj[1], layer.g_proj[1], layer.o_proj)]

    def matmuls_step():
        with autocast:
            y = sum(F.linear(a, w).float().sum() for a, w in matmuls)
        y.backward()

    def measure() -> dict:
        layer_s, op_s = timed(layer_step, device, args.steps), timed(op_step, device, args.steps)
        mm_s = timed(matmuls_step, device, args.steps)
        return {"layer_ms": layer_s * 1e3, "op_ms": op_s * 1e3, "matmuls_ms": mm_s * 1e3, "layer_vs_op": layer_s / op_s,
                "op_and_matmuls_vs_op": (op_s + mm_s) / op_s, "layer_vs_op_and_matmuls": layer_s / (op_s + mm_s)}

    for _ in range(args.warmup):
        layer_step()
        op_step()
        matmuls_step()
    backend = "fla" if device.type == "cuda" and fla_available() else "chunked"
    return {"kind": "kda_layer", "size": cfg.size, "seq": seq, "batch": B, "heads": H, "head_dim": D,
            "op_backend": backend}, measure


def hybrid_vs_gpt(rows: list[dict], per_round: dict, kind: str, key: str, metric: str) -> list[dict]:
    """Per (size, T or context): hybrid / gpt of `metric`, taken within each round, then its spread."""
    out = []
    for size, at in sorted({(r["size"], r[key]) for r in rows if r["kind"] == kind}):
        pair = {r["model"]: per_round[id(r)][metric] for r in rows
                if r["kind"] == kind and r["size"] == size and r[key] == at}
        ratios = [h / g for h, g in zip(pair["hybrid"], pair["gpt"], strict=True)]
        out.append({"kind": "ratio", "size": size, key: at, f"{kind}_{metric}_hybrid_vs_gpt": spread(ratios, 3)})
    return out


def train_bounds(rows: list[dict], per_round: dict, configs: dict) -> list[dict]:
    """Per (size, T) with both train rows and a kda_layer row: the hybrid / GPT training ratio were the hybrid's KDA
    layers cheaper, taken per round from the same round's times: (a) the op free, its step less n_kda x the op's
    fwd + bwd; (b) each KDA layer costing its matmuls alone, its step less n_kda x (layer - matmuls). Estimates (the
    layer and op as timed alone, not inside the model's step), which bound what any faster op (a) or any fusion of
    the op with the layer's convs, gates and norms (b) can give on this machine."""
    out = []
    for layer_row in (r for r in rows if r["kind"] == "kda_layer"):
        size, seq = layer_row["size"], layer_row["seq"]
        train = {r["model"]: r for r in rows if r["kind"] == "train" and r["size"] == size and r["seq"] == seq}
        if set(train) != {"hybrid", "gpt"}:
            continue
        n_kda = ModelConfig(**configs[size]["hybrid"]).layer_kinds().count("kda")
        tokens = train["hybrid"]["batch"] * seq
        layer = per_round[id(layer_row)]
        beyond_matmuls = [a - b for a, b in zip(layer["layer_ms"], layer["matmuls_ms"], strict=True)]
        saved_ms = {"op_free": layer["op_ms"], "kda_layers_only_matmuls": beyond_matmuls}   # a KDA layer's, per round
        hybrid_s, gpt_s = ([tokens / tps for tps in per_round[id(train[m])]["tokens_per_s"]] for m in ("hybrid", "gpt"))
        bounds = {name: [g / (h - n_kda * ms / 1e3) for h, g, ms in zip(hybrid_s, gpt_s, saved, strict=True)]
                  for name, saved in saved_ms.items()}
        out.append({"kind": "bound", "size": size, "seq": seq, "kda_layers": n_kda}
                   | {f"train_tokens_per_s_hybrid_vs_gpt_if_{name}": spread(v, 3) for name, v in bounds.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", nargs="+", default=["xs"])
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--tokens-per-step", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement and round (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before the first round")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds over all measurements")
    ap.add_argument("--decode-context", type=int, nargs="*", default=[4096, 32768])
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--no-layer", action="store_true", help="skip the KDA layer vs op rows")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default: torch's")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak (MFU)")
    ap.add_argument("--malloc-default", action="store_true",
                    help="leave glibc's malloc as it is (default: keep_freed_memory, as a stage process does)")
    ap.add_argument("--out", default="reports/bench_train_throughput.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = not args.malloc_default and keep_freed_memory()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load_before = os.getloadavg()
    benches, configs = [], {}
    for size in args.size:
        hybrid = {"size": size, "vocab_size": args.vocab_size}
        models = configs[size] = {"hybrid": hybrid, "gpt": matched("gpt", hybrid, multiple=64)}
        benches += [train_bench(name, cfg, seq, args, device) for seq in args.seq for name, cfg in models.items()]
        benches += [decode_bench(name, cfg, c, args, device) for c in args.decode_context
                    for name, cfg in models.items()]
        benches += [] if args.no_layer else [kda_layer_bench(hybrid, seq, args, device) for seq in args.seq]
    per_round = {id(fixed): {} for fixed, _ in benches}
    for _ in range(args.repeats):
        for fixed, measure in benches:
            for metric, value in measure().items():
                per_round[id(fixed)].setdefault(metric, []).append(value)
    rows = [fixed for fixed, _ in benches]
    rows += hybrid_vs_gpt(rows, per_round, "train", "seq", "tokens_per_s")
    rows += hybrid_vs_gpt(rows, per_round, "decode", "context", "tokens_per_s")
    rows += train_bounds(rows, per_round, configs)
    for row in rows:
        if row["kind"] not in ("ratio", "bound"):
            row |= {metric: spread(values, 4 if metric == "mfu" or "_vs_" in metric else 1)
                    for metric, values in per_round[id(row)].items()}
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "fla": fla_available(), "keep_freed_memory": kept,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    print("  ".join(f"{k}={v}" for k, v in meta.items()))
    for row in rows:
        print("  ".join(f"{k}={v['median']} ({v['min']}-{v['max']})" if isinstance(v, dict) else f"{k}={v}"
                        for k, v in row.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "args": vars(args), "configs": configs, "rows": rows},
                                         indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
