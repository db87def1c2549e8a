"""INT8 weights: symmetric per-output-channel quantization of every Linear layer and the embedding.

For a weight row w (one output channel), scale = max|w| / 127 and q = round(w / scale) in
[-127, 127], so |w - q * scale| <= scale / 2. Norms, biases, convs and the KDA decay parameters
stay in float32 (they are a few percent of the weights). The embedding is quantized per row,
which is also per output channel of the tied LM head.

Architectures that multiply by raw parameter matrices (BDH's encoders, decoder and head; the
Titans memory's initial weights) list them in a module attribute ``INT8_MATRICES``; those are used
as ``x @ W``, so their output channels are the *last* dimension, and their scales are stored with
W's number of dimensions (broadcasting over it) — a 1-D scale means per row, as for Linear.

An INT8 artifact can be loaded two ways: ``compute="fp32"`` dequantizes once at load (the speed of
the float model, a quarter of its file size); ``compute="int8"`` keeps Linear weights int8 in
memory and runs them through PyTorch's weight-only int8 matmul kernel (a quarter of the memory;
its speed depends on the CPU's kernel). The int8 path that decodes faster than fp32 on a CPU is the
export's other artifact: the decode step as an onnxruntime int8 graph (hatchling/export/onnx.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

QMAX = 127


def quantize_per_channel(w: torch.Tensor, last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (q int8 [out, in], scale float32 [out]). With `last`, the output channels
    are w's last dimension (x @ W) and the scale keeps w's rank ([1, ..., 1, out])."""
    w = w.detach().float()
    if last:
        dims = tuple(range(w.dim() - 1))
        scale = (w.abs().amax(dim=dims, keepdim=True) / QMAX).clamp_min(1e-12)
        return torch.round(w / scale).clamp(-QMAX, QMAX).to(torch.int8), scale
    scale = (w.abs().amax(dim=1) / QMAX).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * (scale if scale.dim() == q.dim() else scale[:, None])


def quantized_names(model: nn.Module) -> dict[str, bool]:
    """{parameter name stored as int8: output channels last?}: every Linear weight, the embedding
    table, and the raw matrices modules declare in INT8_MATRICES."""
    names = {f"{n}.weight": False for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for n, m in model.named_modules():
        names |= {f"{n}.{attr}" if n else attr: True for attr in getattr(m, "INT8_MATRICES", ())}
    return {"embed.weight": False, **names}


def quantize_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each quantized weight X replaced by X.int8 and X.scale."""
    targets = quantized_names(model)
    out = {}
    for name, tensor in model.state_dict().items():
        if name in targets:
            out[f"{name}.int8"], out[f"{name}.scale"] = quantize_per_channel(tensor, last=targets[name])
        else:
            out[name] = tensor.detach().float().contiguous()
    return out


def dequantize_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in sd.items():
        if name.endswith(".int8"):
            base = name[: -len(".int8")]
            out[base] = dequantize(tensor, sd[f"{base}.scale"])
        elif not name.endswith(".scale"):
            out[name] = tensor
    return out


class Int8Linear(nn.Module):
    """A Linear whose weight stays int8; y = x W^T via the weight-only int8 kernel (+ bias)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).float(), self.weight_int8,
                                               self.weight_scale)
        y = y.reshape(*shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def use_int8_linears(model: nn.Module, sd: dict[str, torch.Tensor]) -> nn.Module:
    """Swap each nn.Linear of `model` for an Int8Linear holding the stored int8 weight."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and f"{full}.weight.int8" in sd:
                bias = child.bias.detach() if child.bias is not None else None
                setattr(module, child_name, Int8Linear(sd[f"{full}.weight.int8"], sd[f"{full}.weight.scale"], bias))
    return model
