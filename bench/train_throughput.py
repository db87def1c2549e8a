"""Training and decoding throughput of the hybrid vs a same-size GPT, and the KDA layer vs its raw op.

    python bench/train_throughput.py                       # the H100 run: xs, T = 2k/8k/16k, decode 4k/32k
    python bench/train_throughput.py --size toddler --seq 256 1024 --tokens-per-step 2048 \\
        --decode-context 256 2048 --steps 3                # a small CPU run of the same measurements

The GPT is ``arch: gpt`` (RoPE GQA attention through SDPA in every layer, the same SwiGLU blocks)
with its MLP widened until its parameter count matches the hybrid's (``hatchling.model.sizing.matched``,
to a multiple of 64 hidden units), so the comparison is at equal size. On CUDA: bf16 autocast, fused AdamW, fla's
``chunk_kda`` for KDA (when installed) and SDPA's flash kernel for attention.

Rows (printed as a table, written as JSON):
- train: tokens/s of forward + backward + AdamW step at each T, with the same tokens per step
  (batch = tokens / T); peak memory; MFU = model FLOPs/s / --peak-tflops (989: H100 SXM, bf16
  dense). Model FLOPs per token = 6 x parameters in matmuls (tied head included, embedding
  lookup not) + 6 x T x H x Dh per softmax-attention layer (causal scores and values). The KDA
  recurrence's own FLOPs are not counted, so the hybrid's MFU is a lower bound.
- decode: batch-1 tokens/s after a prefill of C tokens, the cache's bytes and, on CUDA, the
  peak memory while decoding.
- kda_layer: fwd + bwd of a whole KDALayer (projections, convs, gates, norms) vs the raw op
  ``hatchling.model.kda.kda`` (fla's ``chunk_kda`` on CUDA) on the layer's shapes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hatchling.model import ModelConfig, build_model
from hatchling.model.kda import fla_available, kda
from hatchling.model.kda_layer import KDALayer
from hatchling.model.sizing import matched


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of fn() after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


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


def train_row(name: str, model_cfg: dict, seq: int, args, device: torch.device) -> dict:
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

    peak_reset(device)
    try:
        seconds = timed(step, device, warmup=2, repeats=args.steps)
    except torch.OutOfMemoryError:
        return {"kind": "train", "model": name, "seq": seq, "batch": batch, "error": "out of memory"}
    tokens_per_s = batch * seq / seconds
    row = {"kind": "train", "model": name, "params": model.num_params(), "seq": seq, "batch": batch,
           "tokens_per_s": round(tokens_per_s), "peak_mib": peak_mib(device)}
    if device.type == "cuda":
        row["mfu"] = round(tokens_per_s * flops_per_token(model, cfg, seq) / (args.peak_tflops * 1e12), 4)
    return row


@torch.no_grad()
def decode_row(name: str, model_cfg: dict, context: int, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(**model_cfg)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg).to(device=device, dtype=dtype).eval()
    cache = model.new_cache()
    peak_reset(device)
    try:
        model(torch.randint(0, cfg.vocab_size, (1, context), device=device), cache)
        token = torch.randint(0, cfg.vocab_size, (1, 1), device=device)
        peak_reset(device)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.decode_tokens):
            token = model(token, cache)[:, -1:].argmax(-1)
        sync(device)
        seconds = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        return {"kind": "decode", "model": name, "context": context, "error": "out of memory"}
    cache_bytes = sum(t.numel() * t.element_size() for layer in cache for t in layer.values())
    return {"kind": "decode", "model": name, "context": context,
            "tokens_per_s": round(args.decode_tokens / seconds, 1),
            "cache_mib": round(cache_bytes / 2**20, 2), "peak_mib": peak_mib(device)}


def kda_layer_row(model_cfg: dict, seq: int, args, device: torch.device) -> dict:
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

    q, k, v = (torch.randn(B, seq, H, D, device=device, dtype=dtype) for _ in range(3))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    g = F.logsigmoid(torch.randn(B, seq, H, D, device=device)).to(dtype) / 16
    beta = torch.rand(B, seq, H, device=device, dtype=dtype)
    inputs = [t.requires_grad_() for t in (q, k, v, g, beta)]

    def op_step():
        o, _ = kda(*inputs, chunk_size=cfg.chunk_size, backend=cfg.kda_backend)
        o.float().sum().backward()

    layer_s = timed(layer_step, device, warmup=2, repeats=args.steps)
    op_s = timed(op_step, device, warmup=2, repeats=args.steps)
    backend = "fla" if device.type == "cuda" and fla_available() else "chunked"
    return {"kind": "kda_layer", "seq": seq, "batch": B, "heads": H, "head_dim": D, "op_backend": backend,
            "layer_ms": round(layer_s * 1e3, 2), "op_ms": round(op_s * 1e3, 2), "layer_vs_op": round(layer_s / op_s, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="xs")
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--tokens-per-step", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=10, help="timed repeats (median)")
    ap.add_argument("--decode-context", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak (MFU)")
    ap.add_argument("--out", default="reports/bench_train_throughput.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hybrid = {"size": args.size, "vocab_size": args.vocab_size}
    models = {"hybrid": hybrid, "gpt": matched("gpt", hybrid, multiple=64)}
    rows = [train_row(name, cfg, seq, args, device) for seq in args.seq for name, cfg in models.items()]
    rows += [decode_row(name, cfg, c, args, device) for c in args.decode_context for name, cfg in models.items()]
    rows += [kda_layer_row(hybrid, seq, args, device) for seq in args.seq]
    for seq in args.seq:                                           # the goals' ratios, hybrid / gpt
        pair = {r["model"]: r for r in rows if r["kind"] == "train" and r["seq"] == seq and "error" not in r}
        if len(pair) == 2:
            rows.append({"kind": "ratio", "seq": seq, "train_tokens_per_s_hybrid_vs_gpt":
                         round(pair["hybrid"]["tokens_per_s"] / pair["gpt"]["tokens_per_s"], 3)})
    for c in args.decode_context:
        pair = {r["model"]: r for r in rows if r["kind"] == "decode" and r["context"] == c and "error" not in r}
        if len(pair) == 2:
            rows.append({"kind": "ratio", "context": c, "decode_cache_hybrid_vs_gpt":
                         round(pair["hybrid"]["cache_mib"] / pair["gpt"]["cache_mib"], 4),
                         "decode_tokens_per_s_hybrid_vs_gpt":
                         round(pair["hybrid"]["tokens_per_s"] / pair["gpt"]["tokens_per_s"], 3)})
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {device_name}, torch {torch.__version__}, fla {'yes' if fla_available() else 'no'}")
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    out = {"device": device_name, "torch": torch.__version__, "fla": fla_available(), "args": vars(args),
           "configs": models, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
