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


RESEARCH_SWITCHES = ("use_predictive_coding", "use_episodic_memory", "spike", "token_drop", "checkpoint_attention")


class ModelConfig(BaseModel):
    """Architecture: the hybrid LM (KDA blocks with a NoPE attention block every few layers),
    BDH-GPU with ``arch: bdh`` (which uses d_model, n_layers, n_heads and the bdh_* fields), HOPE
    with ``arch: hope``, or ``arch: gpt``: the same stack with RoPE attention in every layer, the
    same-size baseline the hybrid is measured against (bench/train_throughput.py, ablations)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    arch: Literal["hybrid", "bdh", "hope", "gpt"] = Field(
        "hybrid", description="hybrid KDA + NoPE, BDH-GPU (model/bdh.py), HOPE / Titans memory (model/titans.py) "
                              "or a GPT baseline (RoPE attention in every layer)")
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
    rope_theta: float = Field(65536.0, gt=1, description="RoPE base: BDH over the neuron dimension, GPT per head")
    bdh_window: int = Field(0, ge=0, description="BDH: attend to the last W tokens only; 0 = all")
    bdh_forget: bool = Field(False, description="BDH: forget-gated state, computed chunk by chunk")
    bdh_chunk: int = Field(64, ge=1, description="BDH: chunk length of the forget-gated attention")
    bdh_differential: bool = Field(False, description="BDH: differential attention over two neuron halves")
    hope_hidden: int = Field(64, ge=2, description="HOPE: hidden width of each memory MLP")
    hope_levels: int = Field(1, ge=0, description="HOPE: continuum-memory levels after the Titans memory")
    hope_chunk: int = Field(16, ge=1, description="HOPE: tokens per memory update (level l: chunk * 4^l)")
    # Research switches (hybrid only; all off = exactly the plain model). See docs/ablations.md.
    use_predictive_coding: bool = Field(False, description="next-state head; curiosity = its per-token error")
    predictive_weight: float = Field(0.1, ge=0, description="loss weight of the next-state prediction")
    use_episodic_memory: bool = Field(False, description="SQLite + FAISS memory read on uncertain tokens")
    memory_capacity: int = Field(4096, ge=1, description="entries kept; the oldest are evicted beyond it")
    memory_topk: int = Field(4, ge=1, description="entries read per uncertain token")
    memory_write_fraction: float = Field(0.02, gt=0, le=1, description="most surprising share of tokens written")
    memory_budget: float = Field(0.25, gt=0, le=1, description="share of tokens that may read before a penalty")
    memory_penalty: float = Field(1.0, ge=0, description="weight of the access-budget penalty")
    memory_path: str | None = Field(None, description="SQLite file of the memory; None = in memory until saved")
    spike: bool = Field(False, description="LIF neurons per KDA head gate the state update (Spike-KDA)")
    spike_threshold: float = Field(1.0, gt=0)
    spike_decay: float = Field(0.5, ge=0, lt=1, description="membrane leak per token")
    token_drop: float = Field(0.0, ge=0, lt=1, description="share of tokens mid-stack KDA blocks skip (ScTD-lite)")
    token_drop_weight: float = Field(0.01, ge=0, description="weight of the keep-rate loss of the routers")
    checkpoint_attention: bool = Field(False, description="recompute global-attention blocks in backward")
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
        if self.arch != "hybrid":
            on = [k for k in RESEARCH_SWITCHES if getattr(self, k)]
            if on:
                raise ValueError(f"{', '.join(on)} need arch 'hybrid' (got arch {self.arch!r})")
        return self

    def drops_tokens(self, layer: int) -> bool:
        """Token dropping applies to KDA blocks strictly inside the stack (never the first or last)."""
        return self.token_drop > 0 and 0 < layer < self.n_layers - 1 and not self.is_attention(layer)

    def is_attention(self, layer: int) -> bool:
        """Layer pattern: with attn_every=4 the layers go KDA, KDA, KDA, attention, KDA, ... (gpt: all attention)"""
        return self.arch == "gpt" or self.attn_every > 0 and (layer + 1) % self.attn_every == 0

    def layer_kinds(self) -> list[str]:
        return ["attn" if self.is_attention(i) else "kda" for i in range(self.n_layers)]
