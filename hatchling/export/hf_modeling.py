"""The Hugging Face side of the model: config, cache bridge and causal-LM class for transformers.

This module is the template of the exported ``modeling_hatchling.py``: :func:`hatchling.export.hf.modeling_source`
replaces its ``hatchling`` import with the project's own definitions it needs (the block, KDA and attention
layers, the KDA ops), so the exported file is self-contained and runs exactly the project's layer code.

Decoding uses transformers' cache: ``DynamicCache(config=...)`` builds a ``LinearAttentionLayer`` for each
KDA layer (three conv states: q, k and v; one recurrent state) and a ``DynamicLayer`` (keys, values) for
each attention layer; :class:`LayerCache` shows one of those as the per-layer dict the project's layers use.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from hatchling.model.hatchling import Block

#: transformers' cache layer type of each of the project's layer kinds
LAYER_TYPES = {"kda": "linear_attention", "attn": "full_attention"}


class HatchlingConfig(PreTrainedConfig):
    """The project's ``model`` section (hybrid or gpt arch); transformers' usual names map onto its own."""

    model_type = "hatchling"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "num_key_value_heads": "n_kv_heads", "intermediate_size": "mlp_hidden"}

    arch: str = "hybrid"                    # hybrid (KDA + NoPE attention) or gpt (RoPE attention in every layer)
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 2
    head_dim: int = 64
    n_kv_heads: int = 1
    mlp_hidden: int = 384
    attn_every: int = 4
    conv_size: int = 4
    chunk_size: int = 64
    kda_backend: str = "auto"
    rope_theta: float = 65536.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    spike: bool = False
    layer_types: list[str] | None = None    # per layer "linear_attention" (KDA) or "full_attention"
    number_of_conv_states: int = 3          # a KDA layer convolves q, k and v each with its own cached inputs
    use_cache: bool = True
    tie_word_embeddings: bool = True


#: the project's layers are annotated with its config class; in the exported file this one stands in for it
ModelConfig = HatchlingConfig


class LayerCache:
    """One layer of a transformers ``Cache`` seen as the dict the project's layers read and write:
    a KDA layer's ``q_conv``, ``k_conv``, ``v_conv`` (last conv inputs) and ``state`` (recurrent state),
    an attention layer's ``k`` and ``v`` (all cached keys and values)."""

    CONV = {"q_conv": 0, "k_conv": 1, "v_conv": 2}

    def __init__(self, layer):
        self.layer = layer

    def __contains__(self, key: str) -> bool:
        layer = self.layer
        if key in self.CONV:
            return layer.has_previous_state[self.CONV[key]]
        if key == "state":
            return layer.is_recurrent_states_initialized[0]
        return layer.is_initialized and layer.keys.numel() > 0

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self:
            raise KeyError(key)
        if key in self.CONV:
            return self.layer.conv_states[self.CONV[key]]
        if key == "state":
            return self.layer.recurrent_states[0]
        return self._kv(key)

    def get(self, key: str, default=None):
        return self[key] if key in self else default

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        layer = self.layer
        if key in self.CONV:
            i = self.CONV[key]
            if not layer.is_conv_states_initialized[i]:
                layer.lazy_initialization(conv_states=value, state_idx=i)
            layer.conv_states[i].copy_(value)
            layer.has_previous_state[i] = True
        elif key == "state":
            layer.update_recurrent_state(value)
        else:
            if not layer.is_initialized:
                layer.lazy_initialization(value, value)
            setattr(layer, self._kv_name(key), value)

    def _kv(self, key: str) -> torch.Tensor:
        return getattr(self.layer, self._kv_name(key))

    @staticmethod
    def _kv_name(key: str) -> str:
        names = {"k": "keys", "v": "values"}
        if key not in names:
            raise KeyError(key)
        return names[key]


class HatchlingPreTrainedModel(PreTrainedModel):
    config_class = HatchlingConfig
    base_model_prefix = "hatchling"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class HatchlingForCausalLM(HatchlingPreTrainedModel, GenerationMixin):
    """embedding -> blocks (KDA or attention mixer, SwiGLU) -> RMSNorm -> head tied to the embedding.

    Sequences must be unpadded (an all-ones ``attention_mask``): a left pad would enter the KDA state.
    """

    def __init__(self, config: HatchlingConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        kinds = {v: k for k, v in LAYER_TYPES.items()}
        self.blocks = nn.ModuleList(Block(config, kinds[t]) for t in config.layer_types)
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("HatchlingForCausalLM takes unpadded sequences only (attention_mask all ones): "
                             "run padded batches one sequence at a time")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, LayerCache(cache.layers[i]) if use_cache else None)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = F.linear(self.norm(x[:, keep]), self.embed.weight)
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels,
                                                              vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
