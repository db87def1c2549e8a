"""Packed token files: all documents' tokens end to end, each followed by end-of-text.

``<split>.bin`` holds raw uint16 tokens (uint32 when the vocabulary does not fit) and
``meta.json`` the dtype, counts and the UTF-8 byte count of each split (for bits per byte).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hatchling.errors import InputError, MissingInputError


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


def read_meta(directory: str | Path) -> dict:
    """meta.json of a tokenized directory; clear errors for a missing or garbled one."""
    meta_path = Path(directory) / "meta.json"
    if not meta_path.is_file():
        raise MissingInputError(f"no tokenized data at {directory} (run the tokenize stage first)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{meta_path}: not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    return meta


CHECK_CHUNK = 1 << 24       # tokens per block when scanning a split for its largest id


def load_split(directory: str | Path, split: str) -> np.ndarray:
    """Memory-map one split of a tokenized directory, checked first: a file cut short, or one holding
    a token id outside the tokenizer's vocabulary (token files of another tokenizer), is refused by
    name. The scan reads the file once (about a second per GB)."""
    directory = Path(directory)
    meta = read_meta(directory)
    path = directory / f"{split}.bin"
    if not path.is_file():
        raise MissingInputError(f"no token file {path} (run the tokenize stage first)")
    dtype = np.dtype(meta["dtype"])
    size = path.stat().st_size
    expected = (meta.get(split) or {}).get("tokens")          # absent in hand-made token directories
    if expected is not None and size != expected * dtype.itemsize:
        raise InputError(f"{path}: {size} bytes, not the {expected} {dtype.name} tokens that "
                         f"{directory / 'meta.json'} records (truncated or replaced)")
    if size % dtype.itemsize:
        raise InputError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens (truncated)")
    tokens = np.memmap(path, dtype=dtype, mode="r") if size else np.empty(0, dtype=dtype)
    vocab = meta.get("vocab_size")
    if vocab is not None and tokens.size:
        top = max(int(tokens[i:i + CHECK_CHUNK].max()) for i in range(0, tokens.size, CHECK_CHUNK))
        if top >= vocab:
            raise InputError(f"{path}: token id {top} is outside the tokenizer's vocabulary of {vocab} "
                             f"({directory / 'meta.json'}): token files and tokenizer do not match")
    return tokens


def check_same_tokenizer(directory: str | Path, checkpoint: str | Path, tokenizer_sha256: str | None) -> None:
    """Refuse to score or train a checkpoint on token files made by another tokenizer: the sha256 its
    sidecar records against the one in the tokenized directory's meta.json (when both have one)."""
    ours = read_meta(directory).get("tokenizer_sha256")
    if ours and tokenizer_sha256 and ours != tokenizer_sha256:
        raise InputError(f"{checkpoint}: its tokenizer (sha256 {tokenizer_sha256}) is not the one of the token "
                         f"files in {directory} (sha256 {ours}): retokenize, or use a checkpoint trained on them")
