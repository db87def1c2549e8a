"""RL with verifiable rewards: PPO-lite with group-normalized advantages, truncated importance
weights and an adaptive KL penalty to a frozen reference policy.

One step (`rl_step`):

1. for each prompt, sample k completions from the current policy (the *behavior* policy: the
   cached decoding path at the sampling temperature), keeping each token's log-probability;
2. score them with a verifier; advantages are the rewards normalized within each prompt's group
   (GRPO-style: no value network);
3. recompute the sampled tokens' log-probabilities with the full (training) forward pass before
   any update (the *old* policy). Sampler and trainer compute differently (recurrent decode vs
   chunked pass), so each token's loss is weighted by the truncated importance ratio
   min(π_old / π_behavior, rho_max);
4. `ppo_epochs` updates on the same samples with the token-level clipped PPO objective (ratio
   π_new / π_old clipped to 1 ± epsilon_clip) plus kl_coef · KL(π_new ‖ π_ref) (the k3 estimator);
5. the KL coefficient moves toward `kl_target` (Ziegler et al., 2019: proportional control).

Everything runs on the device it is given, where the policy and the reference already are;
on CUDA every forward pass (sampling, scoring, the update) is under bf16 autocast, as the
trainer's, with log-probabilities taken in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hatchling.errors import ConfigError
from hatchling.model.device import autocast
from hatchling.model.memory import paused_writes


@dataclass
class Samples:
    """k completions of each of N prompts of one length, row n*k + j = sample j of prompt n:
    right-padded tokens, their mask and behavior log-probs."""

    prompts: torch.Tensor        # [N*k, P]
    tokens: torch.Tensor         # [N*k, L] (after a stop token: 0, masked out)
    mask: torch.Tensor           # [N*k, L] bool: the tokens the policy produced (stop token included)
    behavior_logp: torch.Tensor  # [N*k, L]


@torch.no_grad()
def sample_groups(model, prompts: list[list[int]], k: int, max_new_tokens: int, temperature: float,
                  stop_ids: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Samples:
    """k completions of each prompt (all of one length), sampled in one batch with the decoding
    cache (constant-size KDA state, NoPE KV cache), on `device` (the generator's too; None: torch's
    default generator of the device)."""
    model.eval()
    batch = torch.tensor(prompts, device=device).repeat_interleave(k, dim=0)
    cache = model.new_cache()
    with autocast(device):
        logits = model(batch, cache)[:, -1]
    tokens, logps, masks = [], [], []
    alive = torch.ones(len(batch), dtype=torch.bool, device=device)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    for i in range(max_new_tokens):
        logp = F.log_softmax(logits.float() / temperature, dim=-1)
        nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        tokens.append(torch.where(alive, nxt, 0))
        logps.append(torch.where(alive, logp.gather(-1, nxt[:, None]).squeeze(-1), 0.0))
        masks.append(alive.clone())
        alive &= ~torch.isin(nxt, stops)
        if not alive.any() or i + 1 == max_new_tokens:       # the last token needs no forward pass
            break
        with autocast(device):
            logits = model(nxt[:, None], cache)[:, -1]
    return Samples(batch, torch.stack(tokens, 1), torch.stack(masks, 1), torch.stack(logps, 1))


def completion_logprobs(model, samples: Samples, temperature: float) -> torch.Tensor:
    """log π(token) [N*k, L] of the sampled tokens under the full forward pass (differentiable)."""
    ids = torch.cat([samples.prompts, samples.tokens], dim=1)
    logits = model(ids)[:, samples.prompts.shape[1] - 1:-1].float() / temperature
    return F.log_softmax(logits, dim=-1).gather(-1, samples.tokens[..., None]).squeeze(-1)


def completion_curiosity(model, samples: Samples) -> torch.Tensor:
    """Mean curiosity [N*k] over each completion's tokens, from the pass just made on `samples`
    (the predictive-coding head's normalised error in forecasting the state at each token)."""
    curiosity = model.curiosity()
    if curiosity is None:
        raise ConfigError("a curiosity bonus needs a model with model.use_predictive_coding: true")
    c = curiosity[:, samples.prompts.shape[1] - 1:]           # forecasts of the completion's states
    m = samples.mask.float()
    return (c * m).sum(1) / m.sum(1).clamp(min=1)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean) / (std + eps) within each group (row); a group with equal rewards gets zeros."""
    return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, unbiased=False, keepdim=True) + eps)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π: exp(d) - d - 1 with d = ref - logp
    (unbiased, always >= 0; Schulman 2020)."""
    d = ref_logp - logp
    return d.exp() - d - 1


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor,
             mask: torch.Tensor, epsilon_clip: float, rho_max: float) -> tuple[torch.Tensor, dict]:
    """Token-level clipped surrogate, weighted by truncated importance ratios; mean over tokens.

    logp, old_logp, behavior_logp, mask: [N, L]; advantages: [N] (one per completion)."""
    ratio = (logp - old_logp).exp()
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - epsilon_clip, 1 + epsilon_clip) * adv)
    tis = (old_logp - behavior_logp).exp().clamp(max=rho_max).detach()
    m = mask.float()
    loss = -(tis * surrogate * m).sum() / m.sum().clamp(min=1)
    clipped = ((ratio - 1).abs() > epsilon_clip) & mask
    return loss, {"clip_fraction": float(clipped.sum() / mask.sum().clamp(min=1)),
                  "tis_truncated": float(((old_logp - behavior_logp).exp() > rho_max)[mask].float().mean())
                  if mask.any() else 0.0}


class KLController:
    """Adaptive KL coefficient: grows when the measured KL exceeds the target, shrinks below it
    (the proportional error is clipped to ±0.2 per update, as in Ziegler et al.)."""

    def __init__(self, init: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float) -> float:
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error / self.horizon
        return self.value


@dataclass
class RLConfig:
    k: int
    max_new_tokens: int
    temperature: float
    epsilon_clip: float
    rho_max: float
    ppo_epochs: int
    curiosity_coef: float = 0.0     # intrinsic reward: coef x the completion's mean curiosity


def same_length(prompts: list[list[int]]) -> list[list[int]]:
    """The indices of `prompts` grouped by prompt length, in order of first appearance: each group
    samples as one batch, without padding."""
    groups: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(len(prompt), []).append(i)
    return list(groups.values())


def rl_step(policy, ref, optimizer, prompts: list[list[int]], reward: Callable[[int, list[int]], float],
            cfg: RLConfig, kl: KLController, stop_ids: Sequence[int], generator: torch.Generator,
            grad_clip: float = 1.0, *, device: torch.device) -> dict:
    """One RL step over `prompts`; reward(prompt index, completion ids) -> float. Returns stats.
    Prompts of equal length share one batch for sampling and scoring. `device` holds the policy,
    the reference and `generator`."""
    buckets = [(idx, sample_groups(policy, [prompts[i] for i in idx], cfg.k, cfg.max_new_tokens, cfg.temperature,
                                   stop_ids, generator, device)) for idx in same_length(prompts)]
    policy.eval()
    with torch.no_grad(), autocast(device):
        old, bonus = [], []
        for _, s in buckets:
            old.append(completion_logprobs(policy, s, cfg.temperature))
            bonus.append(cfg.curiosity_coef * completion_curiosity(policy, s) if cfg.curiosity_coef
                         else torch.zeros(len(s.tokens), device=device))
        refs = [completion_logprobs(ref, s, cfg.temperature) for _, s in buckets]
    rewards, advantages = [], []
    for (idx, s), b in zip(buckets, bonus, strict=True):
        tokens, mask = s.tokens.cpu(), s.mask.cpu()          # one copy per bucket, not one per completion
        r = torch.tensor([reward(idx[row // cfg.k], tokens[row][mask[row]].tolist())
                          for row in range(len(tokens))], device=device).view(len(idx), cfg.k)
        rewards.append(r)
        advantages.append(group_advantages(r + b.view(len(idx), cfg.k)).flatten())
    policy.train()
    total_tokens = max(sum(int(s.mask.sum()) for _, s in buckets), 1)
    for epoch in range(cfg.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        clip_tokens = truncated_tokens = kl_sum = entropy_sum = 0.0
        for (_, s), adv, old_logp, ref_logp in zip(buckets, advantages, old, refs, strict=True):
            with paused_writes(policy, epoch > 0), autocast(device):   # a memory stores each sample once
                logp = completion_logprobs(policy, s, cfg.temperature)
            pg, st = ppo_loss(logp, old_logp, s.behavior_logp, adv, s.mask, cfg.epsilon_clip, cfg.rho_max)
            kl_tok = (kl_k3(logp, ref_logp) * s.mask).sum()
            n = int(s.mask.sum())
            ((pg * n + kl.value * kl_tok) / total_tokens).backward()
            clip_tokens += st["clip_fraction"] * n
            truncated_tokens += st["tis_truncated"] * n
            kl_sum += float(kl_tok.detach())
            entropy_sum += float(-(logp.detach() * s.mask).sum())
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
        optimizer.step()
    all_rewards = torch.cat([r.flatten() for r in rewards])
    stats = {"reward_mean": float(all_rewards.mean()), "pass_rate": float((all_rewards > 0.5).float().mean()),
             "curiosity_bonus": float(torch.cat(bonus).mean()),
             "kl": kl_sum / total_tokens, "kl_coef": kl.value, "clip_fraction": clip_tokens / total_tokens,
             "tis_truncated": truncated_tokens / total_tokens,
             "entropy": entropy_sum / total_tokens, "response_length": total_tokens / len(all_rewards)}
    kl.update(stats["kl"])
    return stats
