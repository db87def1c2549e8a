"""fla's KDA kernels held to the PyTorch references: on the CPU run by Triton's interpreter, on a GPU compiled.

    TRITON_INTERPRET=1 FLA_CACHE_MODE=default FLA_CONFIG_DIR=<empty dir> python tests/fla_check.py
    python tests/fla_check.py --device cuda         # a GPU (bench/gpu_check.sh runs it there)

tests/test_kda_fla.py runs the CPU form in its own process: the interpreter settings must be in the
environment before triton and fla are imported, and the two stand-ins below for what fla expects of
a GPU must touch nothing but this process. Prints one JSON object: for each check, the relative L2
error of every output, final state and gradient against a float64 reference. On a GPU the same checks
run with fla's real (autotuned, compiled) kernels; bench/kda_check.py adds the op at training's lengths
and in bf16.

The stand-ins (the CPU form only):

* **Default configs.** fla's autotuner benchmarks each kernel's configs, which the interpreter cannot.
  With ``FLA_CACHE_MODE=default`` fla takes each kernel's ``default_config`` from
  ``$FLA_CONFIG_DIR/<kernel>.json`` instead; :func:`write_default_configs` writes there, for every
  kernel that fla's own autotune decorator wraps, the first config of that decorator's list.
* **Loop indices.** Compiled, ``for i in range(n)`` in a kernel yields Triton scalars; interpreted,
  Python ints, on which fla's ``i.to(tl.int64)`` fails. :func:`give_loop_indices_to` gives fla's
  modules a ``range`` whose items are ints with that ``.to``.
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import sys
from pathlib import Path

import fla.ops.kda  # noqa: F401  (imports every module whose kernels chunk_kda launches)
import torch
import torch.nn.functional as F
from fla.ops.utils.cache import CachedAutotuner

from hatchling.model.config import ModelConfig
from hatchling.model.kda import kda
from hatchling.model.kda_layer import KDALayer
from hatchling.model.segments import Segments


def fla_autotuners():
    """Every CachedAutotuner (fla's autotune decorator) reachable from an imported fla module."""
    found = {}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] != "fla":
            continue
        for obj in vars(module).values():
            while obj is not None and not isinstance(obj, CachedAutotuner):
                obj = getattr(obj, "fn", None)       # unwrap triton.heuristics and similar wrappers
            if obj is not None:
                found[obj.kernel_name] = obj
    return found


def write_default_configs(config_dir: Path) -> int:
    """One ``<kernel>.json`` per fla autotuned kernel: its first autotune config as the default."""
    tuners = fla_autotuners()
    for kernel, tuner in tuners.items():
        cfg = tuner.configs[0]
        default = {"kwargs": cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                   "num_ctas": cfg.num_ctas}
        (config_dir / f"{kernel}.json").write_text(json.dumps({"default_config": default}))
    return len(tuners)


class LoopIndex(int):
    """An interpreted loop index: an int that also takes Triton's ``.to(dtype)`` cast."""

    def to(self, dtype, *args, **kwargs):
        return self


def loop_range(*args):
    return map(LoopIndex, builtins.range(*args))


def give_loop_indices_to(prefix: str = "fla") -> None:
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == prefix:
            module.range = loop_range


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def kda_errors(B: int, T: int, H: int, K: int, V: int, cu_seqlens=None, seed: int = 0,
               device: str = "cpu") -> dict[str, float]:
    """kda(backend="fla") in float32 against kda(backend="recurrent") in float64, with an initial state."""
    gen = torch.Generator().manual_seed(seed)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    xs = [torch.randn(B, T, H, K, generator=gen), F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
          torch.randn(B, T, H, V, generator=gen), F.logsigmoid(torch.randn(B, T, H, K, generator=gen) * 2),
          torch.rand(B, T, H, generator=gen), torch.randn(N, H, K, V, generator=gen)]
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=device)
    results = []
    for backend, dtype in (("fla", torch.float32), ("recurrent", torch.float64)):
        leaves = [x.to(device, dtype).clone().requires_grad_() for x in xs]
        o, s = kda(*leaves[:5], initial_state=leaves[5], output_final_state=True, cu_seqlens=cu, backend=backend)
        w = torch.linspace(-1, 1, o.numel(), dtype=dtype, device=device).view_as(o)   # a loss that weighs every output
        ((o * w).sum() + s.sum()).backward()
        results.append([o, s, *(x.grad for x in leaves)])
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dinitial_state"]
    return {n: rel(a, b) for n, a, b in zip(names, *results, strict=True)}


def layer_errors(B: int, T1: int, T2: int, seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """KDALayer on the fla path (l2norm, gate and sigmoid inside fla's kernel), float32, against the
    same weights on the chunked path (the explicit ops) in float64. Two calls through one cache: T1
    tokens from a zero state, then T2 more from the state the first call left."""
    shape = dict(size="toddler", vocab_size=97, d_model=32, n_heads=2, head_dim=32, mlp_hidden=64, n_layers=1)
    cfg = ModelConfig(**shape, kda_backend="fla")
    torch.manual_seed(seed)
    fused = KDALayer(cfg).to(device)
    reference = KDALayer(ModelConfig(**shape, kda_backend="chunked")).to(device, torch.float64)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(B, T1 + T2, cfg.d_model, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    results = []
    for layer, dtype in ((fused, torch.float32), (reference, torch.float64)):
        cache: dict = {}
        y = torch.cat([layer(x[:, :T1].to(dtype), cache), layer(x[:, T1:].to(dtype), cache)], dim=1)
        w = torch.linspace(-1, 1, y.numel(), dtype=dtype, device=device).view_as(y)
        (y * w).sum().backward()
        results.append({"y": y, "final_state": cache["state"],      # a gradient that never came is zero
                        **{f"d{n}": torch.zeros_like(p) if p.grad is None else p.grad
                           for n, p in layer.named_parameters()}})
    return {n: rel(results[0][n], results[1][n]) for n in results[0]}


def packed_layer_errors(seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """KDALayer over packed documents (two rows cut at arbitrary positions: fla's cu_seqlens over the
    flattened batch, the convolutions restarting at each document) on the fla path in float32, against
    the chunked path in float64 (each document on its own)."""
    shape = dict(size="toddler", vocab_size=97, d_model=32, n_heads=2, head_dim=32, mlp_hidden=64, n_layers=1)
    torch.manual_seed(seed)
    fused = KDALayer(ModelConfig(**shape, kda_backend="fla")).to(device)
    reference = KDALayer(ModelConfig(**shape, kda_backend="chunked")).to(device, torch.float64)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    starts = torch.zeros(2, 24, dtype=torch.bool)
    starts[0, [3, 17]] = starts[1, 10] = True
    segments = Segments.from_starts(starts.to(device))
    results = []
    for layer, dtype in ((fused, torch.float32), (reference, torch.float64)):
        y = layer(x.to(dtype), segments=segments)
        (y * torch.linspace(-1, 1, y.numel(), dtype=dtype, device=device).view_as(y)).sum().backward()
        results.append({"y": y, **{f"d{n}": p.grad for n, p in layer.named_parameters()}})
    return {n: rel(results[0][n], results[1][n]) for n in results[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description="fla's KDA kernels against the PyTorch references (JSON of errors)")
    ap.add_argument("--device", default="cpu", help="cpu (Triton's interpreter, see the docstring) or cuda")
    device = ap.parse_args().device
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("FLA_CACHE_MODE") != "default":
            sys.exit("on the CPU run with TRITON_INTERPRET=1 FLA_CACHE_MODE=default FLA_CONFIG_DIR=<dir> "
                     "(see the docstring)")
        if not write_default_configs(Path(os.environ["FLA_CONFIG_DIR"])):
            sys.exit("found no autotuned fla kernel to write a default config for")
        give_loop_indices_to("fla")
    report = {
        # two chunks of 64, the second partial (the interpreter's time grows with B * T * H)
        "kda": kda_errors(B=1, T=70, H=2, K=32, V=16, device=device),
        # packed: a sequence shorter than a chunk, then one of two chunks (the second of one token)
        "kda_varlen": kda_errors(B=1, T=70, H=1, K=32, V=16, cu_seqlens=[0, 5, 70], device=device),
        "layer": layer_errors(B=1, T1=50, T2=20, device=device),
        "layer_packed": packed_layer_errors(device=device),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
