"""AdaPM: AdamW with one momentum coefficient per output channel, adapted to the gradient's consistency.

A weight's output channel (a row of a matrix; an element of a vector) whose gradient keeps pointing
the way its momentum points can afford more momentum; one whose gradient flips (oscillation across
a ravine) needs less. Each step, per channel c:

    agreement_c = cos(g_c, m_c)                               in [-1, 1] (0 before any momentum)
    beta1_c     = clip(beta1_c + rate * agreement_c, beta_min, beta_max)
    m_c         = beta1_c m_c + (1 - beta1_c) g_c
    v           = beta2 v + (1 - beta2) g^2                   (per element, as in Adam)
    w          -= lr * (m_c / (1 - prod beta1_c)) / (sqrt(v / (1 - beta2^t)) + eps)  (+ decoupled decay)

The bias correction uses the product of the channel's own coefficients (with a time-varying
coefficient the weights of the running average sum to 1 - prod beta1). With beta_min = beta_max =
beta1 this is exactly AdamW (test: tests/test_research.py).
"""

from __future__ import annotations

import torch


class AdaPM(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, beta_range: tuple[float, float] = (0.5, 0.98), rate: float = 0.05):
        if not 0 <= beta_range[0] <= betas[0] <= beta_range[1] < 1:
            raise ValueError(f"AdaPM: need 0 <= beta_min <= beta1 <= beta_max < 1, got betas {betas}, "
                             f"beta_range {beta_range}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      beta_range=beta_range, rate=rate))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lo, hi = group["beta_range"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.reshape(p.shape[0], -1) if p.dim() else p.grad.reshape(1, 1)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(g)
                    state["v"] = torch.zeros_like(g)
                    state["beta1"] = torch.full((g.shape[0], 1), beta1, dtype=g.dtype, device=g.device)
                    state["beta1_prod"] = torch.ones_like(state["beta1"])
                m, v, b1 = state["m"], state["v"], state["beta1"]
                state["step"] += 1
                agreement = torch.nn.functional.cosine_similarity(g, m, dim=1, eps=1e-30)[:, None]
                b1.add_(group["rate"] * agreement).clamp_(lo, hi)
                state["beta1_prod"].mul_(b1)
                m.mul_(b1).add_((1 - b1) * g)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_hat = m / (1 - state["beta1_prod"])
                v_hat = v / (1 - beta2 ** state["step"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((m_hat / (v_hat.sqrt() + group["eps"])).view_as(p), alpha=-group["lr"])
        return loss

    def channel_momentum(self) -> float:
        """Mean beta1 over all channels (logged: does the optimizer find consistent directions?)."""
        values = [s["beta1"].mean() for s in self.state.values() if "beta1" in s]
        return float(torch.stack(values).mean()) if values else float("nan")
