"""Spike-KDA: leaky integrate-and-fire neurons, one per KDA head, gate the head's state update.

Each head integrates a scalar drive from the layer input, u_t = decay * u_{t-1} + I_t, and fires
when u_t crosses the threshold (soft reset: u_t -= threshold). On a spike the head's KDA update
runs as usual; when it is silent both the decay and the write are switched off (g = 0, beta = 0),
so the state S_t is exactly S_{t-1}. A head silent over a whole sequence therefore needs no KDA
work in a forward pass: where no gradient flows to the spikes (eval, decoding), `kda_skipping_silent`
leaves it out of the kernel call and answers its queries from the unchanged initial state. In
training it does not: the surrogate gradient of a silent head's spikes, what lets it learn to fire,
runs through the KDA update it switched off.

The spike is a step function; training uses a surrogate gradient (the derivative of a fast
sigmoid, 1 / (1 + k|u - threshold|)^2) so the drive still learns.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hatchling.model.kda import kda

SURROGATE_SHARPNESS = 5.0


class SpikeFunction(torch.autograd.Function):
    """Heaviside(u - threshold) forward, fast-sigmoid derivative backward."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, threshold: float) -> torch.Tensor:
        ctx.save_for_backward(u)
        ctx.threshold = threshold
        return (u >= threshold).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (u,) = ctx.saved_tensors
        surrogate = 1.0 / (1.0 + SURROGATE_SHARPNESS * (u - ctx.threshold).abs()) ** 2
        return grad * surrogate, None


def lif_reference(drive: torch.Tensor, u: torch.Tensor, threshold: float, decay: float):
    """The LIF recurrence token by token with autograd through SpikeFunction: the oracle for
    `LIFFunction`. drive [B, T, H]; u [B, H] -> (spikes [B, T, H], final membrane [B, H])."""
    spikes = []
    for t in range(drive.shape[1]):
        u = decay * u + drive[:, t]
        s = SpikeFunction.apply(u, threshold)
        spikes.append(s)
        u = u - threshold * s.detach()                                  # soft reset, no gradient through it
    return torch.stack(spikes, dim=1), u


class LIFFunction(torch.autograd.Function):
    """The same recurrence with one hand-written backward instead of a graph of T tiny steps.

    With the reset detached, u_t = sum_{j<=t} decay^(t-j) drive_j + (constants), so
    d loss / d drive_j = sum_{t>=j} decay^(t-j) g_t s'(u_t): one reverse scan, written as a
    product with the [T, T] matrix of decay powers.
    """

    @staticmethod
    def forward(ctx, drive: torch.Tensor, u: torch.Tensor, threshold: float, decay: float):
        potentials, spikes = [], []
        for t in range(drive.shape[1]):
            u = decay * u + drive[:, t]
            s = (u >= threshold).to(u.dtype)
            potentials.append(u)
            spikes.append(s)
            u = u - threshold * s
        ctx.save_for_backward(torch.stack(potentials, dim=1))
        ctx.threshold, ctx.decay = threshold, decay
        return torch.stack(spikes, dim=1), u

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor, grad_u: torch.Tensor):
        (potentials,) = ctx.saved_tensors
        local = grad_spikes / (1.0 + SURROGATE_SHARPNESS * (potentials - ctx.threshold).abs()) ** 2   # [B,T,H]
        T = potentials.shape[1]
        lag = torch.arange(T, device=local.device)[:, None] - torch.arange(T, device=local.device)[None]
        powers = torch.where(lag >= 0, torch.tensor(ctx.decay, dtype=local.dtype, device=local.device)
                             ** lag.clamp(min=0).to(local.dtype), torch.zeros((), dtype=local.dtype,
                                                                              device=local.device))   # [t, j]
        return torch.einsum("bth,tj->bjh", local, powers), None, None, None


class LIFGate(nn.Module):
    """x [B, T, d] -> spikes [B, T, H] in {0, 1}; the membrane potential is carried in the cache."""

    def __init__(self, d_model: int, n_heads: int, threshold: float, decay: float):
        super().__init__()
        self.drive = nn.Linear(d_model, n_heads, bias=True)
        self.threshold, self.decay = threshold, decay
        self.last_stats: dict[str, float] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # start firing on every token (drive = threshold): the model begins as plain KDA and learns
        # to stay silent, rather than begin silent and never receive a gradient through the state
        nn.init.normal_(self.drive.weight, std=0.02)
        nn.init.constant_(self.drive.bias, self.threshold)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        drive = self.drive(x).float()                                      # [B, T, H]
        u = cache["membrane"] if cache is not None and "membrane" in cache else drive.new_zeros(drive[:, 0].shape)
        spikes, u = LIFFunction.apply(drive, u, self.threshold, self.decay)
        if cache is not None:
            cache["membrane"] = u.detach()
        return spikes


def kda_skipping_silent(q, k, v, g, beta, spikes, initial_state=None, output_final_state=False, **kda_kwargs):
    """KDA with the update of silent tokens switched off, skipping (batch, head) pairs that never fire
    when no gradient is to flow to `spikes` (a skipped pair's spikes would get none).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K]; beta, spikes: [B, T, H].
    Returns (o [B, T, H, V], final state [B, H, K, V] or None, skipped share of (batch, head) pairs).
    Equal to ``kda(q, k, v, g * spikes, beta * spikes, ...)``, values and gradients (tests/test_research.py).
    """
    g, beta = g * spikes[..., None], beta * spikes
    B, T, H, K = q.shape
    active = spikes.detach().amax(dim=1) > 0                               # [B, H]
    if bool(active.all()) or (torch.is_grad_enabled() and spikes.requires_grad):
        o, state = kda(q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
                       **kda_kwargs)
        return o, state, 0.0
    b_idx, h_idx = active.nonzero(as_tuple=True)
    dt = torch.promote_types(q.dtype, torch.float32)                      # the state's precision
    S0 = initial_state.to(dt) if initial_state is not None else q.new_zeros(B, H, K, v.shape[-1], dtype=dt)
    # a silent head's state never changes: its outputs are the queries read against S0
    scale = kda_kwargs.get("scale") or K ** -0.5
    o = torch.einsum("bthk,bhkv->bthv", q.to(dt) * scale, S0).to(v.dtype)
    state = S0.clone() if output_final_state else None
    if len(b_idx):
        def pick(x):          # [B, T, H, ...] -> [N, T, 1, ...]: one batch row per active pair
            return x[b_idx, :, h_idx].unsqueeze(2)
        o_act, s_act = kda(pick(q), pick(k), pick(v), pick(g), pick(beta),
                           initial_state=S0[b_idx, h_idx].unsqueeze(1) if initial_state is not None else None,
                           output_final_state=output_final_state, **kda_kwargs)
        o[b_idx, :, h_idx] = o_act.squeeze(2).to(o.dtype)
        if output_final_state:
            state[b_idx, h_idx] = s_act.squeeze(1).to(state.dtype)
    return o, state, 1.0 - float(active.float().mean())
