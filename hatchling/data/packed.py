"""Packed token files: all documents' tokens end to end, each followed by end-of-text.

``<split>.bin`` holds raw uint16 tokens (uint32 when the vocabulary does not fit) and
``meta.json`` the dtype, counts and the UTF-8 byte count of each split (for bits per byte).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hatchling.errors import MissingInputError


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def pack(token_lists: list[list[int]], eot_id: int, dtype) -> np.ndarray:
    total = sum(len(t) + 1 for t in token_lists)
    out = np.empty(total, dtype=dtype)
    pos = 0
    for toks in token_lists:
        out[pos:pos + len(toks)] = toks
        out[pos + len(toks)] = eot_id
        pos += len(toks) + 1
    return out


def load_split(directory: str | Path, split: str) -> np.ndarray:
    """Memory-map one split of a tokenized directory."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise MissingInputError(f"no tokenized data at {directory} (run the tokenize stage first)")
    meta = json.loads(meta_path.read_text())
    return np.memmap(directory / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
