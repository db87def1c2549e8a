"""The decode step as an ONNX graph, in fp32 or dynamically quantized to int8 (needs the ``onnx`` extra).

One graph: (input_ids [B, 1], the cache as flat tensors) -> (logits [B, vocab], the new cache). It is the
model's own cached forward (``model.new_cache()``, ``model(ids, cache)``) traced by torch's TorchScript
exporter (``dynamo=False``: the dynamo exporter needs onnxscript, and torch.export refuses the data-dependent
checks of the KDA path). Each cache entry ``cache[i][key]`` becomes the input ``b{i}.{key}`` and the output
``new.b{i}.{key}``: KDA's conv windows and recurrent state (fixed size), attention's keys and values (their
length axis dynamic: an output one longer than its input). A fresh cache is zeros with keys and values of
length 0, which the traced graph treats exactly as the model treats an empty cache.

Prefill runs the same graph token by token (:class:`hatchling.export.onnx_runtime.OnnxDecoder`): the
model's prompt forms (KDA's chunked kernel, attention over a block) trace to graphs unrolled for one
prompt length, so a prefill graph would need one graph per length or padded buckets with masked state
updates; for the prompts `hatchling generate` takes, a loop over one compiled step graph is fast enough.

INT8 is onnxruntime's dynamic quantization (``quantize_dynamic``): every MatMul with a weight becomes
``DynamicQuantizeLinear`` + ``MatMulInteger`` with int8 weights per output channel (u8 x s8 kernels with
AVX2; 7-bit weights, see :func:`quantize_onnx`), the embedding ``Gather`` reads int8 rows; norms, the KDA
decay parameters and the state stay float32.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.onnx import register_custom_op_symbolic, symbolic_helper, unregister_custom_op_symbolic

from hatchling.errors import ConfigError
from hatchling.model.config import RESEARCH_SWITCHES, ModelConfig

ONNX_ARCHS = ("hybrid", "gpt")
OPSET = 17
INPUT_IDS, LOGITS, NEW = "input_ids", "logits", "new."
ONNX_FILE = "model.onnx"
ONNX_QUANTIZATION = ("onnxruntime dynamic int8: DynamicQuantizeLinear + MatMulInteger, 7-bit weights per output "
                     "channel; int8 embedding Gather")


def onnx_unsupported(cfg: ModelConfig) -> str | None:
    """Why the decode-step export cannot carry this model (another arch, or a research switch: their
    caches hold more than tensors, or their steps branch on the data), or None when it can."""
    on = [k for k in RESEARCH_SWITCHES if k != "checkpoint_attention" and getattr(cfg, k)]
    if cfg.arch in ONNX_ARCHS and not on:
        return None
    return (f"the ONNX decode-step export takes arch {' or '.join(ONNX_ARCHS)} with the research switches off; "
            f"this model has arch {cfg.arch!r}" + (f" and {', '.join(on)} on" if on else ""))


def onnx_installed() -> bool:
    """The ``onnx`` extra: onnx (the exporter writes its protobuf) and onnxruntime (quantization, decoding)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class DecodeStep(nn.Module):
    """(input_ids [B, 1], *cache tensors in `names` order) -> (logits [B, vocab], *new cache tensors)."""

    def __init__(self, model: nn.Module, names: list[tuple[int, str]]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = self.model.new_cache()
        for (i, key), tensor in zip(self.names, state, strict=True):
            cache[i][key] = tensor
        logits = self.model(input_ids, cache)[:, -1]
        return logits, *(cache[i][key] for i, key in self.names)


def _example_cache(model: nn.Module, length: int) -> list[dict]:
    """The cache after `length` tokens (batch 1)."""
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, length, dtype=torch.long), cache)
    return cache


def _growing_axes(model: nn.Module) -> dict[tuple[int, str], int | None]:
    """{(block, key): the axis that grows by one per token, or None for a fixed-size entry}, found by
    comparing the cache after two and after three tokens."""
    two, three = _example_cache(model, 2), _example_cache(model, 3)
    axes = {}
    for i, entries in enumerate(two):
        for key, tensor in sorted(entries.items()):
            grown = [a for a, (m, n) in enumerate(zip(tensor.shape, three[i][key].shape, strict=True)) if m != n]
            axes[(i, key)] = grown[0] if grown else None
    return axes


def _rms_norm_symbolic():
    @symbolic_helper.parse_args("v", "is", "v", "f")
    def rms_norm(g, x, normalized_shape, weight, eps):
        mean_square = g.op("ReduceMean", g.op("Mul", x, x), axes_i=list(range(-len(normalized_shape), 0)),
                           keepdims_i=1)
        y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean_square, g.op("Constant", value_t=torch.tensor(eps)))))
        return y if weight.node().mustBeNone() else g.op("Mul", y, weight)

    return rms_norm


def _decode_attention_symbolic(n_heads: int, n_kv_heads: int, head_dim: int):
    """SDPA of a decode step (one query per head over the whole cache), grouped-query without copying the
    keys: the query heads that share a KV head become its rows. The exporter's own SDPA has no GQA."""

    @symbolic_helper.parse_args("v", "v", "v", "v", "f", "b", "v", "b")
    def attention(g, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        if not attn_mask.node().mustBeNone() or is_causal or not scale.node().mustBeNone():
            raise ConfigError("ONNX export: the traced attention is not a decode step's (it has a mask, "
                              "is_causal or a scale)")
        const = lambda value: g.op("Constant", value_t=torch.tensor(value))
        q = g.op("Reshape", q, const([0, n_kv_heads, -1, head_dim]))        # [B, Hkv, G * T, D]
        scores = g.op("MatMul", q, g.op("Transpose", k, perm_i=[0, 1, 3, 2]))
        probs = g.op("Softmax", g.op("Mul", scores, const(1 / math.sqrt(head_dim))), axis_i=-1)
        return g.op("Reshape", g.op("MatMul", probs, v), const([0, n_heads, -1, head_dim]))

    return attention


def export_onnx(model: nn.Module, path: str | Path) -> Path:
    """Write the fp32 decode-step graph of `model` (arch hybrid or gpt, the switches off) to `path`."""
    cfg = model.config
    if why := onnx_unsupported(cfg):
        raise ConfigError(why)
    model.eval()
    axes = _growing_axes(model)
    names = list(axes)
    example = _example_cache(model, 2)          # a past of two tokens: the step traces attention's concat
    labels = [f"b{i}.{key}" for i, key in names]
    dynamic = {INPUT_IDS: {0: "batch"}, LOGITS: {0: "batch"}}
    for label, axis in zip(labels, axes.values(), strict=True):
        dynamic[label] = {0: "batch"} | ({} if axis is None else {axis: "past"})
        dynamic[NEW + label] = {0: "batch"} | ({} if axis is None else {axis: "length"})
    symbolics = {"aten::rms_norm": _rms_norm_symbolic(),
                 "aten::scaled_dot_product_attention": _decode_attention_symbolic(cfg.n_heads, cfg.n_kv_heads,
                                                                                  cfg.head_dim)}
    for op, fn in symbolics.items():
        register_custom_op_symbolic(op, fn, OPSET)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)    # the KDA path's checks of its inputs
            warnings.simplefilter("ignore", DeprecationWarning)         # dynamo=False
            torch.onnx.export(DecodeStep(model, names), (torch.zeros(1, 1, dtype=torch.long),
                                                         *(example[i][key] for i, key in names)),
                              str(path), dynamo=False, opset_version=OPSET, input_names=[INPUT_IDS, *labels],
                              output_names=[LOGITS, *(NEW + label for label in labels)], dynamic_axes=dynamic)
    finally:
        for op in symbolics:
            unregister_custom_op_symbolic(op, OPSET)
    return Path(path)


def quantize_onnx(source: str | Path, path: str | Path) -> Path:
    """The int8 graph of an fp32 one: onnxruntime's dynamic quantization of every weight MatMul (per output
    channel) and of the embedding Gather, weights in 7 bits (``reduce_range``): without VNNI, onnxruntime's
    u8 x s8 kernels add pairs of products in int16 (vpmaddubsw), which 255 x 127 x 2 overflows and 255 x 63 x 2
    does not."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(path), per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gather"])
    return Path(path)


def write_int8_onnx(model: nn.Module, path: str | Path) -> Path:
    """The int8 decode-step graph of `model` at `path` (its fp32 graph only passes through a temporary file)."""
    with tempfile.TemporaryDirectory() as tmp:
        return quantize_onnx(export_onnx(model, Path(tmp) / ONNX_FILE), path)
