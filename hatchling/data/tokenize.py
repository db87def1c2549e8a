"""Stage `tokenize`: train the BPE on the training documents and pack train/val token files.

The split is by document (a document's hash decides, so adding documents never moves old ones)
and the tokenizer sees only training documents, so validation text is never leaked into merges.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from tokenizers import Tokenizer

from hatchling.data.corpus import iter_documents
from hatchling.data.packed import pack, token_dtype
from hatchling.data.shard_map import map_ordered
from hatchling.data.tokenizer import EOT, TOKENIZER, literal_specials, train_tokenizer
from hatchling.errors import InputError
from hatchling.io import atomic_path, file_sha256


def is_validation(doc_key: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{doc_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_documents(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    train, val = [], []
    for text in texts:
        (val if is_validation(hashlib.sha1(text.encode()).hexdigest(), fraction, seed) else train).append(text)
    if not val or not train:                         # tiny corpora: still one document on each side
        if len(texts) < 2:
            raise InputError(f"need at least 2 documents to split train/val, got {len(texts)}")
        train, val = texts[:-1], texts[-1:]
    return train, val


BATCH_DOCS = 256          # documents per task when encoding on a cluster


def _encode_batch(args: tuple[str, list[str]]) -> list[list[int]]:
    """(tokenizer JSON, documents) -> token ids per document: one cluster task."""
    tokenizer_json, docs = args
    return [e.ids for e in literal_specials(Tokenizer.from_str(tokenizer_json)).encode_batch(docs)]


def encode_documents(tok: Tokenizer, docs: list[str], scale, workers: int) -> list[list[int]]:
    """Token ids per document: here (the tokenizer's own threads), or batches mapped on a cluster."""
    if scale.runner == "local":
        return [e.ids for e in tok.encode_batch(docs)]
    spec = tok.to_str()
    batches = [(spec, docs[i:i + BATCH_DOCS]) for i in range(0, len(docs), BATCH_DOCS)]
    return [ids for part in map_ordered(_encode_batch, batches, workers, scale.runner, scale.address)
            for ids in part]


def run(ctx) -> dict:
    p = ctx.params.tokenize
    t0 = time.perf_counter()
    texts = [d["text"] for d in iter_documents(ctx.inputs.dedup) if d["text"].strip()]
    train, val = split_documents(texts, p.val_fraction, p.seed)
    tok = train_tokenizer(train, p.vocab_size, p.min_frequency)
    eot = tok.token_to_id(EOT)
    dtype = token_dtype(tok.get_vocab_size())
    meta = {"dtype": dtype.__name__, "vocab_size": tok.get_vocab_size(), "eot_id": eot}
    with atomic_path(ctx.outputs.tokenized) as tmp:
        tmp.mkdir()
        tok.save(str(tmp / TOKENIZER))
        meta["tokenizer_sha256"] = file_sha256(tmp / TOKENIZER)
        for split, docs in (("train", train), ("val", val)):
            ids = pack(encode_documents(tok, docs, p.scale, p.workers or os.cpu_count() or 1), eot, dtype)
            ids.tofile(tmp / f"{split}.bin")
            meta[split] = {"documents": len(docs), "tokens": int(ids.size),
                           "bytes": sum(len(d.encode("utf-8")) for d in docs)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    return {"vocab_size": meta["vocab_size"], "documents": len(texts),
            "train_tokens": meta["train"]["tokens"], "val_tokens": meta["val"]["tokens"],
            "bytes_per_token": round((meta["train"]["bytes"] + meta["val"]["bytes"]) / tokens, 4),
            "seconds": round(time.perf_counter() - t0, 3)}
