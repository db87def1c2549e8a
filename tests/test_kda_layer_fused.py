"""The KDA layer's fused forward (one input matmul, one q|k|v conv in channels-last memory) against the
previous implementation, kept here as the reference: same outputs, same gradients of the input and of
every parameter, same cache, same state_dict; with packed documents, spikes and a cache too."""

import pytest
import torch
import torch.nn.functional as F

from hatchling.model import ModelConfig
from hatchling.model.kda import kda, kda_gate, l2norm
from hatchling.model.kda_layer import KDALayer, causal_conv1d
from hatchling.model.segments import Segments
from hatchling.model.spike import kda_skipping_silent

SMALL = dict(size="toddler", d_model=32, n_heads=2, head_dim=16, chunk_size=16)


def reference_conv(x, weight, cache=None, key="conv", positions=None):
    """The previous CausalConv1d.forward: conv1d over [B, C, T] after a left pad of W - 1 (or the cached inputs)."""
    x = x.transpose(1, 2)
    keep = weight.shape[-1] - 1
    if positions is not None:
        windows = F.pad(x, (keep, 0)).unfold(-1, keep + 1, 1)
        lags = torch.arange(keep, -1, -1, device=x.device)
        windows = windows * (lags <= positions[:, None, :, None]).to(x.dtype)
        return F.silu(windows @ weight[:, 0, :, None]).squeeze(-1).transpose(1, 2)
    past = cache[key] if cache is not None and key in cache else x.new_zeros(x.shape[0], x.shape[1], keep)
    x = torch.cat([past, x], dim=-1)
    if cache is not None:
        cache[key] = x[..., x.shape[-1] - keep:].detach()
    return F.silu(F.conv1d(x, weight, groups=x.shape[1])).transpose(1, 2)


def reference_forward(layer, x, cache=None, segments=None):
    """The previous KDALayer.forward: one matmul and one conv per projection."""
    B, T, _ = x.shape
    H, D = layer.n_heads, layer.head_dim
    positions = None if segments is None else segments.positions
    q, k, v = (reference_conv(proj(x), conv.weight, cache, name, positions).view(B, T, H, D)
               for proj, conv, name in ((layer.q_proj, layer.q_conv, "q_conv"), (layer.k_proj, layer.k_conv, "k_conv"),
                                        (layer.v_proj, layer.v_conv, "v_conv")))
    f, b = layer.f_proj(x).view(B, T, H, D), layer.b_proj(x)
    state = cache.get("state") if cache is not None else None
    if layer.spike is None:
        o, state = kda(q, k, v, f, b, initial_state=state, output_final_state=cache is not None,
                       chunk_size=layer.chunk_size, backend=layer.backend, use_qk_l2norm=True, use_gate=True,
                       A_log=layer.A_log, dt_bias=layer.dt_bias, use_beta_sigmoid=True,
                       segment_ids=None if segments is None else segments.ids)
    else:
        spikes = layer.spike(x, cache)
        g = kda_gate(f, layer.A_log, layer.dt_bias)
        o, state, _ = kda_skipping_silent(l2norm(q), l2norm(k), v, g, torch.sigmoid(b.to(g.dtype)), spikes,
                                          initial_state=state, output_final_state=cache is not None,
                                          chunk_size=layer.chunk_size, backend=layer.backend)
    if cache is not None:
        cache["state"] = state.detach()
    o = layer.o_norm(o.to(x.dtype), layer.g_proj(x).view(B, T, H, D))
    return layer.o_proj(o.reshape(B, T, H * D))


def make_layer(dtype, **over):
    torch.manual_seed(0)
    layer = KDALayer(ModelConfig(**SMALL, **over)).to(dtype)
    with torch.no_grad():                  # the output gate's bias and the norm away from their init
        layer.g_proj[1].bias.normal_()
        layer.o_norm.norm.weight.normal_()
    return layer


def outputs_and_grads(layer, fn, x, **kwargs):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = fn(x, **kwargs)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad, {name: p.grad for name, p in layer.named_parameters()}


def assert_same(layer, x, tol, **kwargs):
    y, dx, dp = outputs_and_grads(layer, layer, x, **kwargs)
    y_ref, dx_ref, dp_ref = outputs_and_grads(layer, lambda x, **kw: reference_forward(layer, x, **kw), x, **kwargs)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    assert dp.keys() == dp_ref.keys()
    for name in dp:
        torch.testing.assert_close(dp[name], dp_ref[name], **tol, msg=lambda m, name=name: f"{name}: {m}")


TOLERANCE = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 5, 40])
def test_outputs_and_all_gradients_equal_the_previous_layer(dtype, T):
    layer = make_layer(dtype)
    x = torch.randn(3, T, 32, dtype=dtype)
    assert_same(layer, x, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packed_documents_equal_the_previous_layer(dtype):
    layer = make_layer(dtype)
    starts = torch.zeros(2, 40, dtype=torch.bool)
    starts[0, [2, 3, 19]] = True                      # a one-token document, one shorter than the conv
    starts[1, [33]] = True
    x = torch.randn(2, 40, 32, dtype=dtype)
    assert_same(layer, x, TOLERANCE[dtype], segments=Segments.from_starts(starts))


def test_spike_kda_equals_the_previous_layer():
    layer = make_layer(torch.float64, spike=True)
    assert_same(layer, torch.randn(2, 40, 32, dtype=torch.float64), TOLERANCE[torch.float64])


@pytest.mark.parametrize("spike", [False, True])
def test_streaming_with_a_cache_equals_the_full_pass_and_keeps_the_previous_cache(spike):
    """Pieces of 7, 1, 16 and 6 tokens from one cache: the full pass's outputs, and the same cache entries
    (per-projection conv inputs [B, H D, W - 1], the state) as the previous layer, which the HF export reads."""
    layer = make_layer(torch.float64, spike=spike)
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    cache, ref_cache, parts = {}, {}, []
    with torch.no_grad():
        full = layer(x)
        for lo, hi in ((0, 7), (7, 8), (8, 24), (24, 30)):
            parts.append(layer(x[:, lo:hi], cache))
            torch.testing.assert_close(parts[-1], reference_forward(layer, x[:, lo:hi], ref_cache), atol=1e-10, rtol=0)
            assert cache.keys() == ref_cache.keys()
            for key in cache:
                if isinstance(cache[key], torch.Tensor):
                    torch.testing.assert_close(cache[key], ref_cache[key], atol=1e-10, rtol=0)
    assert cache["q_conv"].shape == (2, 32, 3)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-10, rtol=0)


def test_the_fused_layer_is_causal():
    layer = make_layer(torch.float64)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 20:] += torch.randn_like(x2[:, 20:])
    with torch.no_grad():
        a, b = layer(x), layer(x2)
    # Equal up to rounding: a chunk's scores are factored through its midpoint, which the later tokens move.
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=1e-12, atol=1e-12)
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3


def test_the_parameters_and_state_dict_are_those_of_before():
    """A checkpoint saved before the fusion loads as it is and gives the same outputs (above)."""
    layer = KDALayer(ModelConfig(**SMALL))
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
        "q_proj.weight": (32, 32), "k_proj.weight": (32, 32), "v_proj.weight": (32, 32),
        "q_conv.weight": (32, 1, 4), "k_conv.weight": (32, 1, 4), "v_conv.weight": (32, 1, 4),
        "f_proj.0.weight": (16, 32), "f_proj.1.weight": (32, 16), "b_proj.weight": (2, 32),
        "g_proj.0.weight": (16, 32), "g_proj.1.weight": (32, 16), "g_proj.1.bias": (32,),
        "o_norm.norm.weight": (16,), "o_proj.weight": (32, 32), "A_log": (2,), "dt_bias": (32,)}


@pytest.mark.parametrize("kernel", [1, 2, 4])
def test_causal_conv_equals_the_conv1d_reference_with_cache_and_positions(kernel):
    torch.manual_seed(0)
    weight = torch.randn(6, 1, kernel, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 11, 6, dtype=torch.float64, requires_grad=True)
    positions = Segments.from_starts(torch.tensor([[0] * 4 + [1] + [0] * 6, [0] * 9 + [1, 1]], dtype=torch.bool))
    for kwargs in ({}, {"positions": positions.positions}):
        y, ref = causal_conv1d(x, weight, **kwargs), reference_conv(x, weight, **kwargs)
        torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
        grads = torch.autograd.grad((y * y).sum(), (x, weight))
        torch.testing.assert_close(grads, torch.autograd.grad((ref * ref).sum(), (x, weight)), atol=1e-12, rtol=0)
    cache, ref_cache = {}, {}
    with torch.no_grad():
        for lo, hi in ((0, 3), (3, 4), (4, 11)):
            torch.testing.assert_close(causal_conv1d(x[:, lo:hi], weight, cache, ("a", "b")),
                                       torch.cat([reference_conv(x[:, lo:hi, :3], weight[:3], ref_cache, "a"),
                                                  reference_conv(x[:, lo:hi, 3:], weight[3:], ref_cache, "b")], -1),
                                       atol=1e-12, rtol=0)
            for key in ("a", "b"):
                torch.testing.assert_close(cache[key], ref_cache[key], atol=0, rtol=0)


@pytest.mark.parametrize("rows", [1, 4, 11])
def test_the_conv_backward_by_blocks_of_rows_equals_autograd_of_conv1d(rows, monkeypatch):
    """ConvOverTime's taps' gradient summed over blocks of `rows` time steps (11 blocks; 4, 4 and 3; one) and its
    input's gradient equal those of the conv1d reference, with the previous calls' cache in front too."""
    from hatchling.model.kda_layer import ConvOverTime

    torch.manual_seed(0)
    monkeypatch.setattr(ConvOverTime, "BLOCK", rows * 2 * 6)
    weight = torch.randn(6, 1, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 11, 6, dtype=torch.float64, requires_grad=True)
    past = torch.randn(2, 6, 3, dtype=torch.float64)
    for cache in (None, {"conv": past}):
        y = causal_conv1d(x, weight, None if cache is None else dict(cache))
        ref = reference_conv(x, weight, None if cache is None else dict(cache))
        torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
        dy = torch.randn_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, (x, weight), dy), torch.autograd.grad(ref, (x, weight), dy),
                                   atol=1e-12, rtol=0)


@pytest.mark.parametrize("threads", [16], indirect=True)
def test_causal_conv_gradients_with_positions_are_the_same_every_call(threads):
    """A document start every third token, on more threads than cores: the gradients of the re-computed
    tokens near the starts are the same bits every call (through a gather that read an input twice,
    its backward's accumulation raced between threads: 29 calls in 30 differed)."""
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(8, 128, 384, generator=gen), torch.randn(384, 1, 4, generator=gen)
    positions = torch.arange(128).remainder(3).expand(8, 128)

    def grads():
        xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
        return torch.autograd.grad(causal_conv1d(xi, wi, positions=positions).square().sum(), (xi, wi))

    first = grads()
    for _ in range(10):
        again = grads()
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@pytest.mark.parametrize("spans", [0.4, 0.8, 1.6, 2.4])
def test_every_decay_span_gives_the_scores_and_the_op(spans):
    """Gates that make a chunk of 32 span about `spans` x SAFE_SPAN: the first three through the
    chunk's midpoint (past SAFE_SPAN for 1.6), the last past 2 SAFE_SPAN (pair by pair); the scores
    equal their pairwise definition and the op (outputs, state, gradients) the recurrent reference, in
    float32."""
    from hatchling.model.kda import SAFE_SPAN, chunk_scores, kda_chunked, kda_recurrent

    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 2, 128, 2, 16, 8
    g = -spans * SAFE_SPAN[torch.float32] / 32 * (0.9 + 0.2 * torch.rand(B, T, H, K, generator=gen))
    q, k = (F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1) for _ in range(2))
    v, beta = torch.randn(B, T, H, V, generator=gen), torch.rand(B, T, H, generator=gen)
    G = g.view(B, 4, 32, H, K).cumsum(2).transpose(2, 3)                          # [B, N, H, C, K]
    span = -G[..., -1, :]
    assert bool((span > SAFE_SPAN[G.dtype]).all()) == (spans > 1)
    assert bool((span > 2 * SAFE_SPAN[G.dtype]).all()) == (spans > 2)
    qc, kc = (x.view(B, 4, 32, H, K).transpose(2, 3) for x in (q, k))
    qk, kk, _ = chunk_scores(qc, kc, G)
    D = (G[..., :, None, :].double() - G[..., None, :, :].double()).clamp(max=0).exp()
    qk_ref = torch.einsum("...rk,...rsk,...sk->...rs", qc.double(), D, kc.double()).tril()
    kk_ref = torch.einsum("...rk,...rsk,...sk->...rs", kc.double(), D, kc.double()).tril(-1)
    torch.testing.assert_close(qk.double(), qk_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kk.double(), kk_ref, atol=1e-5, rtol=1e-5)

    inputs = [x.requires_grad_() for x in (q, k, v, g, beta)]
    o, state = kda_chunked(*inputs, output_final_state=True)
    weight = torch.randn(o.shape, generator=gen)
    grads = torch.autograd.grad((o * weight).sum() + state.sum(), inputs)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    o_ref, state_ref = kda_recurrent(*ref_inputs, output_final_state=True)
    ref_grads = torch.autograd.grad((o_ref * weight.double()).sum() + state_ref.sum(), ref_inputs)
    torch.testing.assert_close(o.double(), o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.double(), state_ref, atol=1e-4, rtol=1e-4)
    for name, a, b in zip("q k v g beta".split(), grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")
