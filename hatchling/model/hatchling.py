"""The hybrid language model: KDA blocks with a NoPE global-attention block every few layers.

embedding -> [pre-norm block: x + mixer(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] * n_layers
-> RMSNorm -> LM head tied to the embedding. The mixer is KDA or NoPE attention by layer.

Packed documents (forward's ``doc_starts``) reach every mixer as one :class:`Segments`: attention
masks per document, KDA's convolutions and state restart at each document (model/segments.py).

Decoding after a prefill runs :class:`Decoder` (``model.decoder``): the same stack one token at a
time through lean steps (KDAStep, AttentionStep, SwiGLUStep), with forward's cached path as its
reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hatchling.model.attention import AttentionStep, NoPEAttention, RoPEAttention, StaticAttentionStep
from hatchling.model.base import BlockStackLM
from hatchling.model.config import ModelConfig
from hatchling.model.int8 import Int8Linear
from hatchling.model.kda import StepWeight, folded_norm, unit
from hatchling.model.kda_layer import KDALayer, KDAStep, StaticKDAStep
from hatchling.model.memory import EpisodicMemory
from hatchling.model.predictive import NextStateHead
from hatchling.model.segments import Segments
from hatchling.model.spike import LIFGate
from hatchling.model.token_drop import TokenRouter


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class SwiGLUStep:
    """x + SwiGLU(norm(x)) for one token: the norm folded into the first matmul, the second fused
    with the residual add (a decoding step, as KDAStep and AttentionStep)."""

    def __init__(self, mlp: SwiGLU, norm: nn.RMSNorm, parts: int | None = None):
        w_gate_up, self.root_eps = folded_norm(norm, mlp.gate_up.weight)
        self.w_gate_up, self.w_down = StepWeight(w_gate_up, parts), StepWeight(mlp.down.weight.T.contiguous(), parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(unit(x, self.root_eps)).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up, x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str, drops_tokens: bool = False):
        super().__init__()
        self.kind = kind
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        attention = RoPEAttention if cfg.arch == "gpt" else NoPEAttention
        self.mixer = attention(cfg) if kind == "attn" else KDALayer(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)
        self.router = TokenRouter(cfg.d_model, cfg.token_drop, cfg.token_drop_weight) if drops_tokens else None

    def forward(self, x: torch.Tensor, cache: dict | None = None, segments: Segments | None = None) -> torch.Tensor:
        if self.router is not None:
            return self.router(x, self.transform, cache, segments)
        return self.transform(x, cache, segments)

    def transform(self, x: torch.Tensor, cache: dict | None = None, segments: Segments | None = None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), cache, segments)
        return x + self.mlp(self.mlp_norm(x))


class HatchlingLM(BlockStackLM):
    """Decoding cache per block: KDA layers keep conv + recurrent state, attention its KV.

    The research switches (docs/ablations.md) add modules only when on, so with all of them off
    this is exactly the plain model: same parameters, same outputs.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, kind, cfg.drops_tokens(i)) for i, kind in enumerate(cfg.layer_kinds()))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.predictor = NextStateHead(cfg.d_model, cfg.predictive_weight, cfg.norm_eps) \
            if cfg.use_predictive_coding else None
        self.memory = EpisodicMemory(cfg.d_model, cfg.memory_capacity, cfg.memory_topk, cfg.memory_write_fraction,
                                     cfg.memory_budget, cfg.memory_penalty, cfg.memory_path) \
            if cfg.use_episodic_memory else None
        self.apply(self._init_weights)
        for module in self.modules():          # routers, spike drives, memory access keep their own init
            if isinstance(module, (TokenRouter, LIFGate)):
                module.reset_parameters()
        if self.memory is not None:
            nn.init.constant_(self.memory.access.bias, 0.5)
        # Residual-branch outputs shrink with depth (GPT-2) so the stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down.weight")):
                nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def new_cache(self) -> list[dict]:
        return super().new_cache() + ([{}] if self.memory is not None else [])      # last: the memory's

    def forward(self, input_ids: torch.Tensor, cache: list[dict] | None = None,
                doc_starts: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]; auxiliary losses of this pass in aux_losses().
        doc_starts [B, T] bool (no cache): packed documents begin there, and none sees another."""
        segments = None
        if doc_starts is not None:
            if cache is not None or self.packing_unsupported():
                raise ValueError(self.packing_unsupported() or "doc_starts: packed documents are for training "
                                 "passes, not for decoding with a cache")
            segments = Segments.from_starts(doc_starts)
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            if block.kind == "attn" and self.config.checkpoint_attention and self.training and cache is None:
                x = checkpoint(block, x, None, segments, use_reentrant=False)
            else:
                x = block(x, None if cache is None else cache[i], segments)
        if self.predictor is not None:
            self.predictor.observe(x, segments)
        logits = F.linear(self.norm(x), self.embed.weight)
        if self.memory is None:
            return logits
        x = self.memory(x, input_ids, logits.detach(), self.embed.weight, None if cache is None else cache[-1])
        return F.linear(self.norm(x), self.embed.weight)

    def decoder(self, cache: list[dict], batch: int, max_len: int, compiled: bool = False) -> Decoder | None:
        """One-token steps continuing `cache` (a prefill's, ``self(ids, cache)``, of `batch` rows) for up
        to `max_len` positions in all (`compiled`: see Decoder), or None where only forward decodes
        (see step_path_unsupported)."""
        return None if self.step_path_unsupported() else Decoder(self, cache, batch, max_len, compiled)

    def step_path_unsupported(self) -> str | None:
        """Why decoding cannot take the step path (None: it can): a research switch on, INT8 Linears
        (model/int8.py), or weights that are not float32 / float64."""
        switches = {"spike": self.config.spike, "token_drop": any(b.router is not None for b in self.blocks),
                    "use_predictive_coding": self.predictor is not None, "use_episodic_memory": self.memory is not None}
        if on := [name for name, value in switches.items() if value]:
            return f"the research switch {', '.join(on)} is on (it decodes through forward)"
        if any(isinstance(m, Int8Linear) for m in self.modules()):
            return "its Linears are INT8 (model/int8.py; --compute int8)"
        if self.embed.weight.dtype not in (torch.float32, torch.float64):
            return f"its weights are {self.embed.weight.dtype} (the step path takes float32 or float64)"
        return None

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """The switches' training losses of the last forward pass (predictive, memory budget, router)."""
        losses: dict[str, torch.Tensor] = {}
        for module in self.modules():
            for name, value in getattr(module, "last_aux", {}).items():
                losses[name] = losses[name] + value if name in losses else value
        return losses

    def pass_stats(self) -> dict[str, float]:
        """Per-pass statistics of the switches (spike rate, skipped heads, kept tokens, memory use),
        averaged over the layers that report them."""
        sums: dict[str, list[float]] = {}
        for module in self.modules():
            for name, value in getattr(module, "last_stats", {}).items():
                sums.setdefault(name, []).append(value)
        return {name: sum(v) / len(v) for name, v in sums.items()}

    def curiosity(self) -> torch.Tensor | None:
        """The predictive-coding head's per-token curiosity (None when that switch is off)."""
        return None if self.predictor is None else self.predictor.curiosity

    def packing_unsupported(self) -> str | None:
        """Spike-KDA cannot keep packed documents apart; every other block here can."""
        return "spike-KDA's LIF membranes run across packed documents" if self.config.spike else None

    def set_train_step(self, step: int) -> None:
        if self.memory is not None:
            self.memory.step = step                 # recorded with each entry

    def no_weight_decay(self) -> set[str]:
        """Also the KDA layers' decay rates (KDALayer.NO_WEIGHT_DECAY), whatever their shape."""
        return super().no_weight_decay() | {f"{name}.{p}" for name, m in self.named_modules()
                                            if isinstance(m, KDALayer) for p in KDALayer.NO_WEIGHT_DECAY}

    def save_state_files(self, directory) -> None:
        """The episodic memory's store, beside the weights."""
        if self.memory is not None:
            self.memory.store.save(directory)

    def load_state_files(self, directory) -> None:
        if self.memory is not None:
            self.memory.store.load(directory)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class Decoder:
    """HatchlingLM's forward for one token at a time after a prefill: ids [B] -> next-token logits
    [B, vocab], continuing the cache (``model(ids[:, None], cache)[:, -1]`` is the reference;
    tests/test_decode.py checks they agree). Each block is two steps, x + mixer(norm(x)) then
    x + mlp(norm(x)) (KDAStep or AttentionStep, SwiGLUStep). Built by ``model.decoder``; it copies
    what it needs of the cache, which stays as it was.

    `compiled`: the whole step as one graph of torch.compile (inductor: C++ kernels, so a C++
    compiler at run time), from the steps' fixed-shape forms (StaticKDAStep, StaticAttentionStep),
    with KV caches of the next power of two >= max_len (at least 256 slots): one graph per (model
    shapes, batch, that size) in a process, compiled in seconds; each step then runs fused
    elementwise kernels between the matmuls instead of ~130 eager ops (bench/decode.py)."""

    @torch.no_grad()
    def __init__(self, model: HatchlingLM, cache: list[dict], batch: int, max_len: int, compiled: bool = False):
        self.embed = model.embed.weight
        # compiled: the weights in one block each (inductor runs a batched matmul of one row as its own
        # loop, slower than MKL's matmul); eager: StepWeight's default for the machine (kda.step_weight_parts)
        parts = 1 if compiled else None
        head, self.root_eps = folded_norm(model.norm, model.embed.weight)
        self.head = StepWeight(head, parts)
        kda, attention = (StaticKDAStep, StaticAttentionStep) if compiled else (KDAStep, AttentionStep)
        # compiled: few distinct KV sizes, so that the prompts of a process share few graphs (torch.compile
        # fails, with fullgraph, past its limit of recompiles: 8 by default)
        kv_len = max(256, 1 << (max_len - 1).bit_length()) if compiled else max_len
        self.steps = []
        for block, c in zip(model.blocks, cache, strict=True):
            mixer = attention(block.mixer, block.mixer_norm, c, batch, kv_len, parts) if block.kind == "attn" \
                else kda(block.mixer, block.mixer_norm, c, batch, parts)
            self.steps += [mixer, SwiGLUStep(block.mlp, block.mlp_norm, parts)]
        # steps left before max_len (the prefill's length: its keys'); without attention, no end
        self.max_len = max_len
        self.left = min((max_len - s.pos for s in self.steps if isinstance(s, AttentionStep)), default=None)
        self.forward = torch.compile(self.step, fullgraph=True, dynamic=False) if compiled else self.step

    def weights(self) -> list[StepWeight]:
        """Every weight a step reads, in the order it reads them (bench/decode.py times them alone, back to back:
        the least a step can cost on the machine, with everything between the matmuls free)."""
        return [w for step in self.steps for w in vars(step).values() if isinstance(w, StepWeight)] + [self.head]

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        for branch in self.steps:
            x = branch(x)
        return self.head(unit(x, self.root_eps))

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.left is not None:
            if self.left == 0:
                raise ValueError(f"Decoder: it was built for {self.max_len} positions (prompt and steps), all taken")
            self.left -= 1
        return self.forward(ids)


def build_model(model_params: dict | ModelConfig) -> nn.Module:
    """The model for a params.yaml ``model`` section (a dict) or a ModelConfig, by ``arch``
    (hybrid and gpt are both HatchlingLM: gpt's layers are all RoPE attention)."""
    cfg = model_params if isinstance(model_params, ModelConfig) else ModelConfig(**model_params)
    if cfg.arch == "bdh":
        from hatchling.model.bdh import BDHLM

        return BDHLM(cfg)
    if cfg.arch == "hope":
        from hatchling.model.titans import HOPELM

        return HOPELM(cfg)
    return HatchlingLM(cfg)
