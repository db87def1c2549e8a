"""RLVR: the losses against hand-computed values, the KL controller, verifiers, a seeded RL run that
learns an easy verifiable task, and the stage's log."""

from __future__ import annotations

import copy
import csv
import json
import math
import random

import pytest
import torch

from hatchling.model import build_model
from hatchling.train.rl import (
    KLController,
    RLConfig,
    completion_logprobs,
    group_advantages,
    kl_k3,
    ppo_loss,
    rl_step,
    sample_groups,
)
from hatchling.train.rlvr import choose_tier


def test_group_advantages_normalize_within_each_prompt():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]]))
    assert adv[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]          # no signal when every sample scores the same


def test_ppo_clipping_and_truncated_importance_weights_by_hand():
    # two completions of two tokens; old = behavior except token (0, 1) where the sampler differed
    old = torch.log(torch.tensor([[0.5, 0.5], [0.4, 0.2]]))
    behavior = torch.log(torch.tensor([[0.5, 0.1], [0.4, 0.2]]))
    new = torch.log(torch.tensor([[0.8, 0.5], [0.2, 0.3]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[True, True], [True, False]])
    loss, stats = ppo_loss(new, old, behavior, adv, mask, epsilon_clip=0.2, rho_max=2.0)
    # ratios: 1.6 (clipped to 1.2, A>0: min(1.6, 1.2) = 1.2), 1.0, 0.5 (A<0: min(-0.5, -0.8) = -0.8); masked out
    # truncated IS: token (0,1) has old/behavior = 5 -> 2.0; the others 1
    by_hand = -(1.0 * 1.2 + 2.0 * 1.0 * 1.0 + 1.0 * -0.8) / 3
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    assert stats["clip_fraction"] == pytest.approx(2 / 3) and stats["tis_truncated"] == pytest.approx(1 / 3)


def test_kl_k3_is_zero_at_equality_and_matches_the_formula():
    logp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.5, 0.5]))
    assert kl_k3(logp, logp).tolist() == [0.0, 0.0]
    assert kl_k3(logp, ref)[1].item() == pytest.approx(2.0 - math.log(2.0) - 1.0)


def test_kl_controller_moves_toward_the_target():
    ctl = KLController(init=0.1, target=0.5, horizon=10)
    assert ctl.update(1.0) == pytest.approx(0.1 * (1 + 0.2 / 10))      # above target (error clipped to 0.2): up
    ctl = KLController(init=0.1, target=0.5, horizon=10)
    assert ctl.update(0.4) == pytest.approx(0.1 * (1 - 0.2 / 10))      # below target: down
    ctl = KLController(init=0.1, target=0.5, horizon=10)
    assert ctl.update(0.5) == pytest.approx(0.1)


@pytest.mark.parametrize("arch", ["hybrid", "gpt"])
def test_sampled_log_probs_are_the_training_passes(arch):
    """The sampler (prefill, then one-token steps with the cache) and the update's full forward pass agree on
    every sampled token's log-probability, so the importance weights start at 1; a stop token ends a
    completion and masks what follows."""
    torch.manual_seed(0)
    model = build_model({"arch": arch, "size": "toddler", "vocab_size": 12, "d_model": 32, "n_layers": 4,
                         "n_heads": 2, "head_dim": 16, "n_kv_heads": 1, "mlp_hidden": 64,
                         **({"chunk_size": 8} if arch == "hybrid" else {})})
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10, 11, 2]]
    s = sample_groups(model, prompts, k=4, max_new_tokens=20, temperature=0.9, stop_ids=[1],
                      generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert s.tokens.shape == s.mask.shape == s.behavior_logp.shape and s.tokens.shape[0] == 8
    assert torch.equal(s.prompts, torch.tensor(prompts).repeat_interleave(4, dim=0))
    with torch.no_grad():
        full = completion_logprobs(model, s, 0.9)
    assert torch.allclose(full[s.mask], s.behavior_logp[s.mask], atol=1e-4)
    stopped = (s.tokens == 1) & s.mask
    assert stopped.any(), "no completion stopped: pick another seed"
    for row, col in stopped.nonzero().tolist():
        assert not s.mask[row, col + 1:].any() and not s.tokens[row, col + 1:].any()


def test_seeded_rl_run_learns_an_easy_verifiable_task():
    """Reward 1 when the first generated token repeats the first token of the prompt. A random
    toddler model answers held-out prompts at chance; 30 RL steps lift greedy accuracy by > 0.4."""
    torch.manual_seed(0)
    vocab = 8
    policy = build_model({"size": "toddler", "vocab_size": vocab, "d_model": 32, "n_layers": 2, "n_heads": 2,
                          "head_dim": 16, "n_kv_heads": 1, "mlp_hidden": 64, "chunk_size": 16})
    ref = copy.deepcopy(policy).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3, weight_decay=0.0)

    def prompts(rng, n):
        return [[rng.randrange(2, vocab) for _ in range(3)] + [1] for _ in range(n)]

    @torch.no_grad()
    def heldout_accuracy():
        x = torch.tensor(prompts(random.Random(123), 64))
        return float((policy(x)[:, -1].argmax(-1) == x[:, 0]).float().mean())

    before = heldout_accuracy()
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    cfg = RLConfig(k=8, max_new_tokens=2, temperature=1.0, epsilon_clip=0.2, rho_max=2.0, ppo_epochs=2)
    kl = KLController(0.05, 0.5, 10)
    rewards = []
    for _ in range(30):
        batch = prompts(rng, 16)
        stats = rl_step(policy, ref, optimizer, batch, lambda i, c, b=batch: float(bool(c) and c[0] == b[i][0]),
                        cfg, kl, stop_ids=[0], generator=gen, device=torch.device("cpu"))
        rewards.append(stats["reward_mean"])
    after = heldout_accuracy()
    assert after > before + 0.4, (before, after)
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2 and stats["kl"] > 0


def test_rlvr_stage_logs_every_step(pretrained_project):
    rows = list(csv.DictReader((pretrained_project / "logs/rlvr.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert {"reward_mean", "pass_rate", "kl", "kl_coef", "clip_fraction", "entropy", "response_length"} <= set(rows[0])
    assert float(rows[1]["kl_coef"]) != float(rows[0]["kl_coef"])            # the controller acted
    report = json.loads((pretrained_project / "reports/rlvr.json").read_text())
    assert report["heldout_items"] == 2 and 0 <= report["heldout_pass_after"] <= 1
    assert report["tier"] == choose_tier({int(t): r for t, r in report["tier_pass_rates"].items()})
    assert set(report["tier_pass_rates"]) == {"1", "2", "3", "4"}
    assert json.loads((pretrained_project / "checkpoints/rlvr/model.json").read_text())["stage"] == "rlvr"


def test_rl_trains_on_the_tier_where_the_policy_is_least_sure():
    """Saturated and hopeless tiers teach nothing (every group's rewards are equal): the tier chosen
    has the pass rate nearest 1/2; ties go to the lower tier."""
    assert choose_tier({1: 0.95, 2: 0.4, 3: 0.0}) == 2
    assert choose_tier({1: 1.0, 2: 0.0}) == 1
    assert choose_tier({1: 0.3, 2: 0.7}) == 1 and choose_tier({1: 0.8, 2: 0.6}) == 2
