"""The KDA token mixer in the style of Kimi Linear.

x -> q, k, v projections -> short causal depthwise conv + SiLU -> L2-normalised q, k;
per-channel decay g = -exp(A_log) * softplus(f(x) + dt_bias) from a low-rank projection;
beta = sigmoid(b(x)); KDA; per-head RMSNorm gated by sigmoid of a low-rank projection; output proj.
The L2 norm, the decay and the sigmoid are handed to :func:`~hatchling.model.kda.kda`: on the fla
path they run inside fla's kernel, on the PyTorch paths as the explicit reference ops.

Decoding keeps a constant-size cache per layer: the last ``conv_size - 1`` inputs of each conv
and the [H, K, V] KDA state, whatever the context length. :class:`KDAStep` is the lean form of
forward for one token at a time (decoding after a prefill); forward with a cache is its reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hatchling.model.config import ModelConfig
from hatchling.model.kda import L2_EPS, StepWeight, folded_norm, kda, kda_gate, kda_step_, l2norm, unit
from hatchling.model.segments import Segments
from hatchling.model.spike import LIFGate, kda_skipping_silent


def _conv_over_time(x: torch.Tensor, taps: torch.Tensor, padding: int = 0) -> torch.Tensor:
    """y[b, t, c] = sum_i taps[c, i] x[b, t + i - padding, c] (x zero outside its length): x [B, L, C], taps [C, W]
    -> [B, L + 2 padding - W + 1, C], as a 2-D depthwise conv over [B, C, 1, L] in channels-last memory, which is
    x's own [B, L, C] layout: no transposed copy in or out (2-3x faster than conv1d over [B, C, L] on the CPU)."""
    return F.conv2d(x.transpose(1, 2).unsqueeze(2), taps[:, None, None], padding=(0, padding),
                    groups=x.shape[-1]).squeeze(2).transpose(1, 2)


class ConvOverTime(torch.autograd.Function):
    """:func:`_conv_over_time` without padding, x [B, T + W - 1, C] -> [B, T, C], with its backward written out for
    the CPU, where mkldnn's own is 1.5-9x slower than this (the worst on one long row: 130 ms against 15 for
    [1, 4096, 1536] on one thread; bench/conv.py). The input's gradient is the same conv of dy with the taps reversed
    and W - 1 zeros on each side; the taps' gradient, sum over b and t of dy[b, t, c] x[b, t + i, c], is accumulated
    one tap and one block of `rows` time steps at a time (BLOCK elements of dy, 1 MiB in float32: it stays in cache
    while the W taps read it) into a buffer summed once at the end: a fixed order, the same bits every call."""

    BLOCK = 1 << 18          # elements of dy per block of rows

    @staticmethod
    def forward(ctx, x, taps):
        ctx.save_for_backward(x, taps)
        return _conv_over_time(x, taps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, taps = ctx.saved_tensors
        (B, T, C), W = dy.shape, taps.shape[-1]
        dy = dy.contiguous()
        dx = _conv_over_time(dy, taps.flip(-1), W - 1) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return dx, None
        rows = min(T, max(1, ConvOverTime.BLOCK // (B * C)))
        acc = dy.new_zeros(W, B, rows, C)
        for start in range(0, T, rows):
            n = min(rows, T - start)
            block = dy[:, start:start + n]
            for i in range(W):
                acc[i, :, :n].addcmul_(block, x[:, start + i:start + i + n])
        return dx, acc.sum((1, 2)).T


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, cache: dict | None = None, keys: tuple[str, ...] = ("conv",),
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU of a depthwise conv over time that sees only the past (left padding of W - 1): x [B, T, C],
    weight [C, 1, W] -> [B, T, C].

    With a cache (a dict) the last W - 1 inputs are carried between calls, so feeding a sequence in
    pieces gives exactly the output of feeding it whole; they are kept as [B, C_i, W - 1] under `keys`,
    one entry per equal share of the C channels (the KDA layer convolves q|k|v in one call and keeps
    their inputs apart). With `positions` (each token's offset in its packed document,
    :class:`~hatchling.model.segments.Segments`; no cache) a tap that would reach back past the token's
    document start reads zero, as at the start of a sequence: the conv runs over the whole row, and the
    few tokens within W - 1 of a start are computed again with those taps masked and put in place of
    theirs (so no value or gradient crosses a start, exactly; forward and backward 3.5-4x faster than
    masking every tap of every token, on SFT's packed chats on the CPU).

    The conv is :func:`_conv_over_time` (on the CPU :class:`ConvOverTime`, its backward written out).
    """
    T = x.shape[1]
    W = weight.shape[-1]
    keep = W - 1
    weight = weight.to(x.dtype)
    if cache is not None and keys[0] in cache:
        x = torch.cat([torch.cat([cache[key] for key in keys], dim=1).transpose(1, 2).to(x.dtype), x], dim=1)
    else:
        x = F.pad(x, (0, 0, keep, 0))                                       # [B, keep + T, C]
    if cache is not None:
        past = x[:, x.shape[1] - keep:].transpose(1, 2).detach()          # [B, C, keep]
        for key, part in zip(keys, past.chunk(len(keys), dim=1), strict=True):
            cache[key] = part
    if T == 1:                   # one decoding step: a dot product beats a conv call
        y = (x * weight[:, 0].T).sum(1, keepdim=True)
    elif x.device.type == "cpu":
        y = ConvOverTime.apply(x, weight[:, 0])
    else:                        # cuDNN's backward is fast
        y = _conv_over_time(x, weight[:, 0])
    if positions is not None:    # the tokens within W - 1 of a document start again, their taps past it masked
        b, t = (positions < keep).nonzero(as_tuple=True)
        taps = torch.arange(W, device=x.device)                             # tap i reads x[t - (keep - i)]
        reach = (keep - taps <= positions[b, t, None]).to(x.dtype)          # [n, W]
        windows = x.unfold(1, W, 1)[b, t]             # [n, C, W]; no index twice: a gather's backward would race
        near = (windows * reach[:, None] * weight[:, 0]).sum(-1)            # [n, C]
        y = y.index_put((b, t), near)
    return F.silu(y)


def conv_step(past: torch.Tensor, x: torch.Tensor, taps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of :func:`causal_conv1d` from its last W - 1 inputs past [B, W - 1, C] (oldest first), the token's
    x [B, C] and the taps [W, C] (oldest first): (SiLU of the conv [B, C], the window [B, W, C], whose last W - 1
    rows are the next step's past)."""
    window = torch.cat([past, x[:, None]], dim=1)
    return F.silu((window * taps).sum(1)), window


class CausalConv1d(nn.Module):
    """The weight [C, 1, W] of one :func:`causal_conv1d`; forward(x [B, T, C]) -> SiLU(conv(x))."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, cache: dict | None = None, key: str = "conv",
                positions: torch.Tensor | None = None) -> torch.Tensor:
        return causal_conv1d(x, self.weight, cache, (key,), positions)


class GatedHeadNorm(nn.Module):
    """RMSNorm over each head's output, times sigmoid(gate): [B, T, H, D]."""

    def __init__(self, head_dim: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(head_dim, eps=eps)

    def forward(self, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.norm(o) * torch.sigmoid(gate)


class KDALayer(nn.Module):
    NO_WEIGHT_DECAY = ("A_log", "dt_bias")      # the decay rates: weight decay would pull every layer to one

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, D, d = cfg.n_heads, cfg.head_dim, cfg.d_model
        self.n_heads, self.head_dim = H, D
        self.chunk_size, self.backend = cfg.chunk_size, cfg.kda_backend
        self.q_proj = nn.Linear(d, H * D, bias=False)
        self.k_proj = nn.Linear(d, H * D, bias=False)
        self.v_proj = nn.Linear(d, H * D, bias=False)
        self.q_conv = CausalConv1d(H * D, cfg.conv_size)
        self.k_conv = CausalConv1d(H * D, cfg.conv_size)
        self.v_conv = CausalConv1d(H * D, cfg.conv_size)
        self.f_proj = nn.Sequential(nn.Linear(d, D, bias=False), nn.Linear(D, H * D, bias=False))
        self.b_proj = nn.Linear(d, H, bias=False)
        self.g_proj = nn.Sequential(nn.Linear(d, D, bias=False), nn.Linear(D, H * D, bias=True))
        self.o_norm = GatedHeadNorm(D, cfg.norm_eps)
        self.o_proj = nn.Linear(H * D, d, bias=False)
        # Decay rates: A in [1, 16] per head, dt in [1e-3, 0.1] per channel (as in Mamba / Kimi Linear).
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(H * D) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))      # softplus^-1(dt)
        self.spike = LIFGate(d, H, cfg.spike_threshold, cfg.spike_decay) if cfg.spike else None
        self.last_stats: dict[str, float] = {}

    def forward(self, x: torch.Tensor, cache: dict | None = None, segments: Segments | None = None) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]. With `segments` (packed documents, no cache) neither the convolutions
        nor the KDA state cross a document start (kda's segment_ids).

        The six input projections run as one matmul and the q, k, v convs as one conv over q|k|v, from
        the weights concatenated here (a few small copies per call), so the parameters and checkpoints
        stay one module each. tests/test_kda_layer_fused.py keeps the unfused form as the reference."""
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        f2, g2 = self.f_proj[1], self.g_proj[1]
        # q, k, v, the first low-rank factors of the decay and of the output gate, and beta: one matmul
        # (unless they were swapped for other modules, e.g. the export's int8 Linears: then one call each)
        projections = self.input_projections()
        if all(isinstance(p, nn.Linear) for p in projections):
            y = F.linear(x, torch.cat([p.weight for p in projections]))
        else:
            y = torch.cat([p(x) for p in projections], dim=-1)
        qkv, f, gate, b = y.split([3 * H * D, D, D, H], dim=-1)
        conv_w = torch.cat([c.weight for c in self.convs()])
        qkv = causal_conv1d(qkv, conv_w, cache, ("q_conv", "k_conv", "v_conv"),
                            None if segments is None else segments.positions)
        q, k, v = qkv.view(B, T, 3, H, D).unbind(2)
        f = f2(f).view(B, T, H, D)                                          # raw decay input; b: beta logits
        state = cache.get("state") if cache is not None else None
        if self.spike is None:   # kda applies l2norm, the gate and the sigmoid: inside fla's kernel on its path
            o, state = kda(q, k, v, f, b, initial_state=state, output_final_state=cache is not None,
                           chunk_size=self.chunk_size, backend=self.backend, use_qk_l2norm=True,
                           use_gate=True, A_log=self.A_log, dt_bias=self.dt_bias, use_beta_sigmoid=True,
                           segment_ids=None if segments is None else segments.ids)
        elif segments is not None:
            raise ValueError("KDALayer: spike-KDA does not keep packed documents apart (its LIF membranes run "
                             "through the whole window)")
        else:                    # the spikes switch off the gated update, so the gates are computed here
            spikes = self.spike(x, cache)
            g = kda_gate(f, self.A_log, self.dt_bias)                       # at least float32
            beta = torch.sigmoid(b.to(g.dtype))
            o, state, skipped = kda_skipping_silent(l2norm(q), l2norm(k), v, g, beta, spikes, initial_state=state,
                                                    output_final_state=cache is not None,
                                                    chunk_size=self.chunk_size, backend=self.backend)
            self.last_stats = {"spike_rate": float(spikes.detach().mean()), "silent_heads_skipped": skipped}
        if cache is not None:
            cache["state"] = state.detach()
        o = self.o_norm(o.to(x.dtype), g2(gate).view(B, T, H, D))
        return self.o_proj(o.reshape(B, T, H * D))

    def input_projections(self) -> tuple[nn.Module, ...]:
        """The six projections of the layer's input, in the order forward concatenates their outputs: q, k, v,
        the first low-rank factors of the decay and of the output gate, beta."""
        return self.q_proj, self.k_proj, self.v_proj, self.f_proj[0], self.g_proj[0], self.b_proj

    def convs(self) -> tuple[CausalConv1d, ...]:
        """The q, k and v convs, in the order forward convolves q|k|v."""
        return self.q_conv, self.k_conv, self.v_conv

    def step_weights(self) -> tuple[torch.Tensor, ...]:
        """The weights of a one-token step (KDAStep, the ONNX decode step), packed: (w_in [6 proj. out, d]: the
        input projections as one, w_fg [2 D, 2 H D]: both second low-rank factors as one block-diagonal matmul,
        b_fg [2 H D]: its bias (dt_bias, then the gate's), neg_A [H D]: kda_gate's -exp(A_log) per channel,
        conv_w [W, 3 H D]: the q|k|v conv taps, oldest first)."""
        f2, g2 = self.f_proj[1], self.g_proj[1]
        w_in = torch.cat([p.weight for p in self.input_projections()])
        w_fg = torch.block_diag(f2.weight.T, g2.weight.T)
        b_fg = torch.cat([self.dt_bias, g2.bias])
        neg_A = -self.A_log.exp().repeat_interleave(self.head_dim)
        conv_w = torch.cat([c.weight[:, 0] for c in self.convs()]).T.contiguous()
        return w_in, w_fg, b_fg, neg_A, conv_w


class KDAStep:
    """x + KDALayer(norm(x)) for one token at a time, from the cache a prefill left (`layer(x, cache)`).

    The same computation in fewer, larger ops (for one token each op's dispatch, not its arithmetic,
    is the cost): the norms as three ops each (:func:`~hatchling.model.kda.unit`), their weights folded
    into the matmuls after them (:func:`~hatchling.model.kda.folded_norm`); one matmul for the six input
    projections (q, k, v, the first low-rank factors of the decay and of the output gate, beta) and one
    block-diagonal matmul for both second factors (dt_bias riding as the decay's bias); one conv over
    q|k|v read from a preallocated tape of past inputs; the recurrent state updated in place
    (:func:`~hatchling.model.kda.kda_step_`); the output projection fused with the residual add.
    For float32 or float64 weights (then the state's dtype, as in forward). The weights are packed
    once, here (under no_grad, as Decoder builds it): a step sees the layer's weights as they were then.
    """

    TAPE = 64       # steps between two shifts of the conv tape

    def __init__(self, layer: KDALayer, norm: nn.RMSNorm, cache: dict, batch: int, parts: int | None = None):
        if layer.spike is not None:
            raise ValueError("KDAStep: spike-KDA gates its update per head; decode it through forward")
        H, D = layer.n_heads, layer.head_dim
        self.n_heads, self.head_dim = H, D
        w_in, w_fg, self.b_fg, self.neg_A, self.conv_w = layer.step_weights()
        w_in, self.root_eps = folded_norm(norm, w_in)
        self.w_in, self.w_fg = StepWeight(w_in, parts), StepWeight(w_fg, parts)
        w_out, self.o_root_eps = folded_norm(layer.o_norm.norm, layer.o_proj.weight)
        self.w_out = StepWeight(w_out, parts)
        self.l2_root_eps = w_in.new_tensor(L2_EPS ** 0.5)
        self.keep = self.conv_w.shape[0] - 1
        past = w_in.new_zeros(batch, self.keep, 3 * H * D)            # the conv's last W - 1 inputs
        if self.keep and "q_conv" in cache:
            past.copy_(torch.cat([cache[key] for key in ("q_conv", "k_conv", "v_conv")], dim=1).transpose(1, 2))
        self.start_conv(past)
        state = cache.get("state")
        self.state = state.clone(memory_format=torch.contiguous_format) if state is not None else \
            w_in.new_zeros(batch, H, D, D)

    def start_conv(self, past: torch.Tensor) -> None:
        """The tape, its first W - 1 slots the conv's past inputs [B, W - 1, 3 H D]."""
        self.tape = torch.cat([past, past.new_zeros(past.shape[0], self.TAPE, past.shape[2])], dim=1)
        self.t = self.keep                                                  # the slot of the next input

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(causal conv) of this step's q|k|v [B, 3 H D], as CausalConv1d over the whole sequence."""
        if self.t == self.tape.shape[1]:                                    # full: the last W - 1 to the front
            self.tape[:, :self.keep] = self.tape[:, self.t - self.keep:].clone()
            self.t = self.keep
        self.tape.select(1, self.t).copy_(x)
        self.t += 1
        window = self.tape.narrow(1, self.t - self.keep - 1, self.keep + 1)     # [B, W, 3 H D]
        return F.silu((window * self.conv_w).sum(1))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, d] (one token's residual stream) -> x + layer(norm(x))."""
        B, H, D = x.shape[0], self.n_heads, self.head_dim
        y = self.w_in(unit(x, self.root_eps))
        qkv = self.conv(y[:, :3 * H * D]).view(B, 3, H, D)
        qk = unit(qkv[:, :2], self.l2_root_eps)                             # kda's l2norm of q and k
        fg = self.w_fg(y[:, 3 * H * D:-H], self.b_fg)
        g = self.neg_A * F.softplus(fg[:, :H * D])                          # kda_gate of the decay input
        o = kda_step_(qk[:, 0], qk[:, 1], qkv[:, 2], g.view(B, H, D), torch.sigmoid(y[:, -H:]), self.state)
        o = unit(o, self.o_root_eps) * torch.sigmoid(fg[:, H * D:].view(B, H, D))   # GatedHeadNorm
        return self.w_out(o.view(B, H * D), x)


class StaticKDAStep(KDAStep):
    """KDAStep in fixed shapes, for a compiled decoding step (torch.compile): the conv's last W - 1
    inputs are a window shifted by one each step, where KDAStep writes a tape and shifts it every
    TAPE steps (a position in Python that a compiled graph would branch on)."""

    def start_conv(self, past: torch.Tensor) -> None:
        self.past = past

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        y, window = conv_step(self.past, x, self.conv_w)
        self.past.copy_(window[:, 1:])
        return y
