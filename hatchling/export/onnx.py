"""The decode step as an ONNX graph, in fp32 or quantized to int8 (needs the ``onnx`` extra).

One graph: (input_ids [B, 1], the cache as flat tensors) -> (logits [B, vocab], the new cache). Its cache per
block: a KDA layer's ``b{i}.conv`` [B, W - 1, 3 H D] (the q|k|v conv's last W - 1 inputs, oldest first) and
``b{i}.state`` [B, H, D, D]; an attention layer's ``b{i}.k`` and ``b{i}.v`` [B, Hkv, past, D] (the length
axis dynamic: an output one longer than its input). Each input ``name`` comes back as the output
``new.name``; a fresh cache is zeros, with keys and values of length 0.

The graph is :class:`StepGraph`, the model's forward for one token written for the graph (the same
arithmetic, fewer nodes), traced by torch's TorchScript exporter (``dynamo=False``: the dynamo exporter
needs onnxscript). Tracing the model's own cached forward instead gives ~1,700 nodes for xs (its prompt
paths: chunking, checks, shape arithmetic for one token), and onnxruntime spends a few microseconds on
each node whatever its size: ~740 after its fusions took 4.7 ms of a 6.5 ms int8 step. This graph has
725 nodes for xs, 296 after onnxruntime's fusions (304 quantized): one matmul for each layer's input
projections, one block-diagonal matmul for KDA's two second low-rank factors, the recurrence as three
small matmuls (S^T k, k u^T, S^T q), the RMSNorms in the form onnxruntime fuses into one
``SimplifiedLayerNormalization`` node each (KDA's l2 norm of q and k too: x / sqrt(sum x^2 + eps) =
RMSNorm_{eps / D}(x) / sqrt(D); in the int8 graph all but the first, which reads the embedding's
dequantized rows), SiLU as onnxruntime's fused ``QuickGelu``. tests/test_onnx_export.py checks it
against the model's forward over a prompt and steps.

Prefill runs the same graph token by token (:class:`hatchling.export.onnx_runtime.OnnxDecoder`): the
model's prompt forms (KDA's chunked kernel, attention over a block) would trace to graphs unrolled for
one prompt length, so a prefill graph would need one graph per length or padded buckets with masked
state updates; for the prompts `hatchling generate` takes, a loop over one step graph is fast enough.

INT8 (:func:`quantize_onnx`): every MatMul with a weight becomes onnxruntime's ``MatMulNBits`` with 8-bit
weights in blocks and int8 arithmetic, the embedding ``Gather`` reads a uint8 table (one scale and zero
point for the table); norms, the KDA decay parameters, the conv taps and the state stay float32. The
embedding is stored twice, as the Gather's table and as the tied head's weights (the quantizer takes
a MatMul's weight from an initializer of its own): a fifth of the int8 file for the toddler, 7 % for xs.
(onnxruntime's dynamic quantization of the MatMuls, ``DynamicQuantizeLinear`` + ``MatMulInteger`` per
output channel, decodes xs ~25 % slower: docs/benchmarks.md.)
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hatchling.errors import ConfigError
from hatchling.io import atomic_path
from hatchling.model.attention import NoPEAttention
from hatchling.model.config import RESEARCH_SWITCHES, ModelConfig
from hatchling.model.hatchling import HatchlingLM, SwiGLU
from hatchling.model.kda import L2_EPS
from hatchling.model.kda_layer import KDALayer, conv_step

ONNX_ARCHS = ("hybrid", "gpt")
OPSET = 17
INPUT_IDS, LOGITS, NEW = "input_ids", "logits", "new."
ONNX_FILE = "model.onnx"
QUANT_BLOCK = 128
ONNX_QUANTIZATION = (f"onnxruntime int8: MatMulNBits (8-bit weights, a scale per block of {QUANT_BLOCK}, int8 "
                     "activations: accuracy_level 4); uint8 embedding Gather (one scale)")


def onnx_unsupported(cfg: ModelConfig) -> str | None:
    """Why the decode-step export cannot carry this model (another arch, or a research switch: their
    caches hold more than tensors, or their steps branch on the data), or None when it can."""
    on = [k for k in RESEARCH_SWITCHES if k != "checkpoint_attention" and getattr(cfg, k)]
    if cfg.arch in ONNX_ARCHS and not on:
        return None
    return (f"the ONNX decode-step export takes arch {' or '.join(ONNX_ARCHS)} with the research switches off; "
            f"this model has arch {cfg.arch!r}" + (f" and {', '.join(on)} on" if on else ""))


def onnx_installed() -> bool:
    """What writing the graph needs, the ``onnx`` extra: onnx (the exporter writes its protobuf), onnxruntime
    (quantization) and onnx_ir (onnxruntime's block quantizer reads the graph through it). Decoding one needs
    only onnxruntime (:func:`hatchling.export.onnx_runtime.onnxruntime_installed`)."""
    try:
        import onnx  # noqa: F401
        import onnx_ir  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, written as the node chain onnxruntime fuses into one SimplifiedLayerNormalization
    (Pow, ReduceMean, Add, Sqrt, Div, Mul)."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _weight(w: torch.Tensor) -> nn.Parameter:
    """A graph initializer: a copy, so that the graph holds what the model held when it was built."""
    return nn.Parameter(w.detach().clone().contiguous(), requires_grad=False)


class KDAStepGraph(nn.Module):
    """x + KDALayer(RMSNorm(x)) for one token: (x [B, d], conv [B, W - 1, 3 H D], state [B, H, D, D]) ->
    (x', conv', state'); q, k, v as [B, H, 1, D] rows, so that the recurrence is matmuls."""

    CACHE, GROWS = ("conv", "state"), None      # its cache entries' names, and the axis that grows per token

    def __init__(self, layer: KDALayer, norm: nn.RMSNorm):
        super().__init__()
        H, D = layer.n_heads, layer.head_dim
        self.n_heads, self.head_dim, self.eps, self.o_eps = H, D, norm.eps, layer.o_norm.norm.eps
        w_in, w_fg, b_fg, neg_A, conv_w = layer.step_weights()
        self.norm, self.w_in, self.w_fg, self.b_fg = _weight(norm.weight), _weight(w_in.T), _weight(w_fg), _weight(b_fg)
        self.neg_A, self.conv_w = _weight(neg_A), _weight(conv_w)
        # kda's l2norm of q and k as RMSNorms (eps / D, weight 1 / sqrt(D)); q's also times kda's scale D^-1/2
        self.l2_eps = L2_EPS / D
        self.q_norm, self.k_norm = _weight(torch.full((D,), 1.0 / D)), _weight(torch.full((D,), D ** -0.5))
        self.o_norm, self.w_out = _weight(layer.o_norm.norm.weight), _weight(layer.o_proj.weight.T)

    def forward(self, x: torch.Tensor, conv: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        H, D = self.n_heads, self.head_dim
        qkv, fg, b = (rms_norm(x, self.norm, self.eps) @ self.w_in).split([3 * H * D, 2 * D, H], dim=-1)
        qkv, window = conv_step(conv, qkv, self.conv_w)
        q, k, v = qkv.view(-1, 3 * H, 1, D).split(H, dim=1)
        q, k = rms_norm(q, self.q_norm, self.l2_eps), rms_norm(k, self.k_norm, self.l2_eps)
        f, gate = (fg @ self.w_fg + self.b_fg).split(H * D, dim=-1)
        state = state * (self.neg_A * F.softplus(f)).exp().view(-1, H, D, 1)      # Diag(alpha) S
        u = (v - k @ state) * torch.sigmoid(b).view(-1, H, 1, 1)           # beta (v - S^T k)
        state = state + k.transpose(-1, -2) @ u                             # + k u^T
        o = rms_norm(q @ state, self.o_norm, self.o_eps) * torch.sigmoid(gate.view(-1, H, 1, D))
        return x + o.view(-1, H * D) @ self.w_out, window[:, 1:], state

    def example_cache(self, past: int) -> list[torch.Tensor]:
        """Its cache for batch 1, zeros (fixed sizes: `past` is the attention layers')."""
        H, D = self.n_heads, self.head_dim
        return [torch.zeros(1, self.conv_w.shape[0] - 1, 3 * H * D), torch.zeros(1, H, D, D)]


class AttentionStepGraph(nn.Module):
    """x + attention(RMSNorm(x)) for one token: (x [B, d], k, v [B, Hkv, past, D]) -> (x', k', v' one longer);
    each KV head's query heads as its rows (grouped-query attention without repeating the keys), the
    softmax scale folded into the query weights (RoPE is linear: it commutes with it)."""

    CACHE, GROWS = ("k", "v"), 2

    def __init__(self, layer: NoPEAttention, norm: nn.RMSNorm):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = layer.n_heads, layer.n_kv_heads, layer.head_dim
        self.eps = norm.eps
        self.encode_positions = layer.encode_positions                      # NoPE: none; RoPE: at the cache's length
        w_qkv = torch.cat([layer.q_proj.weight * layer.head_dim ** -0.5, layer.kv_proj.weight])
        self.norm, self.w_qkv, self.w_out = _weight(norm.weight), _weight(w_qkv.T), _weight(layer.o_proj.weight.T)

    def forward(self, x: torch.Tensor, k_past: torch.Tensor, v_past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = (rms_norm(x, self.norm, self.eps) @ self.w_qkv).view(-1, H + 2 * Hkv, 1, D)
        q, k, v = qkv.split([H, Hkv, Hkv], dim=1)
        q, k = self.encode_positions(q, k, k_past.shape[2])
        k, v = torch.cat([k_past, k], dim=2), torch.cat([v_past, v], dim=2)
        probs = torch.softmax(q.reshape(-1, Hkv, H // Hkv, D) @ k.transpose(-1, -2), dim=-1)
        return x + (probs @ v).view(-1, H * D) @ self.w_out, k, v

    def example_cache(self, past: int) -> list[torch.Tensor]:
        """Its keys and values for batch 1, zeros, `past` of each."""
        return [torch.zeros(1, self.n_kv_heads, past, self.head_dim)] * 2


class SwiGLUStepGraph(nn.Module):
    """x + SwiGLU(RMSNorm(x)) for one token: x [B, d] -> x'."""

    def __init__(self, mlp: SwiGLU, norm: nn.RMSNorm):
        super().__init__()
        self.eps, self.hidden = norm.eps, mlp.down.in_features
        self.norm, self.w_gate_up = _weight(norm.weight), _weight(mlp.gate_up.weight.T)
        self.w_down = _weight(mlp.down.weight.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (rms_norm(x, self.norm, self.eps) @ self.w_gate_up).split(self.hidden, dim=-1)
        return x + (F.silu(gate) * up) @ self.w_down


class StepGraph(nn.Module):
    """HatchlingLM's forward for one token: (input_ids [B, 1], *cache tensors in `grows` order) -> (logits
    [B, vocab], *new cache tensors), each block's cache its mixer's entries (its CACHE)."""

    def __init__(self, model: HatchlingLM):
        super().__init__()
        self.eps = model.norm.eps
        self.embed, self.norm = _weight(model.embed.weight), _weight(model.norm.weight)
        self.head = _weight(model.embed.weight.T)                           # tied to the embedding
        self.mixers = nn.ModuleList(AttentionStepGraph(b.mixer, b.mixer_norm) if b.kind == "attn" else
                                    KDAStepGraph(b.mixer, b.mixer_norm) for b in model.blocks)
        self.mlps = nn.ModuleList(SwiGLUStepGraph(b.mlp, b.mlp_norm) for b in model.blocks)
        # each cache entry's input name -> the axis that grows by one per token (None: fixed size)
        self.grows = {f"b{i}.{key}": mixer.GROWS for i, mixer in enumerate(self.mixers) for key in mixer.CACHE}

    def forward(self, input_ids: torch.Tensor, *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, new, start = F.embedding(input_ids[:, 0], self.embed), [], 0
        for mixer, mlp in zip(self.mixers, self.mlps, strict=True):
            x, *entries = mixer(x, *cache[start:start + len(mixer.CACHE)])
            x = mlp(x)
            new += entries
            start += len(mixer.CACHE)
        return rms_norm(x, self.norm, self.eps) @ self.head, *new

    def example_cache(self, past: int) -> list[torch.Tensor]:
        """A batch-1 cache, zeros, with `past` keys and values in each attention layer."""
        return [tensor for mixer in self.mixers for tensor in mixer.example_cache(past)]


def export_onnx(model: nn.Module, path: str | Path) -> Path:
    """Write the fp32 decode-step graph of `model` (arch hybrid or gpt, the switches off) to `path`."""
    if why := onnx_unsupported(model.config):
        raise ConfigError(why)
    model.eval()
    with torch.no_grad():
        graph = StepGraph(model)
    dynamic = {INPUT_IDS: {0: "batch"}, LOGITS: {0: "batch"}}
    for name, axis in graph.grows.items():
        dynamic[name] = {0: "batch"} | ({} if axis is None else {axis: "past"})
        dynamic[NEW + name] = {0: "batch"} | ({} if axis is None else {axis: "length"})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)                 # dynamo=False
        # a past of two tokens: the trace sees attention's concat with keys on both sides
        torch.onnx.export(graph, (torch.zeros(1, 1, dtype=torch.long), *graph.example_cache(past=2)), str(path),
                          dynamo=False, opset_version=OPSET, input_names=[INPUT_IDS, *graph.grows],
                          output_names=[LOGITS, *(NEW + name for name in graph.grows)], dynamic_axes=dynamic)
    return Path(path)


def quantize_onnx(source: str | Path, path: str | Path, block_size: int = QUANT_BLOCK) -> Path:
    """The int8 graph of an fp32 one at `path` (written whole or not at all), by two of onnxruntime's quantizers:
    the embedding ``Gather`` reads a uint8 table (its dynamic quantization: one scale and zero point for the
    table), then every weight MatMul becomes ``MatMulNBits`` with 8-bit weights, symmetric, a float scale per
    block of `block_size` inputs, and ``accuracy_level`` 4: the token's activations quantized to int8 per block
    on the fly and int8 dot products, the kernel onnxruntime writes for LLM decoding (its block quantizer's
    Gather takes 4 bits only). The process's root logger is left as it was (the block quantizer's module calls
    basicConfig(INFO) when first imported, and a warning logged to a root without handlers adds one), and
    the block quantizer's two INFO lines per MatMul are not emitted."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def restore_root() -> None:
        root.handlers[:] = handlers
        root.setLevel(level)

    try:
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits
        from onnxruntime.quantization import quantize_dynamic

        restore_root()                          # its module's basicConfig(INFO)
        log = logging.getLogger(nbits.__name__)
        log_level = log.level
        log.setLevel(logging.WARNING)
        try:
            with tempfile.TemporaryDirectory() as tmp, atomic_path(path) as out:
                embedding = Path(tmp) / "embedding.onnx"
                quantize_dynamic(str(source), str(embedding), op_types_to_quantize=["Gather"])
                config = nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                                            accuracy_level=4, bits=8, op_types_to_quantize=("MatMul",))
                quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(embedding)), algo_config=config)
                quantizer.process()
                quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
        finally:
            log.setLevel(log_level)
    finally:
        restore_root()                          # and the handler logging.warning adds to a root without one
    return Path(path)


def write_int8_onnx(model: nn.Module, path: str | Path) -> Path:
    """The int8 decode-step graph of `model` at `path` (its fp32 graph only passes through a temporary file)."""
    with tempfile.TemporaryDirectory() as tmp:
        return quantize_onnx(export_onnx(model, Path(tmp) / ONNX_FILE), path)
