"""Research switches (docs/ablations.md): each off = the plain model, each on = does what it claims."""

import contextlib
import copy
import json
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import hatchling.model.spike as spike_mod
from hatchling.checkpoint import load_model, save_model
from hatchling.config import validate_params
from hatchling.errors import InputError
from hatchling.model import ModelConfig, build_model
from hatchling.model.kda import kda
from hatchling.model.memory import EpisodicStore
from hatchling.model.spike import LIFGate, kda_skipping_silent
from hatchling.research.gridworld import GridWorld, greedy_episode, train
from hatchling.stages import context
from hatchling.train.adapm import AdaPM
from hatchling.train.rl import KLController, RLConfig, Samples, completion_curiosity, rl_step
from hatchling.train.sparsity import cubic_sparsity, prune_and_regrow
from tests.conftest import TINY_PARAMS, copy_project

SMALL = dict(vocab_size=61, d_model=32, n_heads=2, head_dim=16, mlp_hidden=64, n_layers=4, chunk_size=8)


def model_with(seed=0, **switches):
    torch.manual_seed(seed)
    return build_model({**SMALL, **switches})


def plain_weights_into(model, plain):
    """Load the plain model's weights; return the names only the switched model has."""
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    return missing


# -- every switch off is the plain model; each switch in its neutral state changes nothing ---------------

def test_all_switches_off_is_exactly_the_plain_model():
    plain = model_with()
    off = model_with(use_predictive_coding=False, use_episodic_memory=False, spike=False, token_drop=0.0,
                     checkpoint_attention=False)
    assert list(off.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(), plain.state_dict().values(), strict=True))
    ids = torch.randint(0, 61, (2, 30))
    assert torch.equal(off(ids), plain(ids)) and off.aux_losses() == {}


@pytest.mark.parametrize("switch", [dict(use_predictive_coding=True), dict(use_episodic_memory=True),
                                    dict(spike=True), dict(token_drop=0.3), dict(checkpoint_attention=True)])
def test_each_switch_in_its_neutral_state_keeps_the_plain_outputs(switch):
    """Predictive head: no effect on logits; empty memory: nothing read; spikes on every token: plain
    KDA; routers keeping every token: plain blocks; checkpointing: same values."""
    plain = model_with().eval()
    model = model_with(**switch).eval()
    plain_weights_into(model, plain)
    for module in model.modules():
        if isinstance(module, LIFGate):          # a drive far above threshold fires on every token
            torch.nn.init.zeros_(module.drive.weight)
            torch.nn.init.constant_(module.drive.bias, 10.0)
    ids = torch.randint(0, 61, (2, 30))
    with torch.no_grad():
        assert torch.allclose(model(ids), plain(ids), atol=1e-6, rtol=0)


def test_research_switches_need_the_hybrid_arch():
    with pytest.raises(ValidationError, match=r"spike is read only by arch 'hybrid' \(arch is 'bdh'\)"):
        ModelConfig(arch="bdh", spike=True)


# -- predictive coding ------------------------------------------------------------------------------

def test_predictive_loss_falls_on_a_learnable_sequence():
    model = model_with(use_predictive_coding=True, predictive_weight=1.0)
    ids = torch.arange(40).remainder(5)[None].repeat(4, 1)                # 0 1 2 3 4 0 1 ...
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        model(ids)
        loss = model.aux_losses()["predictive_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    c = model.predictor.curiosity
    assert c.shape == (4, 39) and torch.allclose(c.mean(), torch.tensor(1.0))       # normalised error


def test_curiosity_bonus_reads_the_completion_and_needs_the_head():
    model = model_with(use_predictive_coding=True).eval()
    prompts, tokens = torch.randint(0, 61, (3, 5)), torch.randint(0, 61, (3, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    samples = Samples(prompts, tokens, mask, torch.zeros(3, 4))
    with torch.no_grad():
        model(torch.cat([prompts, tokens], 1))
    bonus = completion_curiosity(model, samples)
    expect = torch.stack([model.predictor.curiosity[i, 4:4 + n].mean() for i, n in enumerate([4, 2, 1])])
    assert torch.allclose(bonus, expect)
    with pytest.raises(ValueError, match="use_predictive_coding"):
        completion_curiosity(model_with(), samples)


def test_curiosity_bonus_alone_drives_an_rl_update():
    """With a verifier that always says 0, only the intrinsic bonus makes advantages non-zero."""
    moved = []
    for coef in (0.0, 1.0):
        policy = model_with(use_predictive_coding=True)
        ref = copy.deepcopy(policy).eval()
        before = [p.detach().clone() for p in policy.parameters()]
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0)
        cfg = RLConfig(k=4, max_new_tokens=3, temperature=1.0, epsilon_clip=0.2, rho_max=2.0, ppo_epochs=1,
                       curiosity_coef=coef)
        stats = rl_step(policy, ref, opt, [[1, 2, 3], [4, 5, 6]], lambda i, c: 0.0, cfg, KLController(0.05, 0.1, 10),
                        stop_ids=[0], generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
        moved.append(sum(float((p - b).abs().sum()) for p, b in zip(policy.parameters(), before, strict=True)))
        assert (stats["curiosity_bonus"] > 0) == (coef > 0)
    assert moved[0] == 0 and moved[1] > 0


def test_rlvr_curiosity_bonus_needs_a_predictive_model(pretrained_project, tmp_path):
    from hatchling.train import rlvr

    proj = copy_project(pretrained_project, tmp_path / "p")
    tree = json.loads(json.dumps(TINY_PARAMS))
    tree["rlvr"]["use_curiosity_bonus"] = True
    with pytest.raises(ValueError, match="rlvr.use_curiosity_bonus.*no predictive-coding head"):
        rlvr.run(context("rlvr", validate_params(tree), proj))
    assert (proj / "checkpoints/rlvr/model.safetensors").read_bytes() == \
        (pretrained_project / "checkpoints/rlvr/model.safetensors").read_bytes()


# -- episodic memory --------------------------------------------------------------------------------

def unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_memory_write_read_round_trip_and_eviction_at_the_cap(tmp_path):
    store = EpisodicStore(dim=8, capacity=5, path=tmp_path / "m.sqlite")
    keys = unit(8, 8, 0)
    store.write(keys[:3], np.array([10, 11, 12]), np.array([1.0, 2.0, 3.0]), ["a", "b", "c"], step=1)
    scores, tokens = store.search(keys[1:2], k=2)
    assert tokens[0, 0] == 11 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    store.write(keys[3:], np.arange(13, 18), np.ones(5), list("defgh"), step=2)
    assert len(store) == 5 and store.evicted == 3
    assert [r[0] for r in store.entries()] == [3, 4, 5, 6, 7]                  # the oldest three went
    assert store.search(keys[0:1], k=1)[1][0, 0] != 10                          # ... from FAISS too
    assert store.search(keys[6:7], k=1)[1][0, 0] == 16
    assert store.search(keys[6:7], k=9)[1][0, -1] == -1                          # fewer than k entries


def test_memory_persists_across_processes(tmp_path):
    script = (
        "import numpy as np, torch\n"
        "from hatchling.model import build_model\n"
        "from hatchling.checkpoint import save_model\n"
        f"m = build_model({SMALL!r} | dict(use_episodic_memory=True, memory_capacity=50))\n"
        "m.train()\n"
        "for s in range(3): m(torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(s)))\n"
        f"save_model(m, {str(tmp_path / 'ck')!r}, {{}})\n"
        "print(len(m.memory.store))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    written = int(out.stdout.split()[-1])
    model, _ = load_model(tmp_path / "ck")
    store = model.memory.store
    assert written > 0 and len(store) == written == len(store.entries())
    key = store.index.reconstruct(int(store.entries()[0][0]))[None]
    assert store.search(key, 1)[1][0, 0] == store.entries()[0][2]                # vector and row agree
    assert torch.isfinite(model.memory.surprise_threshold)                      # the threshold came too


def test_a_live_memory_file_starts_empty_and_a_loaded_checkpoint_leaves_it_alone(tmp_path):
    """model.memory_path mirrors the training run's store: a second run over the same file starts it empty (it
    failed on the ids already there); eval or generation loading that run's checkpoint keeps its memory in its
    own process (it replaced the live file's rows with the checkpoint's)."""
    live = tmp_path / "live.sqlite"

    def rows() -> int:
        with contextlib.closing(sqlite3.connect(live)) as db:
            return db.execute("SELECT count(*) FROM entries").fetchone()[0]

    config = SMALL | dict(use_episodic_memory=True, memory_path=str(live), memory_write_fraction=0.5)
    for run in range(2):
        torch.manual_seed(run)
        model = build_model(config).train()
        model(torch.randint(0, 61, (2, 16)))
        assert rows() == len(model.memory.store) > 0
    save_model(model, tmp_path / "ck", {})
    model(torch.randint(0, 61, (2, 16)))                               # the run goes on after its checkpoint
    training = rows()
    loaded, _ = load_model(tmp_path / "ck")
    assert rows() == training == len(model.memory.store) > len(loaded.memory.store) > 0


def test_a_checkpoints_memory_files_missing_or_garbled_are_named(tmp_path):
    torch.manual_seed(0)
    model = build_model(SMALL | dict(use_episodic_memory=True, memory_write_fraction=0.5)).train()
    model(torch.randint(0, 61, (2, 16)))
    for name, content, message in (("memory.sqlite", None, r"no episodic memory file .*ck/memory.sqlite"),
                                   ("memory.sqlite", b"garbage" * 100, r"corrupted episodic memory .*memory.sqlite"),
                                   ("memory.faiss", b"garbage", r"corrupted episodic memory index .*memory.faiss")):
        save_model(model, tmp_path / "ck", {})
        if content is None:
            (tmp_path / "ck" / name).unlink()
        else:
            (tmp_path / "ck" / name).write_bytes(content)
        with pytest.raises(InputError, match=message):
            load_model(tmp_path / "ck")
        assert (content is None) != (tmp_path / "ck" / name).exists()      # a load never writes into the checkpoint


def test_memory_reads_on_uncertain_tokens_within_budget_and_stays_causal():
    torch.manual_seed(0)
    model = model_with(use_episodic_memory=True, memory_budget=0.25)
    model.train()
    for _ in range(2):
        model(torch.randint(0, 61, (2, 40)))
        penalty = model.aux_losses()["memory_penalty"]
    stats = model.pass_stats()
    assert stats["memory_size"] > 0 and 0 < stats["memory_gate_mean"] < 1 and stats["memory_read_fraction"] == 1.0
    assert penalty.item() == pytest.approx((stats["memory_access_mean"] - 0.25) ** 2, rel=1e-4)
    penalty.backward()
    assert model.memory.access.weight.grad.abs().sum() > 0                     # the budget is differentiable
    model.eval()
    size = len(model.memory.store)
    ids = torch.randint(0, 61, (1, 30))
    ids2 = ids.clone()
    ids2[:, 20:] = torch.randint(0, 61, (1, 10))
    with torch.no_grad():
        assert torch.allclose(model(ids)[:, :20], model(ids2)[:, :20], atol=1e-6)
        cache = model.new_cache()
        steps = torch.cat([model(ids[:, :12], cache)] + [model(ids[:, t:t + 1], cache) for t in range(12, 30)], 1)
        assert torch.allclose(steps, model(ids), atol=1e-5)
    assert len(model.memory.store) == size                                       # eval never writes
    model.memory.write_in_eval = True                    # generation may store what surprises it
    model.memory.surprise_threshold.fill_(0.0)           # ... here: everything
    model.generate(ids, max_new_tokens=5)
    # 29 prompt tokens have a context; then 4 of the 5 sampled tokens are fed back, each with the
    # previous call's last state as its context (the 5th is never fed)
    assert len(model.memory.store) == size + 29 + 4


# -- Spike-KDA --------------------------------------------------------------------------------------

def test_rl_stores_each_sample_once_however_many_ppo_epochs():
    """PPO's later epochs revisit the first epoch's samples: the memory must not store them again."""
    stored = {}
    for epochs in (1, 3):
        policy = model_with(use_episodic_memory=True, memory_capacity=10_000)
        ref = copy.deepcopy(policy).eval()
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)          # weights fixed: same samples, same surprises
        cfg = RLConfig(k=4, max_new_tokens=6, temperature=1.0, epsilon_clip=0.2, rho_max=2.0, ppo_epochs=epochs)
        rl_step(policy, ref, opt, [[1, 2, 3], [4, 5, 6]], lambda i, c: float(len(c)), cfg, KLController(0.05, 0.1, 10),
                stop_ids=[0], generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
        stored[epochs] = (len(policy.memory.store), float(policy.memory.surprise_threshold))
        assert not policy.memory.writes_paused
    assert stored[1][0] > 0 and stored[3] == stored[1]


def test_lif_fires_by_its_dynamics_and_has_a_surrogate_gradient():
    gate = LIFGate(4, 2, threshold=1.0, decay=0.5)
    torch.nn.init.zeros_(gate.drive.weight)
    with torch.no_grad():
        gate.drive.bias.copy_(torch.tensor([0.4, 0.6]))
    s = gate(torch.zeros(1, 12, 4))[0]
    assert s[:, 0].sum() == 0                             # u -> 0.8 < 1: never fires
    assert 0 < s[:, 1].sum() < 12                         # u -> 1.2: fires, resets, charges again
    gate.drive.weight.requires_grad_(True)
    x = torch.randn(2, 12, 4)
    gate(x).sum().backward()
    assert gate.drive.weight.grad.abs().sum() > 0 and gate.drive.bias.grad.abs().sum() > 0


def test_silent_heads_skip_their_kda_work_and_match_the_gated_update(monkeypatch):
    torch.manual_seed(0)
    B, T, H, K = 3, 20, 4, 8
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, K, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, K, dtype=torch.float64)
    g = -torch.rand(B, T, H, K, dtype=torch.float64)
    beta = torch.rand(B, T, H, dtype=torch.float64)
    spikes = (torch.rand(B, T, H) < 0.5).double()
    spikes[0, :, 1] = 0
    spikes[2, :, 3] = 0                                   # two (batch, head) pairs never fire
    S0 = torch.randn(B, H, K, K, dtype=torch.float64)
    rows = []
    monkeypatch.setattr(spike_mod, "kda", lambda *a, **kw: rows.append(a[0].shape[0]) or kda(*a, **kw))
    o, state, skipped = kda_skipping_silent(q, k, v, g, beta, spikes, initial_state=S0, output_final_state=True,
                                            chunk_size=8, backend="chunked")
    assert rows == [B * H - 2] and skipped == pytest.approx(2 / 12)             # only active pairs ran
    ref_o, ref_state = kda(q, k, v, g * spikes[..., None], beta * spikes, initial_state=S0,
                           output_final_state=True, backend="recurrent")
    assert torch.allclose(o, ref_o, atol=1e-10) and torch.allclose(state, ref_state, atol=1e-10)
    assert torch.equal(state[0, 1], S0[0, 1])                                   # silent: state untouched


def test_silent_heads_still_get_their_spikes_gradient_in_training():
    """A head silent over the whole window must still learn to fire: in training no pair is skipped and the
    gradient reaching every spike is the gated update's."""
    torch.manual_seed(0)
    B, T, H, K = 2, 12, 3, 8
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, K, dtype=torch.float64), dim=-1) for _ in range(2))
    v, w = torch.randn(B, T, H, K, dtype=torch.float64), torch.randn(B, T, H, K, dtype=torch.float64)
    g = -torch.rand(B, T, H, K, dtype=torch.float64)
    beta = torch.rand(B, T, H, dtype=torch.float64)
    fired = (torch.rand(B, T, H) < 0.5).double()
    fired[0, :, 1] = 0                                    # (row 0, head 1) silent throughout
    grads = []
    for skipping in (True, False):
        spikes = fired.clone().requires_grad_(True)
        if skipping:
            o, _, skipped = kda_skipping_silent(q, k, v, g, beta, spikes, chunk_size=4, backend="chunked")
            assert skipped == 0.0
        else:
            o, _ = kda(q, k, v, g * spikes[..., None], beta * spikes, chunk_size=4, backend="recurrent")
        (o * w).sum().backward()
        grads.append(spikes.grad)
    assert grads[1][0, :, 1].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=1e-8)


# -- token dropping ---------------------------------------------------------------------------------

def dropping_model():
    model = model_with(token_drop=0.5).eval()
    for block in model.blocks:
        if block.router is not None:
            torch.nn.init.normal_(block.router.score.weight, std=1.0)
            torch.nn.init.zeros_(block.router.score.bias)
    return model


def test_dropped_tokens_skip_the_block_and_kept_ones_see_only_kept_ones():
    model = dropping_model()
    block = next(b for b in model.blocks if b.router is not None)
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        keep = block.router.score(x).squeeze(-1) > 0
        assert 0 < keep.float().mean() < 1
        out = block(x)
        for b in range(2):
            kept = x[b][keep[b]][None]
            assert torch.equal(out[b][~keep[b]], x[b][~keep[b]])                # dropped: residual only
            assert torch.allclose(out[b][keep[b]], block.transform(kept)[0], atol=1e-5)
    assert block.router.last_stats["tokens_kept"] == pytest.approx(float(keep.float().mean()))


def test_token_dropping_is_causal_and_streams_like_the_full_pass():
    model = dropping_model()
    ids = torch.randint(0, 61, (3, 30))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()        # rows keep different numbers of tokens: row-by-row path
        steps = torch.cat([model(ids[:, :9], cache)] + [model(ids[:, t:t + 1], cache) for t in range(9, 30)], 1)
        ids2 = ids.clone()
        ids2[:, 15:] = torch.randint(0, 61, (3, 15))
        assert torch.allclose(model(ids2)[:, :15], full[:, :15], atol=1e-6)
    assert torch.allclose(steps, full, atol=1e-5)


def test_gradient_checkpointing_of_attention_blocks_gives_the_same_gradients():
    ids = torch.randint(0, 61, (2, 20))
    grads = []
    for on in (False, True):
        model = model_with(checkpoint_attention=on).train()
        model(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


# -- AdaPM and sparsity -----------------------------------------------------------------------------

def test_adapm_with_pinned_momentum_is_adamw_and_adapts_per_channel():
    torch.manual_seed(0)
    w0 = torch.randn(6, 5)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours = AdaPM([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, beta_range=(0.9, 0.9))
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(20):
        g = torch.randn(6, 5)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, atol=1e-6)

    p = torch.nn.Parameter(torch.zeros(2, 3))
    opt = AdaPM([p], lr=1e-3, betas=(0.9, 0.95), beta_range=(0.5, 0.98), rate=0.05)
    for t in range(30):     # channel 0: the same direction every step; channel 1: flips sign
        p.grad = torch.tensor([[1.0, 2.0, 3.0], [(-1.0) ** t] * 3])
        opt.step()
    beta1 = opt.state[p]["beta1"].flatten()
    assert beta1[0] == pytest.approx(0.98) and beta1[1] < 0.6


def test_prune_and_regrow_holds_the_count_and_regrows_by_gradient():
    assert cubic_sparsity(0, 0.8, 10, 110) == 0 and cubic_sparsity(200, 0.8, 10, 110) == pytest.approx(0.8)
    assert cubic_sparsity(30, 0.8, 10, 110) == pytest.approx(0.8 * (1 - 0.8 ** 3))  # 20% of the way: 49% of it
    w = torch.arange(1.0, 21.0).view(4, 5)
    grad = torch.zeros(4, 5)
    grad[0, 0] = 100.0                                    # the smallest weight has the largest gradient
    mask = prune_and_regrow(w, grad, sparsity=0.5, regrow=0.1)
    assert int(mask.sum()) == 10
    assert mask[0, 0] and mask.flatten()[-9:].all()       # regrown + the 9 largest survivors
    assert not mask.flatten()[1:11].any()


def test_pretrain_with_every_switch_on(tokenized_project, tmp_path):
    """All switches through the real pretrain stage: their losses and stats are logged, the target
    sparsity is reached with pruned weights exactly zero, the memory is saved with the checkpoint."""
    from hatchling.train import pretrain

    proj = copy_project(tokenized_project, tmp_path / "p")
    tree = json.loads(json.dumps(TINY_PARAMS))
    tree["model"].update(use_predictive_coding=True, use_episodic_memory=True, spike=True, token_drop=0.25,
                         checkpoint_attention=True, n_layers=4)
    tree["pretrain"].update(optimizer="adapm", max_steps=8,
                            sparsity={"mlp": 0.5, "mixer": 0.25, "every": 2, "regrow": 0.1, "end_fraction": 0.5})
    logged = []
    metrics = pretrain.run(context("pretrain", validate_params(tree), proj, lambda m, step: logged.append(m)))
    assert np.isfinite(metrics["val_loss"])
    keys = set().union(*logged)
    assert {"predictive_loss", "memory_penalty", "token_drop_loss", "spike_rate", "silent_heads_skipped",
            "tokens_kept", "memory_size", "sparsity", "adapm_beta1", "val_spike_rate"} <= keys
    model, _ = load_model(proj / "checkpoints/pretrain")
    for block in model.blocks:
        assert (block.mlp.down.weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)
        assert (block.mixer.o_proj.weight == 0).float().mean() == pytest.approx(0.25, abs=0.01)
    assert logged[-2]["sparsity"] > 0.25
    assert len(model.memory.store) > 0 and (proj / "checkpoints/pretrain/memory.sqlite").is_file()


# -- the curiosity gridworld ------------------------------------------------------------------------

def test_gridworld_greedy_policy_reaches_the_goal(tmp_path):
    world = GridWorld(4)
    assert world.step(0, 0) == 0 and world.step(0, 3) == 1 and world.step(0, 1) == 4    # walls hold
    model, rows = train(world, iterations=40, csv_path=tmp_path / "grid.csv")
    reached, steps = greedy_episode(model, world)
    assert reached and steps <= 2 * (world.size - 1) + 2
    header = (tmp_path / "grid.csv").read_text().splitlines()[0].split(",")
    assert "curiosity_bonus" in header and len(rows) == 40
    assert rows[0]["reached_fraction"] < rows[-1]["reached_fraction"]


def test_lif_fast_backward_equals_the_autograd_reference():
    from hatchling.model.spike import LIFFunction, lif_reference

    drive = torch.randn(3, 40, 4, dtype=torch.float64, requires_grad=True)
    u0 = torch.rand(3, 4, dtype=torch.float64)
    spikes, u = LIFFunction.apply(drive, u0, 1.0, 0.7)
    ref_spikes, ref_u = lif_reference(drive, u0, 1.0, 0.7)
    assert torch.equal(spikes, ref_spikes) and torch.allclose(u, ref_u) and 0 < spikes.mean() < 1
    g = torch.randn_like(spikes)
    fast, = torch.autograd.grad((spikes * g).sum(), drive)
    slow, = torch.autograd.grad((ref_spikes * g).sum(), drive)
    torch.testing.assert_close(fast, slow)
