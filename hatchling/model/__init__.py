"""The hybrid KDA + NoPE language model and its operators."""

from hatchling.model.config import SIZES, ModelConfig
from hatchling.model.hatchling import HatchlingLM, build_model

__all__ = ["SIZES", "HatchlingLM", "ModelConfig", "build_model"]
