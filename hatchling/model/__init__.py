"""The hybrid KDA + NoPE language model and its operators.

The model classes load on first use (PEP 562), so reading the config schema (every stage does,
through hatchling.config) does not import torch: the data stages start in a fraction of the time.
"""

from hatchling.model.config import SIZES, ModelConfig

__all__ = ["SIZES", "HatchlingLM", "ModelConfig", "build_model"]


def __getattr__(name: str):
    if name in ("HatchlingLM", "build_model"):
        from hatchling.model import hatchling

        return getattr(hatchling, name)
    raise AttributeError(f"module 'hatchling.model' has no attribute {name!r}")
