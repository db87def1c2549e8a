"""Autoregressive decoding with the per-layer cache (constant-size KDA state + NoPE KV cache), on
the device of the prompt (and the model), under bf16 autocast there when it is CUDA.

One prefill (``model(prompt, cache)``), then one token at a time: on the CPU through the model's lean
step path where it has one (``model.decoder``: HatchlingLM's plain hybrid and gpt), else through
forward with the cache, the reference (``fast=False`` forces it; tests/test_decode.py checks they agree).
``compiled=True`` runs that step path compiled (torch.compile; seconds to compile, then ~1.3x faster a
token for the toddler on the CPU: bench/decode.py), for long generations.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator

import torch

from hatchling.errors import ConfigError
from hatchling.model.device import autocast


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def check_compilable(model, device: torch.device) -> None:
    """A ConfigError naming why `model` cannot decode with the compiled step path on `device`, if it cannot."""
    if device.type != "cpu":
        why = f"it runs on the CPU, and the model is on {device.type}"
    elif not hasattr(model, "step_path_unsupported"):
        why = f"{type(model).__name__} has no step path (hybrid and gpt models have)"
    elif not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++", "c++") if c):
        why = "no C++ compiler was found (g++, clang++ or $CXX): torch.compile builds the CPU kernels with one"
    else:
        why = model.step_path_unsupported()
    if why:
        raise ConfigError(f"compiled decoding: {why}")


def step_function(model, cache: list, batch: int, max_len: int, device: torch.device,
                  fast: bool = True, compiled: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """ids [B] -> next-token logits [B, V], continuing a prefilled cache: the model's step path on the
    CPU when `fast` and it has one, else forward with the cache (under the device's autocast).
    `compiled`: the step path compiled, whatever `fast` (model.decoder's `compiled`; check_compilable
    says why not where it cannot)."""
    if compiled:
        check_compilable(model, device)
        return model.decoder(cache, batch, max_len, compiled=True)
    decoder = getattr(model, "decoder", None)
    if fast and device.type == "cpu" and decoder is not None:
        step = decoder(cache, batch, max_len)
        if step is not None:
            return step

    def forward_step(ids: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            return model(ids[:, None], cache)[:, -1]

    return forward_step


@torch.no_grad()
def stream(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           stop_ids: tuple[int, ...] = (), fast: bool = True, compiled: bool = False) -> Iterator[torch.Tensor]:
    """Yield next-token ids [B] one step at a time: one prefill, then one-token cached steps
    (`fast`: see the module docstring; `compiled`: the step path compiled, see step_function)."""
    device = input_ids.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    cache = model.new_cache()
    with autocast(device):
        logits = model(input_ids, cache)[:, -1]
    step = step_function(model, cache, input_ids.shape[0], input_ids.shape[1] + max_new_tokens, device, fast, compiled)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        yield nxt
        if stop_ids and bool(torch.isin(nxt, stops).all()):
            return
        if i + 1 < max_new_tokens:                      # the last token needs no forward pass
            logits = step(nxt)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_ids: tuple[int, ...] = (), fast: bool = True, compiled: bool = False) -> torch.Tensor:
    """input_ids [B, T] -> [B, T + n] with up to max_new_tokens sampled tokens appended."""
    new = list(stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, fast, compiled))
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)
