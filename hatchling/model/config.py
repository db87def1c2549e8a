"""The model's hyper-parameters: one pydantic schema, with named sizes as presets.

A preset (``size``) fills every field the caller did not set, so ``{"size": "xs", "n_layers": 6}``
is the xs model with six layers. Exact parameter counts per size are in the README. Each arch reads
the fields ARCH_FIELDS lists, and a config shows (dumps) only those.
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

_SHARED = ("arch", "size", "vocab_size", "d_model", "n_layers", "n_heads", "init_std")
_BLOCKS = ("head_dim", "n_kv_heads", "mlp_hidden", "norm_eps")      # GQA attention + SwiGLU (hatchling.py)

#: The fields each arch reads (its model, and the code around it: sizing, the HF export), the one record
#: of it. With an arch, any other field may be left out or set to its default only (else one
#: error per field, naming the archs that read it), keeps its default, and is left out of a dump (checkpoint
#: sidecars, MLflow params). tests/test_model.py checks that no other field changes the model an arch builds.
ARCH_FIELDS: dict[str, tuple[str, ...]] = {
    # KDA blocks (conv, chunked kernel, backend) with NoPE attention every attn_every layers; the switches
    "hybrid": (*_SHARED, *_BLOCKS, "attn_every", "conv_size", "chunk_size", "kda_backend",
               "use_predictive_coding", "predictive_weight", "use_episodic_memory", "memory_capacity", "memory_topk",
               "memory_write_fraction", "memory_budget", "memory_penalty", "memory_path", "spike", "spike_threshold",
               "spike_decay", "token_drop", "token_drop_weight", "checkpoint_attention"),
    # RoPE attention in every layer (so no KDA option, and every layer is one checkpoint_attention recomputes)
    "gpt": (*_SHARED, *_BLOCKS, "rope_theta", "checkpoint_attention"),
    # heads of bdh.neurons, RoPE over them, LayerNorms without eps or affine parameters: model/bdh.py
    "bdh": (*_SHARED, "rope_theta", "bdh"),
    # memory heads of head_dim, RMSNorms, no attention: model/titans.py
    "hope": (*_SHARED, "head_dim", "norm_eps", "hope"),
}


def for_arch(arch: str, cfg: dict) -> dict:
    """The model section `cfg` (a dict) switched to `arch`: its fields that arch reads, with arch set
    (e.g. a GPT as wide as a hybrid, without the hybrid's KDA options)."""
    return {k: v for k, v in {**cfg, "arch": arch}.items() if k in ARCH_FIELDS[arch]}


def _not_read(name: str, arch: str, default) -> str:
    readers = [a for a, fields in ARCH_FIELDS.items() if name in fields]
    return (f"{name} is read only by arch{'s' if len(readers) > 1 else ''} {', '.join(map(repr, readers))} "
            f"(arch is {arch!r}): leave it out" + ("" if isinstance(default, BaseModel) else
                                                   f" or at its default {default!r}"))


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


class ModelConfig(BaseModel):
    """Architecture: the hybrid LM (KDA blocks with a NoPE attention block every few layers),
    BDH-GPU with ``arch: bdh`` (its own options in the ``bdh`` section), HOPE with ``arch: hope``
    (its own in ``hope``), or ``arch: gpt``: the same stack with RoPE attention in every layer, the
    same-size baseline the hybrid is measured against (bench/train_throughput.py, ablations).

    Each arch reads the fields ARCH_FIELDS lists. Any other field set to a value other than its
    default is an error naming it (at its default it is accepted, so params.yaml's hybrid options
    at their defaults go with every arch); a dump shows the arch's own fields only, and loads back."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # arch and size come first: the check of every later field reads them
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
    chunk_size: int = Field(32, ge=1, description="KDA chunk length for the chunked kernel (fla's picks its own)")
    kda_backend: Literal["auto", "fla", "chunked", "recurrent"] = "auto"
    rope_theta: float = Field(65536.0, gt=1, description="RoPE base: BDH over the neuron dimension, GPT per head")
    bdh: BDHOptions = Field(default_factory=BDHOptions, description="BDH's own options (arch bdh only)")
    hope: HOPEOptions = Field(default_factory=HOPEOptions, description="HOPE's own options (arch hope only)")
    # Research switches (hybrid only; all off = exactly the plain model). See docs/ablations.md.
    use_predictive_coding: bool = Field(False, description="next-state head; curiosity = its per-token error")
    predictive_weight: float = Field(0.1, ge=0, description="loss weight of the next-state prediction")
    use_episodic_memory: bool = Field(False, description="SQLite + FAISS memory read on uncertain tokens")
    memory_capacity: int = Field(4096, ge=1, description="entries kept; the oldest are evicted beyond it")
    memory_topk: int = Field(4, ge=1, description="entries read per uncertain token")
    memory_write_fraction: float = Field(0.02, gt=0, le=1, description="most surprising share of tokens written")
    memory_budget: float = Field(0.25, gt=0, le=1, description="share of tokens that may read before a penalty")
    memory_penalty: float = Field(1.0, ge=0, description="weight of the access-budget penalty")
    memory_path: str | None = Field(None, description="SQLite file the training run mirrors its memory into, live "
                                                      "(readable while it trains; empty at its start); None = in "
                                                      "memory until saved. A loaded checkpoint never opens it")
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
        """The size's values of the fields the arch reads, under what the caller set."""
        if isinstance(data, dict):
            size, arch = data.get("size", "toddler"), data.get("arch", "hybrid")
            if isinstance(size, str) and size in SIZES:
                reads = ARCH_FIELDS.get(arch) if isinstance(arch, str) else None     # None: a bad arch, named later
                data = {**{k: v for k, v in SIZES[size].items() if reads is None or k in reads}, **data}
        return data

    @field_validator("*")
    @classmethod
    def _read_by_the_arch(cls, value, info: ValidationInfo):
        """A field the arch does not read may be given only at its default (or at the size preset's value:
        sidecars written before ARCH_FIELDS hold those); it keeps its default. A default is never validated."""
        arch = info.data.get("arch")
        if arch is None or info.field_name in ARCH_FIELDS[arch]:
            return value
        default = cls.model_fields[info.field_name].get_default(call_default_factory=True)
        if value != default and value != SIZES.get(info.data.get("size"), {}).get(info.field_name, default):
            raise ValueError(_not_read(info.field_name, arch, default))
        return default

    @model_serializer(mode="wrap")
    def _only_what_the_arch_reads(self, handler):
        """A dump (params, checkpoint sidecars) shows only the fields its arch reads, so it loads back."""
        return {k: v for k, v in handler(self).items() if k in ARCH_FIELDS[self.arch]}

    @model_validator(mode="after")
    def _check(self):
        reads = ARCH_FIELDS[self.arch]
        if "n_kv_heads" in reads and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.arch == "gpt" and self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for arch 'gpt' (RoPE rotates pairs)")
        defaults = {name: field.get_default(call_default_factory=True)      # other archs' fields: e.g. after
                    for name, field in type(self).model_fields.items() if name not in reads}   # `cfg.arch = "bdh"`
        set_elsewhere = [name for name, default in defaults.items() if getattr(self, name) != default]
        if set_elsewhere:
            raise ValueError("; ".join(_not_read(name, self.arch, defaults[name]) for name in set_elsewhere))
        return self

    def drops_tokens(self, layer: int) -> bool:
        """Token dropping applies to KDA blocks strictly inside the stack (never the first or last)."""
        return self.token_drop > 0 and 0 < layer < self.n_layers - 1 and not self.is_attention(layer)

    def is_attention(self, layer: int) -> bool:
        """Layer pattern: with attn_every=4 the layers go KDA, KDA, KDA, attention, KDA, ... (gpt: all attention)"""
        return self.arch == "gpt" or self.attn_every > 0 and (layer + 1) % self.attn_every == 0

    def layer_kinds(self) -> list[str]:
        return ["attn" if self.is_attention(i) else "kda" for i in range(self.n_layers)]
