"""Baby-Hatchling: a tiny hybrid (KDA + NoPE attention) language model and its training pipeline."""

__version__ = "0.1.0"
