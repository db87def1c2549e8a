"""What the probe bench (hatchling.eval.probe_bench) trains and for how long: its params, read by the
params schema (hatchling.config), so they import neither torch nor the bench itself."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

ARCHS = ("hybrid", "gpt", "bdh", "hope")
PROBES = ("mqar", "palindrome", "stack")
MQAR_PAIRS = 64           # MQAR's keys: at most this many key-value pairs, 8 tokens of sequence each
HEAD_DIM = 32             # every arch's heads


class ProbeBenchConfig(BaseModel):
    """What to train and for how long. The defaults are the pipeline's budget: about a minute on a
    2-core CPU (hybrid and gpt, MQAR at 32 and 128 tokens, 2 layers, 400 steps of ~1024 tokens)."""

    model_config = ConfigDict(extra="forbid")

    archs: list[str] = Field(default_factory=lambda: ["hybrid", "gpt"], min_length=1)
    probes: list[str] = Field(default_factory=lambda: ["mqar"], min_length=1)
    lengths: list[int] = Field(default_factory=lambda: [32, 128], min_length=1)
    steps: int = Field(400, ge=1, description="AdamW steps per model")
    batch_tokens: int = Field(1024, ge=16, description="tokens per step: batch_tokens // length sequences")
    batch_size: int | None = Field(None, ge=1, description="sequences per step at every length (overrides "
                                                            "batch_tokens)")
    d_model: int = Field(64, ge=32, description="a multiple of 32 (heads of 32 dims)")
    n_layers: int = Field(2, ge=1)
    attn_every: int = Field(2, ge=0, description="the hybrid's every N-th layer is attention (2 layers, 2: "
                                                  "KDA, attention); 0 = KDA only")
    lr: float = Field(1e-3, gt=0, description="peak; 3e-3 leaves gpt at the no-recall baseline")
    eval_items: int = Field(64, ge=1, description="held-out items per (probe, length)")
    seed: int = 0

    @field_validator("archs", "probes")
    @classmethod
    def _known(cls, names, info: ValidationInfo):
        known = ARCHS if info.field_name == "archs" else PROBES
        unknown = set(names) - set(known)
        if unknown:
            raise ValueError(f"unknown {info.field_name} {sorted(unknown)} (choose from {', '.join(known)})")
        return names

    @field_validator("lengths")
    @classmethod
    def _long_enough(cls, lengths):
        if min(lengths) < 16 or max(lengths) > 8 * MQAR_PAIRS:
            raise ValueError(f"lengths must be 16 to {8 * MQAR_PAIRS} tokens, got {min(lengths)}..{max(lengths)}")
        return lengths

    def batch(self, length: int) -> int:
        """Sequences per step at `length`."""
        return self.batch_size or max(1, self.batch_tokens // length)

    @field_validator("d_model")
    @classmethod
    def _whole_heads(cls, d_model):
        if d_model % HEAD_DIM:
            raise ValueError(f"d_model must be a multiple of {HEAD_DIM}, got {d_model}")
        return d_model
