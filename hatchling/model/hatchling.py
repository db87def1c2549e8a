"""The hybrid language model: KDA blocks with a NoPE global-attention block every few layers.

embedding -> [pre-norm block: x + mixer(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] * n_layers
-> RMSNorm -> LM head tied to the embedding. The mixer is KDA or NoPE attention by layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hatchling.model.attention import NoPEAttention
from hatchling.model.base import BlockStackLM
from hatchling.model.config import ModelConfig
from hatchling.model.kda_layer import KDALayer


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = NoPEAttention(cfg) if kind == "attn" else KDALayer(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


class HatchlingLM(BlockStackLM):
    """Decoding cache per block: KDA layers keep conv + recurrent state, attention its KV."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in cfg.layer_kinds())
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.apply(self._init_weights)
        # Residual-branch outputs shrink with depth (GPT-2) so the stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down.weight")):
                nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def build_model(model_params: dict | ModelConfig) -> nn.Module:
    """The model for a params.yaml ``model`` section (a dict) or a ModelConfig, by ``arch``."""
    cfg = model_params if isinstance(model_params, ModelConfig) else ModelConfig(**model_params)
    if cfg.arch == "bdh":
        from hatchling.model.bdh import BDHLM

        return BDHLM(cfg)
    if cfg.arch == "hope":
        from hatchling.model.titans import HOPELM

        return HOPELM(cfg)
    return HatchlingLM(cfg)
