"""Titans neural memory and HOPE (model.arch: hope): analytic gradients, a memory update lowers the
associative loss, causality, streaming decode = full pass, and that the model learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hatchling.model import build_model
from hatchling.model.titans import (
    HOPELM,
    NeuralMemory,
    associative_grads,
    memory_read,
    memory_update,
    memory_update_reference,
)
from hatchling.train.loop import overfit_one_batch

CFG = {"arch": "hope", "vocab_size": 53, "d_model": 32, "n_layers": 2, "n_heads": 2, "head_dim": 8,
       "hope": {"hidden": 16, "chunk": 4, "levels": 1}}


def _chunk(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(1, 2, 8, 16, generator=g, dtype=dtype) * 8 ** -0.5
    w2 = torch.randn(1, 2, 16, 8, generator=g, dtype=dtype) * 16 ** -0.5
    k = F.normalize(torch.randn(1, 2, 5, 8, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(1, 2, 5, 8, generator=g, dtype=dtype)
    return w1, w2, k, v


def test_analytic_gradients_match_autograd():
    w1, w2, k, v = _chunk()
    g1, g2 = associative_grads(w1, w2, k, v)
    for t in range(k.shape[2]):
        a, b = w1.clone().requires_grad_(), w2.clone().requires_grad_()
        ((memory_read(a, b, k[:, :, t:t + 1]) - v[:, :, t:t + 1]) ** 2).sum().backward()
        torch.testing.assert_close(g1[:, :, t], a.grad)
        torch.testing.assert_close(g2[:, :, t], b.grad)


def test_fast_memory_update_equals_the_token_by_token_reference():
    w1, w2, k, v = _chunk(seed=3)
    g = torch.Generator().manual_seed(4)
    gates = [torch.rand(k.shape[:3], generator=g, dtype=k.dtype) for _ in range(3)]
    state = (w1, w2, torch.randn(w1.shape, generator=g, dtype=k.dtype) * 0.1,
             torch.randn(w2.shape, generator=g, dtype=k.dtype) * 0.1)
    for fast, slow in zip(memory_update(state, k, v, *gates), memory_update_reference(state, k, v, *gates),
                          strict=True):
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_one_memory_update_lowers_the_associative_loss_on_its_chunk(momentum):
    w1, w2, k, v = _chunk()
    loss = lambda a, b: float(((memory_read(a, b, k) - v) ** 2).sum())
    shape = k.shape[:3]
    state = memory_update((w1, w2, torch.zeros_like(w1), torch.zeros_like(w2)), k, v,
                          torch.full(shape, 0.1, dtype=k.dtype), torch.full(shape, momentum, dtype=k.dtype),
                          torch.zeros(shape, dtype=k.dtype))
    assert loss(state[0], state[1]) < 0.9 * loss(w1, w2)
    decayed = memory_update((w1, w2, torch.zeros_like(w1), torch.zeros_like(w2)), k, v, torch.zeros(shape),
                            torch.zeros(shape), torch.full(shape, 0.5))
    torch.testing.assert_close(decayed[0], w1 * 0.5 ** 5)          # α alone only forgets


def test_memory_streaming_equals_the_full_pass_and_is_causal():
    torch.manual_seed(0)
    memory = NeuralMemory(32, 2, 8, 16, chunk=4).eval()
    x = torch.randn(2, 19, 32)
    with torch.no_grad():
        full = memory(x)
        cache = {}
        parts = [memory(x[:, :6], cache)] + [memory(x[:, t:t + 1], cache) for t in range(6, 19)]
        changed = x.clone()
        changed[:, 10:] = torch.randn(2, 9, 32)
        other = memory(changed)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other[:, :10], full[:, :10])
    assert not torch.allclose(other[:, 12:], full[:, 12:])       # later chunks read the changed memory


def test_hope_model_is_causal_streams_and_learns():
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    assert isinstance(model, HOPELM) and len(model.blocks[0].memories) == 2
    ids = torch.randint(0, 53, (2, 37))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        parts = [model(ids[:, :9], cache)] + [model(ids[:, t:t + 1], cache) for t in range(9, 37)]
        changed = ids.clone()
        changed[:, 20:] = torch.randint(0, 53, (2, 17))
        other = model(changed)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(other[:, :20], full[:, :20])
    assert model.generate(ids[:, :4], 6).shape == (2, 10)
    torch.manual_seed(0)
    fresh = build_model(CFG)
    x = torch.randint(0, 53, (4, 24))
    losses = overfit_one_batch(fresh, (x[:, :-1], x[:, 1:]), steps=60, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0]


def test_memory_stays_finite_on_long_sequences_with_the_gates_wide_open():
    """Step size and momentum at their bounds, no forgetting, 2,048 tokens: the inner descent must
    not diverge (unbounded gates gave NaN within 100 steps of pretraining)."""
    for seed in range(3):
        torch.manual_seed(seed)
        memory = NeuralMemory(32, 2, 8, 16, chunk=16)
        with torch.no_grad():
            memory.gates.weight.zero_()
            memory.gates.bias.copy_(torch.tensor([20.0, 20.0, 20.0, 20.0, -20.0, -20.0]))  # θ, η max; α 0
            out = memory(torch.randn(1, 2048, 32) * 3)
        assert torch.isfinite(out).all() and out.abs().max() < 100
