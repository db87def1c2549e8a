"""Exported artifacts: INT8 and bf16 checkpoints that load without the training code's state."""
