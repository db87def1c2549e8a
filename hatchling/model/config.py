"""The model's hyper-parameters: one pydantic schema, with named sizes as presets.

A preset (``size``) fills every field the caller did not set, so ``{"size": "xs", "n_layers": 6}``
is the xs model with six layers. Exact parameter counts per size are in the README.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer, model_validator

SIZES: dict[str, dict] = {
    # Runs the whole pipeline on a 2-core CPU in minutes.
    "toddler": dict(d_model=128, n_layers=4, n_heads=2, head_dim=64, n_kv_heads=1, mlp_hidden=384),
    # ~40M parameters with a 32k vocabulary.
    "xs": dict(d_model=512, n_layers=8, n_heads=8, head_dim=64, n_kv_heads=2, mlp_hidden=1408),
    # ~100M parameters with a 32k vocabulary.
    "s": dict(d_model=768, n_layers=12, n_heads=12, head_dim=64, n_kv_heads=4, mlp_hidden=2048),
}


RESEARCH_SWITCHES = ("use_predictive_coding", "use_episodic_memory", "spike", "token_drop", "checkpoint_attention")


class BDHOptions(BaseModel):
    """``model.bdh``: what only BDH-GPU reads (hatchling/model/bdh.py)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    neurons: int = Field(512, ge=2, description="neurons per head (the sparse space)")
    per_layer: bool = Field(True, description="each layer its own encoder/decoder (else one shared set)")
    window: int = Field(0, ge=0, description="attend to the last W tokens only; 0 = all")
    forget: bool = Field(False, description="forget-gated state, computed chunk by chunk")
    chunk: int = Field(64, ge=1, description="chunk length of the forget-gated attention")
    differential: bool = Field(False, description="differential attention over two neuron halves")

    @model_validator(mode="after")
    def _check(self):
        if self.neurons % (4 if self.differential else 2):
            raise ValueError(f"neurons must be even (RoPE rotates pairs; a multiple of 4 with differential), "
                             f"got {self.neurons}")
        if self.window and self.forget:
            raise ValueError("window and forget are alternatives: choose one")
        return self


class HOPEOptions(BaseModel):
    """``model.hope``: what only HOPE reads (hatchling/model/titans.py)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    hidden: int = Field(64, ge=2, description="hidden width of each memory MLP")
    levels: int = Field(1, ge=0, description="continuum-memory levels after the Titans memory")
    chunk: int = Field(16, ge=1, description="tokens per memory update (level l: chunk * 4^l)")


ARCH_OPTIONS = ("bdh", "hope")      # architectures with a section of their own, named as the arch


class ModelConfig(BaseModel):
    """Architecture: the hybrid LM (KDA blocks with a NoPE attention block every few layers),
    BDH-GPU with ``arch: bdh`` (which uses vocab_size, d_model, n_layers, n_heads, rope_theta,
    init_std and the ``bdh`` section), HOPE with ``arch: hope`` (its own options in ``hope``), or
    ``arch: gpt``: the same stack with RoPE attention in every layer, the same-size baseline the
    hybrid is measured against (bench/train_throughput.py, ablations). Setting another arch's
    section is an error."""

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
    rope_theta: float = Field(65536.0, gt=1, description="RoPE base: BDH over the neuron dimension, GPT per head")
    bdh: BDHOptions = Field(default_factory=BDHOptions, description="BDH's own options (set with arch bdh only)")
    hope: HOPEOptions = Field(default_factory=HOPEOptions, description="HOPE's own options (set with arch hope only)")
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

    @field_validator(*ARCH_OPTIONS)
    @classmethod
    def _own_arch_only(cls, value, info: ValidationInfo):
        """An arch's section may be set only with that arch (a default is never validated)."""
        arch = info.data.get("arch")
        if arch is not None and arch != info.field_name:
            raise ValueError(f"only arch {info.field_name!r} reads these options, and arch is {arch!r}")
        return value

    @model_serializer(mode="wrap")
    def _without_other_archs_options(self, handler):
        """A dump (params, checkpoint sidecars) shows only the options of its own arch, so it loads back."""
        return {k: v for k, v in handler(self).items() if k not in ARCH_OPTIONS or k == self.arch}

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
