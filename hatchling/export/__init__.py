"""Exported artifacts: INT8 and bf16 checkpoints that load without the training code's state, and a
Hugging Face transformers directory (hf.py, its template hf_modeling.py)."""
