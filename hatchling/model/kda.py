"""Kimi Delta Attention (KDA) operators.

KDA is a gated delta rule with a *per-channel* forget gate. With a state S of shape [K, V]
per head, one token does

    S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (scale * q_t)

where alpha_t = exp(g_t) and g_t <= 0 is a K-vector of log-decays.

These implementations share flash-linear-attention's layout (q, k: [B,T,H,K]; v: [B,T,H,V];
g: [B,T,H,K]; beta: [B,T,H]; state: [B,H,K,V] float32), so the GPU path can call fla's
``chunk_kda`` directly:

* :func:`kda_recurrent` - the reference: :func:`kda_step` applied one token at a time.
* :func:`kda_chunked`   - the chunkwise-parallel form in pure PyTorch (WY representation),
  vectorised over chunks except for one cheap sequential pass over chunk states.
* :func:`kda_step_`     - one token with the state updated in place: decoding's step
  (kda_layer.KDAStep), with :func:`kda_step` as its reference.
* :func:`unit`, :func:`folded_norm`, :class:`StepWeight` - the other decoding steps' norms and weights
  (attention.AttentionStep, hatchling.SwiGLUStep, the head) as KDAStep's.
* :func:`kda`           - dispatch: fla's Triton kernel on CUDA when installed, else the chunked form.
  It also takes the KDA layer's pre-ops (:func:`l2norm` of q and k, the decay :func:`kda_gate`, the
  sigmoid of beta), which fla fuses into its kernel and the other backends apply as these explicit
  ops, and packed sequences (``cu_seqlens``), which fla handles in-kernel and the other backends
  one sequence at a time; or packed documents within batch rows (``segment_ids``), which the
  chunked form handles by masking inside its chunks, at nearly the cost of an unpacked batch.

Derivation of the chunked form (one chunk, positions r = 1..C, state S_0 at its start,
G_r = sum_{s<=r} g_s the within-chunk cumulative log-decay, Lambda_r = Diag(exp G_r)).
Write the update as S_r = D_r S_{r-1} + k_r u_r^T with u_r = beta_r (v_r - (D_r S_{r-1})^T k_r).
Unrolling, D_r S_{r-1} = Lambda_r S_0 + sum_{s<r} Lambda_r Lambda_s^-1 k_s u_s^T, hence

    (I + A) U = beta * (V - (K * e^G) S_0),     A_rs = beta_r sum_k k_rk k_sk e^{G_rk - G_sk}  (s < r)

so U = U~ - W S_0 with [W | U~] = (I + A)^-1 beta * [K e^G | V] ((I + A)^-1 from one triangular
solve against I, reused by the backward: on the CPU a batch of 32 x 32 solves with 128 right-hand
sides is slower than that solve and a matmul), and

    O   = (Q e^G) S_0 + P U,                    P_rs = sum_k q_rk k_sk e^{G_rk - G_sk}     (s <= r)
    S_C = Diag(e^{G_C}) S_0 + (K e^{G_C - G})^T U.

Everything but S_0 is known per chunk in parallel; the sequential pass over chunks takes U_n = U~_n -
W_n S_n and S_{n+1} from it (two small matmuls a chunk), and o = (Q e^G) S_n + P U_n follows in parallel.
:class:`ChunkedKDA` writes the backward out; the recurrent form under autograd is its reference.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

#: Largest head dimension fla's Triton kernels accept.
FLA_MAX_HEAD_DIM = 256
#: Largest exponent either factor of exp(G_r - Mid) exp(Mid - G_s) may take, up or down, for q and k entries
#: of magnitude at most 1 (the layer's l2-normalised q and k): :func:`chunk_scores` factors a chunk-channel's
#: scores through its midpoint when its decay span is at most twice this (less log max(|q|, |k|) for larger
#: entries, so that no factor times them overflows). exp(-80) is above float32's tiniest normal.
SAFE_SPAN = {torch.float32: 80.0, torch.float64: 700.0}


def fla_available() -> bool:
    """True when fla (fla-core, the optional ``gpu`` extra) can be imported."""
    return importlib.util.find_spec("fla") is not None


def _fail(name: str, tensor: torch.Tensor, expected: str) -> None:
    raise ValueError(f"kda: {name} has shape {tuple(tensor.shape)}, expected {expected}")


def check_kda_inputs(q, k, v, g, beta, initial_state=None, max_head_dim: int | None = None,
                     cu_seqlens=None, log_decay: bool = True) -> None:
    """Validate shapes, packed-sequence bounds and gate signs; raise one ValueError naming the offender.

    ``log_decay=False`` when g is the raw input of :func:`kda_gate` (any sign).
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g)):
        if t.dim() != 4:
            _fail(name, t, "rank 4 [B, T, H, D]")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape:
        _fail("k", k, f"{(B, T, H, K)} (same as q)")
    if v.shape[:3] != (B, T, H):
        _fail("v", v, f"{(B, T, H, 'V')}")
    if g.shape != q.shape:
        _fail("g", g, f"{(B, T, H, K)} (same as q)")
    if beta.shape != (B, T, H):
        _fail("beta", beta, f"{(B, T, H)}")
    n_states = B
    if cu_seqlens is not None:
        if B != 1:
            _fail("q", q, f"{(1, T, H, K)}: packed sequences (cu_seqlens) lie along T of one batch row")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            _fail("cu_seqlens", cu_seqlens, "an integer vector [N + 1]")
        if not bool((cu_seqlens[0] == 0) & (cu_seqlens[-1] == T) & (cu_seqlens.diff() > 0).all()):
            raise ValueError(f"kda: cu_seqlens must rise strictly from 0 to T={T}, got {cu_seqlens.tolist()}")
        n_states = cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (n_states, H, K, V):
        _fail("initial_state", initial_state, f"{(n_states, H, K, V)}")
    if max_head_dim is not None and max(K, V) > max_head_dim:
        _fail("q" if K > max_head_dim else "v", q if K > max_head_dim else v,
              f"head dim <= {max_head_dim} on the fla path")
    if log_decay and g.numel() and bool((g > 0).any()):
        raise ValueError(f"kda: g must be a log-decay (<= 0) but has max {g.max().item():.4g}")


L2_EPS = 1e-6                   # l2norm's, as fla's


def l2norm(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in at least float32: fla's ``l2norm`` (its in-kernel q, k norm)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def unit(x: torch.Tensor, root_eps: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, as x / hypot(|x|, sqrt(eps)) with sqrt(eps) a 0-dim
    tensor: l2norm(x) is unit(x, 1e-3), and RMSNorm(x) is unit(x, sqrt(D eps)) * sqrt(D) weight (see
    :func:`folded_norm`). For one token these three ops take a fraction of the time of l2norm's five
    or of the RMSNorm kernel on the CPU."""
    return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), root_eps)


def folded_norm(norm: torch.nn.RMSNorm, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An RMSNorm over the last D features folded into the matmul after it, for decoding steps:
    (W', root_eps) with RMSNorm(x) @ W^T = unit(x, root_eps) @ W', where W [out, in] is the next
    layer's weight and `in` a multiple of D (a norm of each head's D features). W' [in, out] is
    contiguous: for one token the CPU's matmul reads it faster than the transposed view of W."""
    D = norm.normalized_shape[-1]
    eps = norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps
    folded = (weight.view(weight.shape[0], -1, D) * (norm.weight * D ** 0.5)).flatten(1)
    return folded.T.contiguous(), weight.new_tensor((D * eps) ** 0.5)


@functools.cache
def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's vendor as /proc/cpuinfo names it (``GenuineIntel``, ``AuthenticAMD``), '' where it cannot be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("vendor_id")), "")


def step_weight_parts(device: torch.device) -> int:
    """StepWeight's blocks of rows for a weight on `device` by default: max(2, torch's thread count) on a CPU
    whose MKL runs a one-row matmul on one thread, else 1 (x @ W). Which CPUs do was measured:
    on AMD EPYC (2-core VM) x @ W reads W at 18-22 GB/s on one thread or two, the blocks at 23-27 on one and
    44-56 on two; on Intel Xeon (Sapphire Rapids, 2-core VM) MKL spreads x @ W over the threads, 22 GB/s on
    one and 45-48 on two, where the blocks read 12-16 (docs/benchmarks.md). So the blocks are kept for any
    CPU but Intel's, as before this rule (the vendor, not a timing, decides: the two differ in rounding, and
    a decode must give the same tokens on every run on a machine)."""
    if device.type != "cpu" or cpu_vendor() == "GenuineIntel":
        return 1
    return row_blocks()


def row_blocks() -> int:
    """StepWeight's blocks of rows where it keeps them: one per torch thread, two on one thread."""
    return max(2, torch.get_num_threads())


class StepWeight:
    """A decoding step's weight W [in, out] (contiguous: :func:`folded_norm` gives it so) applied to one
    token's rows x [B, in]: ``w(x)`` is x @ W, ``w(x, add)`` is add + x @ W (a residual or a bias).

    With `parts` > 1 W^T is kept as that many blocks of its rows [parts, out / parts, in] and multiplied
    as one batched matmul, a block per thread: each output a dot product of one contiguous row with x, the
    same products and sums as x @ W, to rounding; where out is not a multiple of `parts`, x @ W. By default
    (`parts` None) :func:`step_weight_parts`: blocks where MKL runs a one-row matmul on one thread.
    (On AMD, a weight read from cache with short rows, the toddler's in = 128, is a little faster as x @ W
    on one thread: its decode 0.62-0.64 ms a token that way, 0.73-0.75 in blocks; xs's 9.0-9.2 that way,
    6.1-6.3 in blocks.)"""

    def __init__(self, w: torch.Tensor, parts: int | None = None):
        if parts is None:
            parts = step_weight_parts(w.device)
        self.n_in, n_out = w.shape
        self.parts = parts if parts > 1 and n_out % parts == 0 else 1
        self.w = w if self.parts == 1 else w.T.reshape(self.parts, n_out // self.parts, self.n_in).contiguous()

    def matrix(self) -> torch.Tensor:
        """W [in, out] as given, whatever the layout it is kept in."""
        return self.w if self.parts == 1 else self.w.reshape(-1, self.n_in).T

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        if self.parts == 1:
            return x @ self.w if add is None else torch.addmm(add, x, self.w)
        y = torch.bmm(self.w, x.T.expand(self.parts, -1, -1)).permute(2, 0, 1).reshape(x.shape[0], -1)
        return y if add is None else add + y


def kda_gate(g: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """The per-channel log-decay from its raw input: -exp(A_log) * softplus(g + dt_bias) <= 0.

    g: [B, T, H, K]; A_log: [H]; dt_bias: [H * K]. Computed in at least float32 (fla's ``naive_kda_gate``).
    fla also offers a bounded gate, lower_bound * sigmoid(exp(A_log) * (g + dt_bias)), which unlocks
    its ``safe_gate`` kernels. It is not offered here: it is a different model (decay capped at
    exp(lower_bound) per step), its only gain is GPU kernel speed that no machine here can measure,
    and under Triton's interpreter (the CI test) it needs two more patches of fla internals.
    """
    dt = torch.promote_types(g.dtype, torch.float32)
    H, K = g.shape[-2:]
    return -A_log.to(dt).exp()[:, None] * F.softplus(g.to(dt) + dt_bias.to(dt).view(H, K))


def kda_step(q, k, v, g, beta, state, scale: float | None = None):
    """One token of the recurrence: q, k, g [B,H,K]; v [B,H,V]; beta [B,H]; state [B,H,K,V].

    Returns (o [B,H,V], new_state). Computes in the state's dtype (float32 or float64).
    """
    dt = state.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    state = state * g.exp()[..., None]                                  # Diag(alpha) S
    predicted = torch.einsum("bhk,bhkv->bhv", k, state)                 # S^T k
    state = state + torch.einsum("bhk,bhv->bhkv", k, beta[..., None] * (v - predicted))
    o = torch.einsum("bhk,bhkv->bhv", q * scale, state)
    return o, state


def kda_step_(q, k, v, g, beta, state, scale: float | None = None):
    """:func:`kda_step` for decoding: the state [B,H,K,V] (contiguous) is updated in place, no new
    state per token, by batched matmuls over the B * H heads. Same arguments, in the state's dtype.
    Returns o [B,H,V]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    N = state.shape[0] * state.shape[1]
    S = state.view(N, *state.shape[2:])                                 # [N, K, V]
    k = k.reshape(N, 1, -1)
    S.mul_(g.exp().reshape(N, -1, 1))                                   # Diag(alpha) S
    u = (v.reshape(N, 1, -1) - torch.bmm(k, S)) * beta.reshape(N, 1, 1)  # beta (v - S^T k)
    S.baddbmm_(k.transpose(1, 2), u)                                    # + k u^T
    return torch.bmm(q.reshape(N, 1, -1), S).view(*state.shape[:2], -1) * scale


def _new_state(q, v, initial_state):
    B, _, H, K = q.shape
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if initial_state is None:
        return q.new_zeros(B, H, K, v.shape[-1], dtype=dt)
    return initial_state.to(dt)


def kda_recurrent(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, segment_ids=None):
    """Reference KDA: the recurrence one token at a time. Slow, obviously correct. With segment_ids
    [B, T] the state restarts from zero wherever a row's segment number changes."""
    check_kda_inputs(q, k, v, g, beta, initial_state)
    state = _new_state(q, v, initial_state)
    outs = []
    for t in range(q.shape[1]):
        if segment_ids is not None and t > 0:
            state = state * (segment_ids[:, t] == segment_ids[:, t - 1]).to(state.dtype)[:, None, None, None]
        o, state = kda_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, scale)
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)
    return o.to(v.dtype), (state if output_final_state else None)


def chunk_scores(q, k, G):
    """Decayed query-key and key-key scores inside each chunk: (P, KK, saved), P and KK [..., C, C],
    with D_rs = exp(G_r - G_s) (elementwise over K) P[r, s] = sum_k q_r D_rs k_s for s <= r and
    KK[r, s] = sum_k k_r D_rs k_s for s < r; `saved` is what :func:`chunk_scores_backward` needs.

    exp(G_r - G_s) = exp(G_r - Mid) exp(Mid - G_s) with Mid = G_C / 2, per chunk and channel: each
    factor lies within exp(+-span / 2), so every channel whose span -G_C is at most 2 SAFE_SPAN
    takes part in one matmul for P and KK together (pairs s > r may overflow there; the tril drops
    them). Entries of q or k past magnitude 1 lower that bound by their log, so that the factored q and
    k stay finite. A channel past it (its decay below exp(-160) over the chunk in float32: strong gates
    of a trained model) is left out of the matmul, and its pairs are added exactly, one exp(G_r - G_s)
    each, gathered over the chunk-channels that need it.
    """
    C = q.shape[-2]
    mid = G[..., -1:, :] / 2                                                # [..., 1, K]
    to_mid, from_mid = (G - mid).exp(), (mid - G).exp()
    largest = float(torch.maximum(q.abs().amax(), k.abs().amax())) if q.numel() else 0.0
    half = min(SAFE_SPAN[G.dtype], math.log(torch.finfo(G.dtype).max / max(largest, 1.0)) - 1)
    strong = mid < -half
    exact = None
    if bool(strong.any()):
        to_mid, from_mid = to_mid.masked_fill(strong, 0), from_mid.masked_fill(strong, 0)
        at = strong.squeeze(-2).nonzero(as_tuple=True)                     # (chunk..., channel)
        Gs, qs, ks = (x.movedim(-1, -2)[at] for x in (G, q, k))             # [n, C]
        lower = torch.ones(C, C, dtype=torch.bool, device=G.device).tril()
        E = (Gs[:, :, None] - Gs[:, None, :]).masked_fill(~lower, float("-inf")).exp()   # [n, C, C]
        exact = (at, E, qs, ks)
    qkm = (torch.stack([q, k], dim=-3) * to_mid[..., None, :, :]).flatten(-3, -2)   # [q; k] e^{G - Mid}
    k_from = k * from_mid
    scores = qkm @ k_from.transpose(-1, -2)                                 # [..., 2C, C]: P and KK
    if exact is not None:   # index_add_ adds in the order of `at`; index_put_'s accumulate races between threads
        lead = scores.shape[:-2]
        chunk = torch.arange(math.prod(lead), device=scores.device).view(lead)[at[:-1]]   # row in scores.view
        Ek = E * ks[:, None, :]
        scores.view(-1, *scores.shape[-2:]).index_add_(0, chunk, torch.cat([qs[:, :, None] * Ek, ks[:, :, None] * Ek],
                                                                           dim=1))
    return scores[..., :C, :].tril(), scores[..., C:, :].tril(-1), (to_mid, from_mid, qkm, k_from, exact)


def chunk_scores_backward(saved, dP, dKK):
    """(dq, dk, dG) of :func:`chunk_scores` from dP (s <= r) and dKK (s < r), both masked."""
    to_mid, from_mid, qkm, k_from, exact = saved
    d_scores = torch.cat([dP, dKK], dim=-2)                                 # [..., 2C, C]
    d_qkm, dk_from = d_scores @ k_from, d_scores.transpose(-1, -2) @ qkm
    (dqm, dkm), (qm, km) = d_qkm.chunk(2, dim=-2), qkm.chunk(2, dim=-2)
    dq, dk = dqm * to_mid, torch.addcmul(dkm * to_mid, dk_from, from_mid)
    # dG through exp(+-(G - Mid)); Mid cancels in each pair
    dG = (dqm * qm).addcmul_(dkm, km).addcmul_(dk_from, k_from, value=-1)
    if exact is not None:
        at, E, qs, ks = exact
        dPs, dKs = dP[at[:-1]] * E, dKK[at[:-1]] * E                        # [n, C, C]
        left = dPs * qs[:, :, None] + dKs * ks[:, :, None]                  # d score_rs / k_s
        pair = left * ks[:, None, :]                                        # d score_rs * score_rs
        for grad, part in ((dq, (dPs * ks[:, None, :]).sum(-1)),
                           (dk, left.sum(-2) + (dKs * ks[:, None, :]).sum(-1)),
                           (dG, pair.sum(-1) - pair.sum(-2))):
            grad.movedim(-1, -2)[at] += part
    return dq, dk, dG


def _recurrence(qe, ke, k_to_end, v, beta, KK, P, decay, state):
    """The chunked form past its intra-chunk scores, per chunk ([N, B, H, C, ...], chunk-major):
    qe = Q e^G, ke = K e^G, k_to_end = K e^{G_C - G}, v, beta, KK (s < r) and P (s <= r) as from
    :func:`chunk_scores`, decay = e^{G_C} [N, B, H, K], and the state S_0 [B, H, K, V] coming in.
    With W = (I + KK beta)^-1 beta ke and U~ = (I + KK beta)^-1 beta v, chunk by chunk

        U_n = U~_n - W_n S_n,    S_{n+1} = Diag(decay_n) S_n + k_to_end_n^T U_n,    o_n = qe_n S_n + P_n U_n.

    Returns (o [N, B, H, C, V], the state after the last chunk, what :func:`_recurrence_backward` needs).
    """
    A = KK * beta[..., None]                    # I + A is unit lower triangular: A's diagonal is never read
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
    inverse = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)   # (I + A)^-1
    W, U = inverse @ (ke * beta[..., None]), inverse @ (v * beta[..., None])    # W and U~, U~ turned into U below
    states = state.new_empty((P.shape[0] + 1, *state.shape))            # S_0 .. S_N
    states[0] = state
    # [B H, ...] per chunk as lists of views made once: indexing in each step cost a third of the loop
    S, Un, Wn, Kn, Dn = (x.flatten(1, 2).unbind(0)
                         for x in (states, U, W, k_to_end.transpose(-1, -2), decay[..., None]))
    for n in range(P.shape[0]):                 # in place: no copy of an addend into an output buffer
        Un[n].baddbmm_(Wn[n], S[n], alpha=-1)
        torch.mul(S[n], Dn[n], out=S[n + 1])
        S[n + 1].baddbmm_(Kn[n], Un[n])
    starts = states[:-1]
    saved = (qe, ke, k_to_end, v, beta, KK, inverse, P, W, U, decay, starts)
    o = torch.baddbmm(P.flatten(0, 2) @ U.flatten(0, 2), qe.flatten(0, 2), starts.flatten(0, 2))
    return o.view_as(U), states[-1].clone(), saved


def _recurrence_backward(saved, do, dstate):
    """The gradients of :func:`_recurrence`'s inputs from those of its outputs (autograd hands in zeros
    for an output the loss does not use)."""
    qe, ke, k_to_end, v, beta, KK, inverse, P, W, U, decay, starts = saved
    # Chunk by chunk backwards, from dS_N = dstate:
    #   dU_n = P_n^T do_n + k_to_end_n dS_{n+1},    dS_n = qe_n^T do_n + Diag(decay_n) dS_{n+1} - W_n^T dU_n.
    dU, q_do = P.transpose(-1, -2) @ do, qe.transpose(-1, -2) @ do         # dU starts as P^T do
    dstates = starts.new_empty((starts.shape[0] + 1, *starts.shape[1:]))
    dstates[-1] = dstate
    dS, dUn, Kn, QDn, Dn, WTn = (x.flatten(1, 2).unbind(0) for x in (dstates, dU, k_to_end, q_do, decay[..., None],
                                                                     W.transpose(-1, -2)))
    for n in reversed(range(P.shape[0])):
        dUn[n].baddbmm_(Kn[n], dS[n + 1])
        torch.addcmul(QDn[n], dS[n + 1], Dn[n], out=dS[n])
        dS[n].baddbmm_(WTn[n], dUn[n], alpha=-1)
    ds_next = dstates[1:]                                                   # dS_{n+1}, for each chunk n
    # Through U~ = (I + A)^-1 beta v and W = (I + A)^-1 beta ke, with dU~ = dU and dW = -dU S^T: the right-hand
    # sides' gradients are (I + A)^-T dU and -(I + A)^-T dU S^T, and A's is -(I + A)^-T dU (U~ - W S)^T = ... U^T.
    # do and d_rhs_v both multiply S_n^T (to dqe and -d_rhs_k) and U_n^T (to dP and -dA): one matmul each.
    C, d_rhs_v = do.shape[-2], inverse.transpose(-1, -2) @ dU
    both = torch.cat([do, d_rhs_v], dim=-2)
    (dqe, neg_d_rhs_k), (dP, neg_dA) = ((both @ x.transpose(-1, -2)).split(C, dim=-2) for x in (starts, U))
    neg_dA = neg_dA.tril(-1)
    neg_beta = -beta[..., None]
    dbeta = (d_rhs_v * v).sum(-1) - (neg_d_rhs_k * ke).sum(-1) - (neg_dA * KK).sum(-1)
    return (dqe, neg_d_rhs_k * neg_beta, U @ ds_next.transpose(-1, -2), d_rhs_v * beta[..., None], dbeta,
            neg_dA * neg_beta, dP, (ds_next * starts).sum(-1), dstates[0])


class ChunkedKDA(torch.autograd.Function):
    """The chunked form past its chunk layout, forward and backward written out: the decays,
    :func:`chunk_scores` and :func:`_recurrence`, without autograd's copies behind splits, unbinds and
    broadcast products, and with fewer tensors saved.

    Inputs per chunk ([N, B, H, C, ...], chunk-major): q (scaled), k, v, G (the within-chunk cumulative
    log-decay, its own gradient left to autograd: a cumsum, or packed documents' own-segment sums),
    beta, the state [B, H, K, V] coming in; with packed documents the masks of :func:`kda_chunked`
    (else None): same [N, B, 1, C, C] (a pair in one segment), carried [N, B, 1, C, 1] (a token that
    sees S_0), last [N, B, 1, C, 1] (a token of the chunk's last segment). Returns (o [N, B, H, C, V],
    the final state).
    """

    @staticmethod
    def forward(ctx, q, k, v, G, beta, state, same, carried, last):
        P, KK, scores = chunk_scores(q, k, G)
        end = G[..., -1:, :]                                                # G_C: [..., 1, K]
        eG, to_end, e_end = G.exp(), (end - G).exp(), end.squeeze(-2).exp()
        qe, ke, k_to_end, decay = q * eG, k * eG, k * to_end, e_end         # Q e^G, K e^G, K e^{G_C - G}
        own = (eG, to_end, e_end, qe, ke, k_to_end, same, carried, last)
        if same is not None:
            P, KK, k_to_end = P * same, KK * same, k_to_end * last
            qe, ke, decay = qe * carried, ke * carried, decay * carried[..., -1, :]
        o, state, recurrence = _recurrence(qe, ke, k_to_end, v, beta, KK, P, decay, state)
        ctx.save_for_backward(*own, *recurrence)    # these hold inputs (v, beta, the masks); the scores' not
        ctx.scores = scores
        return o, state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dstate):
        eG, to_end, e_end, qe, ke, k_to_end, same, carried, last, *recurrence = ctx.saved_tensors
        # do comes back through kda_chunked's layout change in whatever memory the caller's gradient has (an
        # expanded one from a loss of o.sum(): stride 0): chunk-major once, here, for the batched matmuls below,
        # which would otherwise copy such a gradient out one [C, V] block at a time (a dense one is a copy either way)
        do = do.contiguous()
        dqe, dke, dkt, dv, dbeta, dKK, dP, ddecay, dstate = _recurrence_backward(recurrence, do, dstate)
        dP = dP.tril()
        if same is not None:
            dP, dKK, dkt = dP * same, dKK * same, dkt * last
            dqe, dke, ddecay = dqe * carried, dke * carried, ddecay * carried[..., -1, :]
        dq, dk, dG = chunk_scores_backward(ctx.scores, dP, dKK)
        dq.addcmul_(dqe, eG)
        dk.addcmul_(dke, eG).addcmul_(dkt, to_end)
        dG.addcmul_(dqe, qe).addcmul_(dke, ke).addcmul_(dkt, k_to_end, value=-1)
        dG[..., -1:, :] += (dkt * k_to_end).sum(-2, keepdim=True) + (ddecay * e_end)[..., None, :]
        return dq, dk, dv, dG, dbeta, dstate, None, None, None


def kda_chunked(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                chunk_size: int = 32, segment_ids=None):
    """Chunkwise-parallel KDA in pure PyTorch (differentiable, any T). See the module docstring.

    segment_ids [B, T] (packed documents; a row's segment number, rising): the state restarts from
    zero where it changes, inside a chunk too, with no padding. Per chunk, a token sees the carried-in
    state S_0 only if it belongs to the segment the chunk began in; token pairs of two segments do
    not interact (A and P masked); the state carried out counts the chunk's last segment only."""
    check_kda_inputs(q, k, v, g, beta, initial_state)
    B, T, H, K = q.shape
    V, out_dtype = v.shape[-1], v.dtype
    C = chunk_size
    scale = K ** -0.5 if scale is None else scale
    state = _new_state(q, v, initial_state)
    dt = state.dtype
    pad = (-T) % C
    N = (T + pad) // C

    def chunks(x):  # [B, T, H, ...] -> [N, B, H, C, ...], chunk-major; padding has k = beta = g = 0: a no-op step
        x = x.to(dt)
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        x = x.view(B, N, C, H, *x.shape[3:]).transpose(2, 3).transpose(0, 1)
        return x.contiguous()

    q, k, v, g, beta = chunks(q * scale), chunks(k), chunks(v), chunks(g), chunks(beta)
    G = g.cumsum(-2)
    masks = (None, None, None)
    if segment_ids is not None:
        # [N, B, 1, C]: the padding joins the last segment
        seg = F.pad(segment_ids, (0, pad), mode="replicate").view(B, N, C).transpose(0, 1)[:, :, None]
        same = (seg[..., :, None] == seg[..., None, :]).to(dt)          # [N, B, 1, C, C]
        # Each token's decay counts its own segment's gates only: the values stay the chunk's cumsum
        # (monotone, as the factored scores need), the gradient reaches no other segment's gates.
        own = (same * torch.ones(C, C, dtype=dt, device=q.device).tril()) @ g
        G = own + (G - own).detach()
        before = torch.cat([seg[:1, ..., :1], seg[:-1, ..., -1:]])     # the segment coming in
        carried = (seg == before)[..., None].to(dt)                      # [N, B, 1, C, 1]: sees S_0
        masks = (same, carried, (seg == seg[..., -1:])[..., None].to(dt))  # and the chunk's last segment
    o, state = ChunkedKDA.apply(q, k, v, G, beta, state, *masks)
    o = o.transpose(0, 1).transpose(2, 3).reshape(B, N * C, H, V)[:, :T]
    return o.to(out_dtype), (state if output_final_state else None)


def _per_sequence(fn, q, k, v, g, beta, cu_seqlens, initial_state, output_final_state, **kwargs):
    """``fn`` on each packed sequence as if alone, each from its own initial state: what cu_seqlens means.

    The sequences become the rows of one batch, zero-padded at their ends: a step with k = beta = g = 0
    leaves the state as it is, so a row's final state is its sequence's. One batched call, not a loop.
    """
    bounds = list(itertools.pairwise(cu_seqlens.tolist()))

    def rows(x):                                                  # [1, T, ...] -> [N, longest, ...]
        return torch.nn.utils.rnn.pad_sequence([x[0, lo:hi] for lo, hi in bounds], batch_first=True)

    o, state = fn(*(rows(x) for x in (q, k, v, g, beta)), initial_state=initial_state,
                  output_final_state=output_final_state, **kwargs)
    return torch.cat([o[n, :hi - lo] for n, (lo, hi) in enumerate(bounds)])[None], state


def cu_seqlens_of(segment_ids: torch.Tensor) -> torch.Tensor:
    """fla's cu_seqlens [N + 1] (int32) of the segments of segment_ids [B, T] laid end to end as one row of B * T
    tokens: a segment begins where the id changes and at each row's start."""
    B, T = segment_ids.shape
    starts = F.pad(segment_ids[:, 1:] != segment_ids[:, :-1], (1, 0), value=True).flatten()
    return F.pad(starts.nonzero().squeeze(1), (0, 1), value=B * T).to(torch.int32)


def kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
        chunk_size: int = 32, backend: str = "auto", cu_seqlens=None, use_qk_l2norm: bool = False,
        use_gate: bool = False, A_log=None, dt_bias=None, use_beta_sigmoid: bool = False, segment_ids=None):
    """KDA with the fastest available implementation.

    backend: ``auto`` (fla's ``chunk_kda`` for CUDA tensors when fla is installed, the single-step
    update for one token, else :func:`kda_chunked`), or one of ``fla``, ``chunked``, ``recurrent``.
    chunk_size: the chunked form's chunk length (fla picks its own).
    cu_seqlens: [N + 1] boundaries of N sequences packed along T (then B = 1, as in fla): no state
    crosses a boundary, and initial_state and the final state are [N, H, K, V].
    segment_ids: [B, T] packed documents within each row (a row's segment number, rising): the state
    restarts from zero where it changes; the chunked and recurrent forms take them as they are (no
    padding), fla as cu_seqlens of the batch flattened to one row.
    use_qk_l2norm, use_gate (with A_log [H], dt_bias [H * K]), use_beta_sigmoid: q and k, g, beta are
    the raw inputs of :func:`l2norm`, :func:`kda_gate` and the sigmoid. fla computes these inside its
    kernel (fla's ``use_*_in_kernel``); the other backends apply the explicit ops, the reference.
    """
    if backend == "auto":
        if q.is_cuda and fla_available():
            backend = "fla"
        elif q.shape[1] == 1:
            backend = "recurrent"
        else:
            backend = "chunked"
    if backend not in ("fla", "chunked", "recurrent"):
        raise ValueError(f"kda: backend must be auto, fla, chunked or recurrent, got {backend!r}")
    if use_gate:
        H, K = q.shape[-2:]
        if A_log is None or A_log.shape != (H,):
            raise ValueError(f"kda: use_gate needs A_log of shape {(H,)}, got "
                             f"{None if A_log is None else tuple(A_log.shape)}")
        if dt_bias is None or dt_bias.shape != (H * K,):
            raise ValueError(f"kda: use_gate needs dt_bias of shape {(H * K,)}, got "
                             f"{None if dt_bias is None else tuple(dt_bias.shape)}")
    if segment_ids is not None:
        if cu_seqlens is not None or initial_state is not None:
            raise ValueError("kda: segment_ids start every row from a zero state and replace cu_seqlens")
        if backend == "fla":                                            # fla's varlen form: [1, B * T]
            B, T = segment_ids.shape
            cu = cu_seqlens_of(segment_ids)
            flat = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, beta)]
            o, state = kda(*flat, scale, None, output_final_state, chunk_size, "fla", cu, use_qk_l2norm, use_gate,
                           A_log, dt_bias, use_beta_sigmoid)
            return o.view(B, T, *o.shape[2:]), state
    if backend == "fla":
        if not fla_available():
            raise ValueError("kda: backend 'fla' (model.kda_backend) needs fla-core, the gpu extra (pip install -e "
                             "'.[gpu]'); auto uses it where it can")
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("kda: backend 'fla' (model.kda_backend) runs fla's Triton kernels on a CUDA device, not "
                             f"on {q.device.type} (TRITON_INTERPRET=1 interprets them, for tests); use auto or chunked")
        check_kda_inputs(q, k, v, g, beta, initial_state, max_head_dim=FLA_MAX_HEAD_DIM, cu_seqlens=cu_seqlens,
                         log_decay=not use_gate)
        from fla.ops.kda import chunk_kda

        return chunk_kda(q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                         use_qk_l2norm_in_kernel=use_qk_l2norm, use_gate_in_kernel=use_gate,
                         A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=use_beta_sigmoid)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if use_gate:
        g = kda_gate(g, A_log, dt_bias)
    if use_beta_sigmoid:
        beta = torch.sigmoid(beta.to(torch.promote_types(beta.dtype, torch.float32)))
    fn, kwargs = (kda_recurrent, {}) if backend == "recurrent" else (kda_chunked, {"chunk_size": chunk_size})
    if cu_seqlens is None:
        return fn(q, k, v, g, beta, scale, initial_state, output_final_state, segment_ids=segment_ids, **kwargs)
    check_kda_inputs(q, k, v, g, beta, initial_state, cu_seqlens=cu_seqlens)
    return _per_sequence(fn, q, k, v, g, beta, cu_seqlens, initial_state, output_final_state, scale=scale, **kwargs)
