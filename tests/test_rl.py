"""RLVR: the losses against hand-computed values, the KL controller, verifiers, a seeded RL run that
learns an easy verifiable task, and the stage's log."""

from __future__ import annotations

import copy
import csv
import dataclasses
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
    same_length,
    sample_groups,
)
from hatchling.train.rlvr import choose_tier


def test_group_advantages_normalize_within_each_prompt():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]]))
    assert adv[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]          # no signal when every sample scores the same


def test_prompts_are_grouped_by_length_each_once_in_order():
    prompts = [[1, 2], [3], [4, 5], [6, 7, 8], [9], [1, 1]]
    assert same_length(prompts) == [[0, 2, 5], [1, 4], [3]]
    assert same_length([]) == []


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


def test_sampled_pass_rates_are_seeded_and_cold_sampling_gives_the_greedy_answers(pretrained_project):
    """An item's sampled pass rate is its share of k samples the verifier accepts: near temperature 0
    every sample is the greedy answer; at temperature 1 under `seeded` the draws repeat and torch's
    own random stream is left where it was."""
    from hatchling.checkpoint import load_model
    from hatchling.data.chat import render_chat, stop_ids
    from hatchling.data.tokenizer import TOKENIZER, load_tokenizer
    from hatchling.inference import generate_texts
    from hatchling.io import read_jsonl
    from hatchling.tasks.math import Math
    from hatchling.train.rlvr import sampled_pass_rates, seeded

    class Echo(Math):                        # accepts exactly the answer the item names
        def score(self, item, completion):
            return completion == item["expected"]

    cpu = torch.device("cpu")
    model, _ = load_model(pretrained_project / "checkpoints/sft", cpu)
    tok = load_tokenizer(pretrained_project / "checkpoints/sft" / TOKENIZER)
    items = [{**x, "kind": "math"} for x in read_jsonl(pretrained_project / "data/tasks/math_train.jsonl")][:6]
    prompts = [render_chat(tok, [{"role": "user", "content": Math().question(x)}], add_generation_prompt=True)
               for x in items]
    greedy = generate_texts(model, prompts, 6, tok.decode, stop_ids=stop_ids(tok), device=cpu)
    items = [{**x, "expected": g} for x, g in zip(items, greedy, strict=True)]
    tasks = {"math": Echo()}
    assert sampled_pass_rates(model, tok, items, 3, 6, 1e-4, tasks, None, cpu) == [1.0] * 6
    state = torch.get_rng_state()
    with seeded(5, cpu):
        warm = sampled_pass_rates(model, tok, items, 4, 6, 1.0, tasks, None, cpu)
    assert torch.equal(torch.get_rng_state(), state)
    with seeded(5, cpu):
        assert sampled_pass_rates(model, tok, items, 4, 6, 1.0, tasks, None, cpu) == warm
    assert all(4 * r in (0, 1, 2, 3, 4) for r in warm) and warm != [1.0] * 6


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
    assert 0 <= stats["tis_truncated"] < 0.5
    # the same step with every importance weight truncated (rho_max below any ratio) says so
    everything = rl_step(policy, ref, optimizer, batch, lambda i, c: 0.0, dataclasses.replace(cfg, rho_max=0.0),
                         kl, stop_ids=[0], generator=gen, device=torch.device("cpu"))
    assert everything["tis_truncated"] == pytest.approx(1.0)


def heldout_rates(project, checkpoint: str, tier: int, tasks) -> tuple[float, list[float]]:
    """A checkpoint's greedy pass rate on the held-out items RLVR scores (its tier's first eval_items) and
    each item's share of k samples that pass, drawn as the stage draws them: recomputed from the checkpoint
    through the library."""
    from hatchling.checkpoint import load_for_inference
    from hatchling.config import load_params
    from hatchling.model.device import resolve_device
    from hatchling.tasks.base import by_tier
    from hatchling.train.rlvr import load_items, pass_rate, sampled_pass_rates, seeded

    p = load_params(project / "params.yaml").rlvr
    device = resolve_device(p.device)
    model, tokenizer, _ = load_for_inference(project / "checkpoints" / checkpoint, device=device)
    heldout = by_tier(load_items(project / "data/tasks", p.tasks, "heldout"))[tier]
    heldout = heldout[:p.eval_items] if p.eval_items else heldout
    greedy = pass_rate(model, tokenizer, heldout, p.max_new_tokens, tasks, device)
    with seeded(p.seed + 1, device):
        sampled = sampled_pass_rates(model, tokenizer, heldout, p.k, p.max_new_tokens, p.temperature, tasks, None,
                                     device)
    return greedy, sampled


def check_heldout_report(project, tasks) -> dict:
    """reports/rlvr.json's held-out pass rates are those of checkpoints/sft (before) and checkpoints/rlvr
    (after), greedy and sampled, with their intervals."""
    from hatchling.stats import wilson_interval
    from hatchling.train.rlvr import mean_interval

    report = json.loads((project / "reports/rlvr.json").read_text())
    n = report["heldout_items"]
    for when, checkpoint in (("before", "sft"), ("after", "rlvr")):
        greedy, sampled = heldout_rates(project, checkpoint, report["tier"], tasks)
        assert len(sampled) == n and report[f"heldout_pass_{when}"] == greedy, when
        assert report[f"heldout_pass_{when}_ci"] == pytest.approx(list(wilson_interval(greedy * n, n))), when
        mean, low, high = mean_interval(sampled)
        assert report[f"heldout_sampled_pass_{when}"] == pytest.approx(mean), when
        assert report[f"heldout_sampled_pass_{when}_ci"] == pytest.approx([low, high]), when
    assert report["heldout_gain"] == pytest.approx(report["heldout_pass_after"] - report["heldout_pass_before"])
    return report


def test_rlvr_stage_logs_every_step(pretrained_project):
    from hatchling.config import load_params
    from hatchling.train.rlvr import families

    rows = list(csv.DictReader((pretrained_project / "logs/rlvr.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert {"reward_mean", "pass_rate", "kl", "kl_coef", "clip_fraction", "tis_truncated", "entropy",
            "response_length"} <= set(rows[0])
    assert float(rows[1]["kl_coef"]) != float(rows[0]["kl_coef"])            # the controller acted
    report = check_heldout_report(pretrained_project, families(load_params(
        pretrained_project / "params.yaml").rlvr.sandbox_timeout_s))
    assert report["heldout_items"] == 2 and set(report["tier_pass_rates"]) == {"1", "2", "3", "4"}
    for when in ("before", "after"):        # each item's share of k = 2 samples: a multiple of 1/2, averaged
        assert (4 * report[f"heldout_sampled_pass_{when}"]).is_integer()
    gain = report["heldout_sampled_pass_after"] - report["heldout_sampled_pass_before"]
    assert report["heldout_sampled_gain"] == gain
    assert json.loads((pretrained_project / "checkpoints/rlvr/model.json").read_text())["stage"] == "rlvr"


def test_rlvr_reports_the_pass_rates_of_its_checkpoints(pretrained_project, tmp_path, monkeypatch, own_tracking):
    """With a verifier the tiny model can satisfy (an answer with a space in it) RL moves the policy, and the
    held-out pass rates it reports before and after are those of checkpoints/sft and checkpoints/rlvr,
    recomputed from them, greedy and sampled with the stage's seeding."""
    import hatchling.train.rlvr as rlvr
    from hatchling.tasks.math import Math
    from tests.conftest import copy_project, hatchling_here

    class Spaced(Math):
        def score(self, item, completion):
            return " " in completion

    tasks = {"math": Spaced()}
    proj = copy_project(pretrained_project, tmp_path / "proj")
    monkeypatch.setattr(rlvr, "families", lambda timeout: tasks)
    assert hatchling_here(proj, "run", "rlvr", "--set", "rlvr.lr=0.1", "--set", "rlvr.tier=1") == 0
    report = check_heldout_report(proj, tasks)
    # the premise: RL changed both measures, so that a report of the SFT model's rates after RL would differ
    assert report["heldout_pass_after"] != report["heldout_pass_before"]
    assert report["heldout_sampled_pass_after"] != report["heldout_sampled_pass_before"]


def test_rl_trains_on_the_tier_whose_groups_are_most_often_mixed():
    """Saturated and hopeless items teach nothing (every answer in their group gets the same reward):
    the tier chosen has the largest mean p(1 - p) over its items' sampled pass rates p, which a mean
    pass rate alone cannot tell; ties go to the lower tier."""
    assert choose_tier({1: [0.95, 1.0], 2: [0.4, 0.5], 3: [0.0, 0.0]}) == 2
    assert choose_tier({1: [1.0, 1.0], 2: [0.0, 0.0]}) == 1
    assert choose_tier({1: [0.3], 2: [0.7]}) == 1 and choose_tier({1: [0.8], 2: [0.6]}) == 2
    # a mean of 1/2 from items always right or always wrong, against items right a quarter of the time
    assert choose_tier({1: [1.0, 0.0, 1.0, 0.0], 2: [0.25, 0.25, 0.25, 0.25]}) == 2
