"""The model's hyper-parameters: one pydantic schema, with named sizes as presets.

A preset (``size``) fills every field the caller did not set, so ``{"size": "xs", "n_layers": 6}``
is the xs model with six layers. Exact parameter counts per size are in the README.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SIZES: dict[str, dict] = {
    # Runs the whole pipeline on a 2-core CPU in minutes.
    "toddler": dict(d_model=128, n_layers=4, n_heads=2, head_dim=64, n_kv_heads=1, mlp_hidden=384),
    # ~40M parameters with a 32k vocabulary.
    "xs": dict(d_model=512, n_layers=8, n_heads=8, head_dim=64, n_kv_heads=2, mlp_hidden=1408),
    # ~100M parameters with a 32k vocabulary.
    "s": dict(d_model=768, n_layers=12, n_heads=12, head_dim=64, n_kv_heads=4, mlp_hidden=2048),
}


class ModelConfig(BaseModel):
    """Architecture: the hybrid LM (KDA blocks with a NoPE attention block every few layers), or
    BDH-GPU with ``arch: bdh`` (which uses d_model, n_layers, n_heads and the bdh_* fields)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    arch: Literal["hybrid", "bdh", "hope"] = Field(
        "hybrid", description="hybrid KDA + NoPE, BDH-GPU (model/bdh.py) or HOPE / Titans memory (model/titans.py)")
    size: Literal["toddler", "xs", "s"] = "toddler"
    vocab_size: int = Field(4096, ge=2, le=1 << 20, description="set from the tokenizer by pretrain")
    d_model: int = Field(128, ge=8)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(2, ge=1, description="heads of both the KDA and attention blocks")
    head_dim: int = Field(64, ge=4)
    n_kv_heads: int = Field(1, ge=1, description="grouped-query KV heads of the attention blocks")
    mlp_hidden: int = Field(384, ge=8, description="SwiGLU hidden width")
    attn_every: int = Field(4, ge=0, description="every N-th layer is NoPE attention; 0 = none")
    conv_size: int = Field(4, ge=1, description="causal depthwise conv kernel on q/k/v")
    chunk_size: int = Field(64, ge=1, description="KDA chunk length for the chunked kernel")
    kda_backend: Literal["auto", "fla", "chunked", "recurrent"] = "auto"
    bdh_neurons: int = Field(512, ge=2, description="BDH: neurons per head (the sparse space)")
    bdh_per_layer: bool = Field(True, description="BDH: each layer its own encoder/decoder (else shared)")
    rope_theta: float = Field(65536.0, gt=1, description="BDH: RoPE base over the neuron dimension")
    hope_hidden: int = Field(64, ge=2, description="HOPE: hidden width of each memory MLP")
    hope_levels: int = Field(1, ge=0, description="HOPE: continuum-memory levels after the Titans memory")
    hope_chunk: int = Field(16, ge=1, description="HOPE: tokens per memory update (level l: chunk * 4^l)")
    norm_eps: float = Field(1e-6, gt=0)
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _apply_size_preset(cls, data):
        if isinstance(data, dict):
            size = data.get("size", "toddler")
            if size in SIZES:
                data = {**SIZES[size], **data}
        return data

    @model_validator(mode="after")
    def _check_heads(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        return self

    def is_attention(self, layer: int) -> bool:
        """Layer pattern: with attn_every=4 the layers go KDA, KDA, KDA, attention, KDA, ..."""
        return self.attn_every > 0 and (layer + 1) % self.attn_every == 0

    def layer_kinds(self) -> list[str]:
        return ["attn" if self.is_attention(i) else "kda" for i in range(self.n_layers)]
