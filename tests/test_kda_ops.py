"""KDA operators: the chunked form and the dispatcher agree with the token-by-token reference."""

import pytest
import torch
import torch.nn.functional as F

from hatchling.config import validate_params
from hatchling.errors import ConfigError
from hatchling.model.kda import (
    SAFE_SPAN,
    check_kda_inputs,
    chunk_scores,
    kda,
    kda_chunked,
    kda_gate,
    kda_recurrent,
    kda_step,
    l2norm,
)
from hatchling.model.segments import Segments
from tests.conftest import TINY_PARAMS

TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


def make_inputs(T, dtype, B=2, H=2, K=16, V=12, gate_scale=1.0, seed=0, with_state=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen, dtype=dtype) * 2) * gate_scale
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    s0 = torch.randn(B, H, K, V, generator=gen, dtype=dtype) if with_state else None
    return [q, k, v, g, beta], s0


def rel_err(a, b):
    """Relative error, with an absolute floor of 1 for quantities that are exactly zero (dg at T=1)."""
    return ((a - b).norm() / b.norm().clamp_min(1.0)).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 63, 64, 100, 257])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_recurrent_outputs_state_and_grads(dtype, T, with_state):
    xs, s0 = make_inputs(T, dtype, with_state=with_state, seed=T)
    results = []
    for fn in (kda_recurrent, kda_chunked):
        leaves = [x.clone().requires_grad_() for x in xs]
        state = s0.clone().requires_grad_() if with_state else None
        o, s = fn(*leaves, initial_state=state, output_final_state=True)
        w = torch.linspace(-1, 1, o.numel(), dtype=dtype).view_as(o)  # a loss that weighs every output
        ((o * w).sum() + s.sum()).backward()
        results.append((o, s, [x.grad for x in leaves] + ([state.grad] if with_state else [])))
    (o_ref, s_ref, g_ref), (o, s, grads) = results
    tol = TOL[dtype]
    assert rel_err(o, o_ref) < tol
    assert rel_err(s, s_ref) < tol
    assert len(grads) == len(g_ref) == 5 + with_state
    for name, a, b in zip("q k v g beta initial_state".split(), grads, g_ref, strict=False):
        assert rel_err(a, b) < tol, name


def test_chunked_grads_without_the_final_state_in_the_loss():
    """A final state the loss ignores: the backward starts from its zero gradient."""
    xs, s0 = make_inputs(70, torch.float64, with_state=True)
    grads = []
    for fn in (kda_recurrent, kda_chunked):
        leaves = [x.clone().requires_grad_() for x in xs + [s0]]
        o, _ = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True)
        grads.append(torch.autograd.grad((o * o).sum(), leaves))
    for name, a, b in zip("q k v g beta initial_state".split(), grads[1], grads[0], strict=True):
        assert rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("gate_scale", [0.05, 30.0, "mixed"])
def test_mild_and_strong_channels_match_reference(gate_scale):
    """Mild gates go through the scores' matmul; strong ones (a chunk's span > 2 SAFE_SPAN) are added
    pair by pair; "mixed" has both kinds of channel in the same chunks."""
    xs, s0 = make_inputs(130, torch.float32, gate_scale=1.0 if gate_scale == "mixed" else gate_scale,
                         with_state=True)
    if gate_scale == "mixed":
        xs[3] = xs[3] * torch.tensor([0.05, 30.0]).repeat(8)              # alternate channels
    span = -xs[3][:, :32].sum(1)                                          # the first chunk's, per channel
    strong = span > 2 * SAFE_SPAN[torch.float32]
    assert bool(strong.any()) == (gate_scale != 0.05) and bool(strong.all()) == (gate_scale == 30.0)
    leaves = [x.clone().requires_grad_() for x in xs]
    ref_leaves = [x.detach().double().requires_grad_() for x in xs]
    o_ref, s_ref = kda_recurrent(*ref_leaves, initial_state=s0.double(), output_final_state=True)
    o, s = kda_chunked(*leaves, initial_state=s0, output_final_state=True)
    assert rel_err(o.double(), o_ref) < 1e-4 and rel_err(s.double(), s_ref) < 1e-4
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((o * w).sum() + s.sum(), leaves)
    ref_grads = torch.autograd.grad((o_ref * w.double()).sum() + s_ref.sum(), ref_leaves)
    for name, a, b in zip("q k v g beta".split(), grads, ref_grads, strict=True):
        assert rel_err(a.double(), b) < 1e-4, name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunk_scores_against_pairwise_definition(dtype):
    """Spans from mild to past 2 SAFE_SPAN, channel by channel: P and KK equal their definition."""
    gen = torch.Generator().manual_seed(1)
    C, K = 32, 8
    q, k = (torch.randn(3, C, K, generator=gen, dtype=torch.float64) for _ in range(2))
    rates = torch.tensor([0.01, 1.0, 2.5, 4.0, 6.0, 30.0, 60.0, 0.5], dtype=torch.float64)   # per channel
    G = (F.logsigmoid(torch.randn(3, C, K, generator=gen, dtype=torch.float64)) * rates).cumsum(1)
    G = G * torch.where(rates > 20, 1.0, 2 * SAFE_SPAN[dtype] / 160)     # float64's spans scaled alike
    D = (G[:, :, None, :] - G[:, None, :, :]).clamp(max=0).exp()
    qk_ref = torch.einsum("brk,brsk,bsk->brs", q, D, k).tril()
    kk_ref = torch.einsum("brk,brsk,bsk->brs", k, D, k).tril(-1)
    span = -G[:, -1]
    assert bool((span > 2 * SAFE_SPAN[dtype]).any()) and bool((span < 2 * SAFE_SPAN[dtype]).any())
    qk, kk, _ = chunk_scores(q.to(dtype), k.to(dtype), G.to(dtype))
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(qk.double(), qk_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(kk.double(), kk_ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_strong_channels_add_in_the_same_order_every_call(threads):
    """Every channel of one chunk past 2 SAFE_SPAN: their exact pairs all add into the same [2C, C]
    scores, and every call gives the same bits (added by index_put_'s accumulate, the threads raced:
    19 calls in 20 differed on two threads)."""
    gen = torch.Generator().manual_seed(0)
    C, K = 32, 256
    q, k = torch.randn(1, C, K, generator=gen), F.normalize(torch.randn(1, C, K, generator=gen), dim=-1)
    G = (-3 * SAFE_SPAN[torch.float32] / C * (0.5 + torch.rand(1, C, K, generator=gen))).cumsum(1)
    assert bool((-G[:, -1] > 2 * SAFE_SPAN[torch.float32]).all())
    first = chunk_scores(q, k, G)[:2]
    for _ in range(10):
        again = chunk_scores(q, k, G)[:2]
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_step_is_the_defining_recurrence():
    xs, s0 = make_inputs(1, torch.float64, with_state=True)
    q, k, v, g, beta = (x[:, 0] for x in xs)
    o, s = kda_step(q, k, v, g, beta, s0)
    # S_t = (I - b k k^T) Diag(alpha) S + b k v^T, written with explicit matrices
    eye = torch.eye(k.shape[-1], dtype=k.dtype)
    proj = eye - beta[..., None, None] * k[..., :, None] * k[..., None, :]
    s_ref = proj @ (g.exp()[..., None] * s0) + beta[..., None, None] * k[..., :, None] * v[..., None, :]
    o_ref = torch.einsum("bhkv,bhk->bhv", s_ref, q * k.shape[-1] ** -0.5)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(o, o_ref)


def test_chunk_size_does_not_change_result():
    xs, s0 = make_inputs(77, torch.float64, with_state=True)
    ref = kda_chunked(*xs, initial_state=s0, chunk_size=64)[0]
    for cs in (8, 16, 32, 128):
        assert rel_err(kda_chunked(*xs, initial_state=s0, chunk_size=cs)[0], ref) < 1e-10


def test_dispatch_on_cpu_uses_chunked_and_single_step():
    xs, s0 = make_inputs(40, torch.float64, with_state=True)
    o, s = kda(*xs, initial_state=s0, output_final_state=True)
    o_ref, s_ref = kda_recurrent(*xs, initial_state=s0, output_final_state=True)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    one = [x[:, :1] for x in xs]
    torch.testing.assert_close(kda(*one, initial_state=s0)[0], kda_recurrent(*one, initial_state=s0)[0])
    with pytest.raises(ValueError, match="backend"):
        kda(*xs, backend="triton")


def test_streaming_state_equals_full_pass():
    """Feeding a sequence in pieces, carrying the state, gives the full pass exactly."""
    xs, _ = make_inputs(150, torch.float64)
    o_full, s_full = kda_chunked(*xs, output_final_state=True)
    state, outs = None, []
    for lo, hi in ((0, 1), (1, 70), (70, 71), (71, 150)):
        o, state = kda_chunked(*(x[:, lo:hi] for x in xs), initial_state=state, output_final_state=True)
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), o_full) < 1e-10 and rel_err(state, s_full) < 1e-10


@pytest.mark.parametrize("bad, pattern", [
    (lambda xs: (xs[0][0],) + tuple(xs[1:]), r"q has shape \(5, 2, 16\), expected rank 4"),
    (lambda xs: (xs[0], xs[1][..., :8]) + tuple(xs[2:]), r"k has shape \(2, 5, 2, 8\), expected \(2, 5, 2, 16\)"),
    (lambda xs: tuple(xs[:4]) + (xs[4][..., :1],), r"beta has shape \(2, 5, 1\), expected \(2, 5, 2\)"),
    (lambda xs: tuple(xs[:3]) + (xs[3].abs(),) + (xs[4],), r"g must be a log-decay \(<= 0\)"),
])
def test_bad_input_names_the_tensor(bad, pattern):
    xs, _ = make_inputs(5, torch.float32)
    with pytest.raises(ValueError, match=pattern):
        kda_chunked(*bad(xs))


def test_bad_initial_state_and_fla_head_dim_limit():
    xs, _ = make_inputs(5, torch.float32)
    with pytest.raises(ValueError, match=r"initial_state has shape \(2, 2, 16\), expected \(2, 2, 16, 12\)"):
        kda_recurrent(*xs, initial_state=torch.zeros(2, 2, 16))
    big, _ = make_inputs(2, torch.float32, K=300, V=4)
    with pytest.raises(ValueError, match="head dim <= 256 on the fla path"):
        check_kda_inputs(*big, max_head_dim=256)


def test_the_fla_backend_off_cuda_or_without_fla_names_the_setting(monkeypatch):
    """Triton said "0 active drivers ([]). There should only be one." for a CPU run with kda_backend: fla."""
    import importlib.util

    import hatchling.model.kda as ops

    find_spec = importlib.util.find_spec

    xs, _ = make_inputs(5, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ops, "fla_available", lambda: True)
    with pytest.raises(ValueError, match=r"backend 'fla' \(model.kda_backend\) runs fla's Triton kernels on a CUDA "
                                         r"device, not on cpu \(TRITON_INTERPRET=1"):
        kda(*xs, backend="fla")
    monkeypatch.setattr(ops, "fla_available", lambda: False)
    with pytest.raises(ValueError, match=r"backend 'fla' \(model.kda_backend\) needs fla-core, the gpu extra"):
        kda(*xs, backend="fla")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fla" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"model.kda_backend 'fla' needs fla-core, the gpu extra"):
        validate_params({**TINY_PARAMS, "model": {**TINY_PARAMS["model"], "kda_backend": "fla"}})   # before any work


def test_packed_sequences_start_from_their_own_state_and_never_leak():
    """cu_seqlens on the PyTorch paths: each packed sequence is computed as if alone."""
    xs, _ = make_inputs(90, torch.float64, B=1)
    s0 = torch.randn(2, 2, 16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    cu = torch.tensor([0, 20, 90])
    o, s = kda(*xs, initial_state=s0, output_final_state=True, cu_seqlens=cu, backend="chunked")
    o_rec, s_rec = kda(*xs, initial_state=s0, output_final_state=True, cu_seqlens=cu, backend="recurrent")
    assert rel_err(o, o_rec) < 1e-10 and rel_err(s, s_rec) < 1e-10
    o_alone, s_alone = kda_recurrent(*(x[:, 20:] for x in xs), initial_state=s0[1:], output_final_state=True)
    assert rel_err(o[:, 20:], o_alone) < 1e-10 and rel_err(s[1:], s_alone) < 1e-10
    o_short, s_short = kda_recurrent(*(x[:, :20] for x in xs), initial_state=s0[:1], output_final_state=True)
    assert rel_err(o[:, :20], o_short) < 1e-10 and rel_err(s[:1], s_short) < 1e-10   # padded to 70 in its row
    xs[2][:, :20] += 1                                   # other values in the first sequence only
    o2, s2 = kda(*xs, initial_state=s0, output_final_state=True, cu_seqlens=cu, backend="chunked")
    assert torch.equal(o2[:, 20:], o[:, 20:]) and torch.equal(s2[1], s[1])
    assert not torch.allclose(o2[:, :20], o[:, :20])


@pytest.mark.parametrize(("backend", "gate_scale"), [("chunked", 1.0), ("chunked", 100.0), ("recurrent", 1.0)])
def test_segment_ids_restart_the_state_inside_chunks_exactly(backend, gate_scale):
    """segment_ids (the layer's packed documents) on a batch of rows: outputs and gradients equal each
    segment run on its own from a zero state (the cu_seqlens reference, one sequence at a time), for
    segments that start mid-chunk, on a chunk's first token, one token long, and across chunks; with
    mild gates and with gates strong enough that chunk-channels take the exact pairs (float64)."""
    B, T = 3, 75
    xs, _ = make_inputs(T, torch.float64, B=B, seed=3, gate_scale=gate_scale)
    spans = -xs[3][:, :64].reshape(B, 4, 16, 2, 16).sum(2)                 # per chunk of 16 and channel
    assert bool((spans > 2 * SAFE_SPAN[torch.float64]).any()) == (gate_scale > 1)
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[0, [5, 16, 17, 40]] = True                   # chunk 16: starts at 16 and 17 (a one-token segment)
    starts[1, [15, 32, 64]] = True
    starts[2, 1::3] = True                              # many short segments in every chunk
    ids = Segments.from_starts(starts).ids
    leaves = [x.clone().requires_grad_() for x in xs]
    o, _ = kda(*leaves, chunk_size=16, backend=backend, segment_ids=ids)
    bounds = F.pad((ids.flatten()[1:] != ids.flatten()[:-1]) | (torch.arange(1, B * T) % T == 0), (1, 0),
                   value=True).nonzero().squeeze(1)
    cu = F.pad(bounds, (0, 1), value=B * T)
    flat = [x.clone().reshape(1, B * T, *x.shape[2:]).requires_grad_() for x in xs]
    o_ref, _ = kda(*flat, cu_seqlens=cu, backend="recurrent")
    assert rel_err(o, o_ref.view_as(o)) < 1e-10
    weights = torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(1))
    (o * weights).sum().backward()
    (o_ref * weights.reshape(o_ref.shape)).sum().backward()
    for x, ref in zip(leaves, flat, strict=True):
        assert rel_err(x.grad, ref.grad.view_as(x.grad)) < 1e-9
    plain, _ = kda(*xs, chunk_size=16, backend=backend)
    assert not torch.allclose(plain, o)


@pytest.mark.parametrize("needs_grad", [("v",), ("q",), ("g",), ("state",), ("k", "beta")])
def test_gradients_of_some_inputs_only(needs_grad):
    """Only some inputs require a gradient (the others are constants, or a state without one): those
    gradients equal the recurrent reference's, in float64, with mild and strong channels in one chunk."""
    xs, s0 = make_inputs(70, torch.float64, with_state=True, seed=5)
    xs[3] = xs[3] * torch.tensor([1.0, 1000.0]).repeat(8)               # every other channel past 2 SAFE_SPAN
    names = ["q", "k", "v", "g", "beta", "state"]
    results = []
    for fn in (kda_recurrent, kda_chunked):
        inputs = [x.clone().requires_grad_(name in needs_grad) for name, x in zip(names, [*xs, s0], strict=True)]
        o, s = fn(*inputs[:5], initial_state=inputs[5], output_final_state=True, scale=0.3)
        w = torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(2))
        leaves = [x for x in inputs if x.requires_grad]
        results.append((o, torch.autograd.grad((o * w).sum() + s.sum(), leaves)))
    (o_ref, ref), (o, grads) = results
    assert rel_err(o, o_ref) < 1e-10 and len(grads) == len(needs_grad)
    for name, a, b in zip(needs_grad, grads, ref, strict=True):
        assert rel_err(a, b) < 1e-9, name


def test_large_queries_do_not_overflow_the_factored_scores():
    """Queries of norm ~1e8 (no l2norm; keys stay unit vectors, as the delta rule needs) with chunk spans
    just under 2 SAFE_SPAN, in float32: the channels whose factors times 1e8 would overflow take the exact
    pairs, and the outputs, state and gradients match the reference."""
    xs, s0 = make_inputs(64, torch.float32, with_state=True, seed=7)
    xs[0] = xs[0] * 1e8
    span = -xs[3].view(2, 2, 32, 2, 16).sum(2)
    xs[3] = xs[3] * (1.9 * SAFE_SPAN[torch.float32] / span.amax())         # the largest chunk span: 1.9 SAFE_SPAN
    leaves = [x.clone().requires_grad_() for x in xs]
    ref_leaves = [x.double().requires_grad_() for x in xs]
    o, s = kda_chunked(*leaves, initial_state=s0, output_final_state=True)
    o_ref, s_ref = kda_recurrent(*ref_leaves, initial_state=s0.double(), output_final_state=True)
    assert rel_err(o.double(), o_ref) < 1e-4 and rel_err(s.double(), s_ref) < 1e-4
    grads = torch.autograd.grad(o.sum() + s.sum(), leaves)
    ref_grads = torch.autograd.grad(o_ref.sum() + s_ref.sum(), ref_leaves)
    for name, a, b in zip("q k v g beta".split(), grads, ref_grads, strict=True):
        assert rel_err(a.double(), b) < 1e-4, name


def test_chunked_returns_the_dtype_of_v():
    """bf16 inputs: the op computes in float32 and returns v's dtype, as the recurrent form does."""
    xs, _ = make_inputs(40, torch.float32)
    o, _ = kda_chunked(*(x.bfloat16() for x in xs))
    ref, _ = kda_chunked(*(x.bfloat16().float() for x in xs))
    assert o.dtype == torch.bfloat16 == kda_recurrent(*(x.bfloat16() for x in xs))[0].dtype
    torch.testing.assert_close(o, ref.bfloat16(), atol=0, rtol=0)


def test_bad_packing_is_named():
    xs, _ = make_inputs(10, torch.float32, B=1)
    with pytest.raises(ValueError, match=r"cu_seqlens must rise strictly from 0 to T=10, got \[0, 6, 6, 10\]"):
        kda(*xs, cu_seqlens=torch.tensor([0, 6, 6, 10]))
    with pytest.raises(ValueError, match=r"initial_state has shape \(1, 2, 16, 12\), expected \(2, 2, 16, 12\)"):
        kda(*xs, cu_seqlens=torch.tensor([0, 6, 10]), initial_state=torch.zeros(1, 2, 16, 12))
    two, _ = make_inputs(10, torch.float32, B=2)
    with pytest.raises(ValueError, match=r"packed sequences \(cu_seqlens\) lie along T of one batch row"):
        kda(*two, cu_seqlens=torch.tensor([0, 10]))


def test_pre_ops_on_the_pytorch_paths_are_the_layer_formulas():
    """use_qk_l2norm, use_gate and use_beta_sigmoid (fused in fla's kernel) are, on the PyTorch paths,
    L2 normalisation, g = -exp(A_log) * softplus(g + dt_bias) and sigmoid, applied before KDA."""
    gen = torch.Generator().manual_seed(3)
    B, T, H, K, V = 2, 40, 2, 16, 12
    q, k, f = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(3))
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    b = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    A_log = torch.rand(H, generator=gen, dtype=torch.float64) * 2
    dt_bias = torch.randn(H * K, generator=gen, dtype=torch.float64)
    o, s = kda(q, k, v, f, b, output_final_state=True, backend="chunked", use_qk_l2norm=True, use_gate=True,
               A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid=True)
    g = -A_log.exp()[:, None] * F.softplus(f + dt_bias.view(H, K))
    o_ref, s_ref = kda_recurrent(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, g, b.sigmoid(),
                                 output_final_state=True)
    # l2norm's eps (1e-6 inside the root, as fla's) against F.normalize's: ~1e-7 for these norms
    assert rel_err(o, o_ref) < 1e-6 and rel_err(s, s_ref) < 1e-6
    assert rel_err(l2norm(q), F.normalize(q, dim=-1)) < 1e-6
    torch.testing.assert_close(kda_gate(f, A_log, dt_bias), g)
    with pytest.raises(ValueError, match=r"use_gate needs A_log of shape \(2,\), got None"):
        kda(q, k, v, f, b, use_gate=True, dt_bias=dt_bias)
    with pytest.raises(ValueError, match=r"use_gate needs dt_bias of shape \(32,\), got \(16,\)"):
        kda(q, k, v, f, b, use_gate=True, A_log=A_log, dt_bias=dt_bias[:16])
