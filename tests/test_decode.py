"""The decoding step path (model.decoder: KDAStep, AttentionStep, SwiGLUStep; compiled, their fixed-shape
forms in one graph) against its reference, forward with a cache: same logits at every position, same greedy
tokens, and the fallback to forward for what it does not cover."""

import pytest
import torch
import torch.nn.functional as F

from hatchling.errors import ConfigError
from hatchling.model import build_model, kda
from hatchling.model.config import for_arch
from hatchling.model.generate import generate, stream
from hatchling.model.int8 import quantize_state_dict, use_int8_linears
from hatchling.model.kda import StepWeight, folded_norm, kda_step, kda_step_, l2norm, unit

# toddler's shape, shrunk; 4 query heads over 2 KV heads (grouped-query attention)
SMALL = dict(size="toddler", vocab_size=97, d_model=32, n_layers=4, n_heads=4, head_dim=8, n_kv_heads=2,
             mlp_hidden=48, chunk_size=16)


def small_model(arch="hybrid", dtype=torch.float32, **over):
    torch.manual_seed(0)
    model = build_model({**for_arch(arch, SMALL), **over}).to(dtype).eval()
    with torch.no_grad():           # norms and decay biases away from their init, so folding them is tested
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "dt_bias", "g_proj.1.bias")):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def test_in_place_kda_step_equals_the_reference_step():
    torch.manual_seed(0)
    B, H, K, V = 2, 3, 8, 5
    q, k = F.normalize(torch.randn(2, B, H, K, dtype=torch.float64), dim=-1)
    v = torch.randn(B, H, V, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, H, K, dtype=torch.float64))
    beta = torch.rand(B, H, dtype=torch.float64)
    state = torch.randn(B, H, K, V, dtype=torch.float64)
    o, expected = kda_step(q, k, v, g, beta, state)
    in_place = state.clone()
    torch.testing.assert_close(kda_step_(q, k, v, g, beta, in_place), o, atol=1e-12, rtol=0)
    torch.testing.assert_close(in_place, expected, atol=1e-12, rtol=0)


def test_unit_and_folded_norm_equal_l2norm_and_rmsnorm():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 16, dtype=torch.float64) * 1e-3            # small enough for eps to matter
    torch.testing.assert_close(unit(x, x.new_tensor(1e-3)), l2norm(x), atol=1e-12, rtol=1e-12)
    norm = torch.nn.RMSNorm(8, eps=1e-5).double()
    torch.nn.init.normal_(norm.weight)
    W = torch.randn(5, 16, dtype=torch.float64)                       # after a norm of each 8-feature head
    folded, root_eps = folded_norm(norm, W)
    torch.testing.assert_close(unit(x.view(3, 2, 2, 8), root_eps).view(3, 2, 16) @ folded,
                               norm(x.view(3, 2, 2, 8)).view(3, 2, 16) @ W.T, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(("parts", "out", "expected"), [(1, 12, 1), (2, 12, 2), (3, 12, 3), (3, 10, 1)])
def test_step_weight_in_row_blocks_equals_the_matmul(parts, out, expected):
    """StepWeight keeps W [in, out] as `parts` blocks of W^T's rows (x @ W where out is not a multiple): x @ W and
    add + x @ W (a residual [B, out], a bias [out]) as the plain matmul, for one row and for three; matrix() is W."""
    torch.manual_seed(0)
    W = torch.randn(7, out, dtype=torch.float64)
    w = StepWeight(W, parts)
    assert w.parts == expected and torch.equal(w.matrix(), W)          # W back from either layout
    for rows in (1, 3):
        x, residual = torch.randn(rows, 7, dtype=torch.float64), torch.randn(rows, out, dtype=torch.float64)
        torch.testing.assert_close(w(x), x @ W, atol=1e-12, rtol=0)
        torch.testing.assert_close(w(x, residual), residual + x @ W, atol=1e-12, rtol=0)
        torch.testing.assert_close(w(x, residual[0]), residual[0] + x @ W, atol=1e-12, rtol=0)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize(("vendor", "blocks"), [("AuthenticAMD", True), ("GenuineIntel", False), ("", True)])
def test_step_weight_blocks_default_by_the_cpu(threads, vendor, blocks, monkeypatch):
    """By default a CPU weight takes a block per torch thread, and two on one thread (rows in one block
    read at half the speed), except on an Intel CPU, whose MKL spreads x @ W over the threads itself; a
    weight elsewhere (a CUDA decoder's: here the meta device) one block, since the split is for MKL."""
    monkeypatch.setattr(kda, "cpu_vendor", lambda: vendor)
    assert StepWeight(torch.zeros(4, 6)).parts == (max(2, threads) if blocks else 1)
    assert StepWeight(torch.zeros(4, 6, device="meta")).parts == 1


def test_cpu_vendor_reads_proc_cpuinfo(tmp_path):
    """The vendor_id of the first processor; '' for a file without one, or none (cached by path: a file each)."""
    amd, arm = tmp_path / "amd", tmp_path / "arm"
    amd.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n\n"
                   "processor\t: 1\nvendor_id\t: AuthenticAMD\n")
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")            # an ARM CPU's: no vendor_id
    assert kda.cpu_vendor(str(amd)) == "AuthenticAMD"
    assert kda.cpu_vendor(str(arm)) == ""
    assert kda.cpu_vendor(str(tmp_path / "absent")) == ""


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("arch", ["hybrid", "gpt"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"])
def test_step_logits_equal_the_full_forward_at_every_position(arch, batch, threads, vendor, monkeypatch):
    """Prefill 20 tokens, then 80 one-token steps (past a wrap of KDAStep's conv tape): float32 logits
    within float32 tolerance of the non-cached full forward, float64 to 1e-10; on one thread and on
    two, with each weight of the step in two blocks of rows (the head's 97 outputs in none: x @ W) as on
    AMD CPUs, and in one as on Intel's."""
    monkeypatch.setattr(kda, "cpu_vendor", lambda: vendor)
    for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-10)):
        model = small_model(arch, dtype)
        ids = torch.randint(0, 97, (batch, 100))
        with torch.no_grad():
            full = model(ids)
            cache = model.new_cache()
            model(ids[:, :20], cache)
        decoder = model.decoder(cache, batch, 100)
        weights = decoder.weights()
        # 2 per MLP, 3 per KDA mixer and 2 per attention (hybrid: 3 KDA + 1), the head (vocabulary 97: one block)
        assert len(weights) == (20 if arch == "hybrid" else 17) and weights[-1] is decoder.head
        assert decoder.head.parts == 1 and {w.parts for w in weights[:-1]} == {2 if vendor == "AuthenticAMD" else 1}
        steps = torch.stack([decoder(ids[:, t]) for t in range(20, 100)], dim=1)
        torch.testing.assert_close(steps, full[:, 20:], atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="built for 100 positions"):
        decoder(ids[:, 0])


@pytest.mark.parametrize("threads", [2], indirect=True)
@pytest.mark.parametrize("arch", ["hybrid", "gpt"])
def test_compiled_step_logits_equal_the_full_forward_at_every_position(arch, threads):
    """The compiled step (StaticKDAStep, StaticAttentionStep, SwiGLUStep in one torch.compile graph, each
    weight in one block, on two threads too): for 3 rows, a prefill of 20 and 80 steps, float32 logits
    within float32 tolerance of the full forward."""
    model = small_model(arch)
    ids = torch.randint(0, 97, (3, 100))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        model(ids[:, :20], cache)
    decoder = model.decoder(cache, 3, 100, compiled=True)
    assert {w.parts for step in decoder.steps for w in vars(step).values() if isinstance(w, StepWeight)} == {1}
    steps = torch.stack([decoder(ids[:, t]) for t in range(20, 100)], dim=1)
    torch.testing.assert_close(steps, full[:, 20:], atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="built for 100 positions"):
        decoder(ids[:, 0])


def test_compiled_decoding_of_many_prompt_lengths_shares_one_graph():
    """Each prompt length is a new max_len; the compiled step's KV caches round it up to a power of two
    (at least 256), so twelve lengths share one graph where they would exceed torch.compile's limit of 8
    recompiles (an error under fullgraph). Greedy tokens equal the eager step's for each."""
    model = small_model()
    for length in range(3, 15):
        prompt = torch.randint(0, 97, (1, length))
        assert torch.equal(generate(model, prompt, 6, compiled=True), generate(model, prompt, 6))


@pytest.mark.parametrize("arch", ["hybrid", "gpt"])
def test_fast_greedy_decode_is_the_argmax_of_the_full_forward(arch):
    model = small_model(arch)
    prompt = torch.randint(0, 97, (2, 37))
    out = generate(model, prompt, 90)
    with torch.no_grad():
        logits = model(out[:, :-1])
    assert torch.equal(logits[:, 36:].argmax(-1), out[:, 37:])
    assert torch.equal(out, generate(model, prompt, 90, fast=False))
    sampled = [generate(model, prompt, 30, temperature=1.0, top_k=20, seed=3, fast=fast) for fast in (True, False)]
    assert torch.equal(*sampled)


@pytest.mark.parametrize("compiled", [False, True])
def test_decoder_weights_are_what_a_step_reads_in_order(monkeypatch, compiled):
    """Decoder.weights (bench/decode.py's `weights_*` rows time them alone) lists every StepWeight a step calls, each
    once, in the order of the calls; the compiled decoder's too (its steps' weights, called eagerly here)."""
    model = small_model()
    with torch.no_grad():
        cache = model.new_cache()
        model(torch.randint(0, 97, (1, 9)), cache)
    decoder = model.decoder(cache, 1, 20, compiled=compiled)
    called = []
    step_weight_call = StepWeight.__call__
    monkeypatch.setattr(StepWeight, "__call__", lambda w, *a: called.append(w) or step_weight_call(w, *a))
    with torch.inference_mode():
        decoder.step(torch.tensor([3]))
    assert called == decoder.weights() and len({id(w) for w in called}) == len(called) == 20
    assert all(w.n_in == (w.w.shape[0] if w.parts == 1 else w.w.shape[-1]) for w in called)


def test_the_decoder_leaves_the_cache_and_the_tokens_usable():
    model = small_model()
    with torch.no_grad():
        cache = model.new_cache()
        model(torch.randint(0, 97, (1, 9)), cache)
    before = [{k: t.clone() for k, t in c.items()} for c in cache]
    decoder = model.decoder(cache, 1, 20)
    for t in range(5):
        decoder(torch.tensor([t]))
    assert all(torch.equal(c[k], b[k]) for c, b in zip(cache, before, strict=True) for k in c)
    out = model.generate(torch.randint(0, 97, (1, 5)), 4)         # tokens from inference mode feed training
    model.train()
    F.cross_entropy(model(out[:, :-1]).flatten(0, 1), out[:, 1:].flatten()).backward()


@pytest.mark.parametrize("over, named", [({"spike": True}, "research switch spike"),
                                         ({"token_drop": 0.5}, "research switch token_drop"),
                                         ({"use_predictive_coding": True}, "research switch use_predictive_coding"),
                                         ("int8", "Linears are INT8")])
def test_what_the_step_path_does_not_cover_decodes_through_forward(over, named):
    model = small_model(**({} if over == "int8" else over))
    if over == "int8":
        use_int8_linears(model, quantize_state_dict(model))
    assert model.decoder(model.new_cache(), 1, 10) is None
    prompt = torch.randint(0, 97, (1, 6))
    assert torch.equal(generate(model, prompt, 8), generate(model, prompt, 8, fast=False))
    with pytest.raises(ConfigError, match=f"compiled decoding: .*{named}"):
        generate(model, prompt, 8, compiled=True)


@pytest.mark.parametrize("arch", ["bdh", "hope"])
def test_other_architectures_stream_through_forward(arch):
    model = build_model({"arch": arch, "vocab_size": 97, "d_model": 32, "n_layers": 2, "n_heads": 2,
                         **({"bdh": {"neurons": 32}} if arch == "bdh" else {"head_dim": 8, "hope": {"hidden": 16}})})
    prompt = torch.randint(0, 97, (1, 6))
    streamed = torch.stack(list(stream(model.eval(), prompt, 5)), dim=1)
    with torch.no_grad():
        assert torch.equal(model(torch.cat([prompt, streamed[:, :-1]], 1))[:, 5:].argmax(-1), streamed)
