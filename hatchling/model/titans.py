"""Titans-style neural memory (Behrouz et al., 2024): a small MLP per head whose weights are
learned *at test time* by gradient descent on an associative loss, with momentum and weight
decay driven by the data.

For each token, with keys k_t, values v_t (L2-normalized keys) and the memory M(k) = silu(k W1) W2:

    loss_t = ||M_{t-1}(k_t) - v_t||²
    S_t    = η_t · S_{t-1} - θ_t · ∇loss_t          (momentum: "surprise" that persists)
    W_t    = (1 - α_t) · W_{t-1} + S_t               (α_t: forgetting / weight decay)

θ (step size), η (momentum) and α (decay) are per token and head, sigmoid projections of the input.
Training is chunk-parallel as in the paper: inside a chunk every token's gradient is taken at the
memory of the chunk's start (one batched computation, gradients written out analytically), the
momentum/decay recurrence then runs token by token, and a token reads the memory as it was at
its chunk's start. Outputs at t therefore depend only on tokens of earlier chunks (causal), and
the outer training loop learns the projections and the memory's initial weights through it all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hatchling.model.base import BlockStackLM


def memory_read(w1: torch.Tensor, w2: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """M(q) = silu(q W1) W2; w1 [B,H,d,h], w2 [B,H,h,d], q [B,H,C,d]."""
    return F.silu(q @ w1) @ w2


def _backprop(w1, w2, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden activation, d loss/d output, d loss/d hidden pre-activation) of ||M(k) - v||² per token."""
    pre = k @ w1
    act = F.silu(pre)
    err = 2 * (act @ w2 - v)
    sig = torch.sigmoid(pre)
    d_pre = (err @ w2.transpose(-1, -2)) * (sig * (1 + pre * (1 - sig)))   # silu'(x) = σ(x)(1 + x(1 - σ(x)))
    return act, err, d_pre


def associative_grads(w1, w2, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token gradients of ||M(k_t) - v_t||² w.r.t. W1 and W2: [B,H,C,d,h] and [B,H,C,h,d]."""
    act, err, d_pre = _backprop(w1, w2, k, v)
    return k[..., :, None] * d_pre[..., None, :], act[..., :, None] * err[..., None, :]


def memory_update_reference(state: tuple, k, v, theta, eta, alpha) -> tuple:
    """Apply one chunk of tokens to (W1, W2, S1, S2) token by token; theta/eta/alpha [B,H,C].
    The slow, obvious form of `memory_update` (per-token gradient tensors)."""
    w1, w2, s1, s2 = state
    g1, g2 = associative_grads(w1, w2, k, v)
    for t in range(k.shape[2]):
        th, et, al = (x[..., t, None, None] for x in (theta, eta, alpha))
        s1, s2 = et * s1 - th * g1[:, :, t], et * s2 - th * g2[:, :, t]
        w1, w2 = (1 - al) * w1 + s1, (1 - al) * w2 + s2
    return w1, w2, s1, s2


def memory_update(state: tuple, k, v, theta, eta, alpha) -> tuple:
    """`memory_update_reference` without per-token gradient tensors. Every gradient in a chunk is
    taken at the chunk's starting memory and the momentum/decay recurrence is linear with scalar
    coefficients, so the chunk's end state is c_W0·W0 + c_S0·S0 + Σ_t c_t·G_t, where the
    coefficients come from a scalar recurrence over the chunk and Σ_t c_t·G_t of outer-product
    gradients k_t ⊗ δ_t is a single matmul (c ⊙ k)ᵀ δ."""
    w1, w2, s1, s2 = state
    act, err, d_pre = _backprop(w1, w2, k, v)
    b, h, c = theta.shape
    # coefficients of the sources [W0, S0, G_1..G_C] in the running S and W
    cs = torch.zeros(b, h, c + 2, dtype=theta.dtype, device=theta.device)
    cw = torch.zeros_like(cs)
    cs[..., 1], cw[..., 0] = 1.0, 1.0
    for t in range(c):
        cs = cs * eta[..., t, None]
        cs[..., t + 2] = -theta[..., t]
        cw = cw * (1 - alpha[..., t, None]) + cs

    def combine(coef, w0, s0, left, right):
        return (coef[..., 0, None, None] * w0 + coef[..., 1, None, None] * s0
                + (coef[..., 2:, None] * left).transpose(-1, -2) @ right)

    return (combine(cw, w1, s1, k, d_pre), combine(cw, w2, s2, act, err),
            combine(cs, w1, s1, k, d_pre),
            combine(cs, w2, s2, act, err))


class NeuralMemory(nn.Module):
    """A token mixer: reads the test-time-trained memory, writes each chunk into it."""

    INT8_MATRICES = ("w1", "w2")        # the memory's initial weights, used as x @ W (model/int8.py)

    def __init__(self, d_model: int, n_heads: int, head_dim: int, hidden: int, chunk: int, max_lr: float = 0.05,
                 max_momentum: float = 0.8):
        super().__init__()
        # Bounds that keep the inner descent stable however the gates learn to open. Gradients in a
        # chunk are all taken at its starting memory, so momentum keeps pushing along them for the
        # whole chunk: the step is per chunk (θ ≤ max_lr / chunk per token, the chunk's mean
        # gradient). Unbounded gates (θ up to 0.5 per token) diverged to NaN within 100 steps of
        # pretraining; these bounds stay finite over 2,048 tokens with every gate wide open (test).
        self.h, self.d, self.chunk = n_heads, head_dim, chunk
        self.max_lr, self.max_momentum = max_lr, max_momentum
        self.qkv = nn.Linear(d_model, 3 * n_heads * head_dim, bias=False)
        self.gates = nn.Linear(d_model, 3 * n_heads)          # θ, η, α per head
        with torch.no_grad():                                   # start remembering: α ≈ 0.02 per token
            self.gates.bias[2 * n_heads:] = -4.0
        self.w1 = nn.Parameter(torch.randn(n_heads, head_dim, hidden) * head_dim ** -0.5)
        self.w2 = nn.Parameter(torch.randn(n_heads, hidden, head_dim) * hidden ** -0.5)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def initial_state(self, batch: int) -> tuple:
        w1, w2 = self.w1.expand(batch, -1, -1, -1), self.w2.expand(batch, -1, -1, -1)
        return w1, w2, torch.zeros_like(w1), torch.zeros_like(w2)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, self.d).permute(2, 0, 3, 1, 4)     # each [B,H,T,d]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        theta, eta, alpha = torch.sigmoid(self.gates(x)).view(b, t, 3, self.h).permute(2, 0, 3, 1)
        theta, eta = theta * (self.max_lr / self.chunk), eta * self.max_momentum
        state = cache.get("memory") if cache is not None else None
        pending = cache.get("pending", 0) if cache is not None else 0
        if state is None:
            state = self.initial_state(b)
        outs = []
        start = 0
        while start < t:
            # a chunk ends on a multiple of `chunk` tokens since the start of the sequence
            end = min(t, start + self.chunk - pending)
            outs.append(memory_read(state[0], state[1], q[:, :, start:end]))
            if cache is None or end - start + pending == self.chunk:
                if cache is not None and pending:      # the chunk began in an earlier call
                    ks, vs, gs = cache.pop("chunk")
                    ck, cv = torch.cat([ks, k[:, :, start:end]], 2), torch.cat([vs, v[:, :, start:end]], 2)
                    g = [torch.cat([a, bb[:, :, start:end]], 2) for a, bb in zip(gs, (theta, eta, alpha), strict=True)]
                else:
                    ck, cv, g = k[:, :, start:end], v[:, :, start:end], [y[:, :, start:end]
                                                                       for y in (theta, eta, alpha)]
                state = memory_update(state, ck, cv, *g)
                pending = 0
            else:                                       # decoding: keep the chunk's tokens until it is full
                prev = cache.get("chunk")
                part = (k[:, :, start:end], v[:, :, start:end], [y[:, :, start:end] for y in (theta, eta, alpha)])
                if prev is not None:
                    part = (torch.cat([prev[0], part[0]], 2), torch.cat([prev[1], part[1]], 2),
                            [torch.cat([a, bb], 2) for a, bb in zip(prev[2], part[2], strict=True)])
                cache["chunk"] = part
                pending += end - start
            start = end
        if cache is not None:
            cache["memory"], cache["pending"] = state, pending
        y = torch.cat(outs, dim=2).transpose(1, 2).reshape(b, t, self.h * self.d)
        return self.o_proj(y)


class HOPEBlock(nn.Module):
    """Nested-Learning HOPE block: the Titans memory as token mixer, then a continuum memory system —
    memory MLPs whose weights are rewritten at slower and slower frequencies (chunks of chunk·4^level
    tokens), each a residual branch after a pre-norm."""

    def __init__(self, cfg):
        super().__init__()
        hope = cfg.hope
        self.norms = nn.ModuleList(nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps) for _ in range(1 + hope.levels))
        self.memories = nn.ModuleList(
            NeuralMemory(cfg.d_model, cfg.n_heads, cfg.head_dim, hope.hidden, hope.chunk * 4 ** level)
            for level in range(1 + hope.levels))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        for i, (norm, memory) in enumerate(zip(self.norms, self.memories, strict=True)):
            x = x + memory(norm(x), None if cache is None else cache.setdefault(i, {}))
        return x


class HOPELM(BlockStackLM):
    """``model.arch: hope``: embeddings, HOPE blocks, a final norm and the tied output head."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.blocks = nn.ModuleList(HOPEBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)

    def packing_unsupported(self) -> str | None:
        return ("arch hope's memories are rewritten chunk by chunk across packed documents (the chunk-parallel "
                "update cannot restart from the initial memory inside a chunk)")
