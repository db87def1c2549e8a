"""Exact and near-duplicate removal: content hashes, then MinHash + LSH with keep-first.

Work splits in two, so it scales past one machine:

1. ``signatures(shard)`` — per shard, independent: normalize, hash, shingle (word n-grams) and
   MinHash every document. Here shards run in a process pool; a Prefect task runner on Dask or
   Ray can map the same function over shards on many machines.
2. ``deduplicate(...)`` — one pass in a fixed order (shard order, then line order) over the
   signatures: exact duplicates by hash, near duplicates by LSH query + signature Jaccard. The
   first document of a cluster is kept, so the result never depends on scheduling. For a
   cluster-wide index, datasketch's ``MinHashLSH(storage_config={"type": "redis", ...})`` keeps
   the buckets in Redis instead of memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash
from datasketch import LeanMinHash, MinHash, MinHashLSH

from hatchling.data.shard_map import map_ordered
from hatchling.data.textnorm import normalize
from hatchling.io import read_jsonl

SCHEME = "affine32"   # datasketch's permutation scheme; 32-bit inputs from xxh32


@dataclass
class DocSignature:
    shard: str
    line: int
    doc_id: str
    exact: str                 # sha1 of the normalized text
    hashvalues: np.ndarray     # MinHash signature
    shingles: np.ndarray       # sorted unique shingle hashes


@dataclass
class DedupResult:
    docs_in: int = 0
    keep: set[tuple[str, int]] = field(default_factory=set)   # (shard, line) of kept documents
    exact_dups: int = 0
    near_dups: int = 0
    clusters: dict[str, list[str]] = field(default_factory=dict)  # kept doc id -> its duplicates' ids


_MIX = np.random.default_rng(20261123).integers(1, 2**63, size=64, dtype=np.uint64) | np.uint64(1)
_word_hashes: dict[str, int] = {}


def shingle_hashes(normalized: str, n: int) -> np.ndarray:
    """Sorted unique 32-bit hashes of the word n-gram shingles of a normalized text.

    Each distinct word is hashed once (xxh64, cached per process); a shingle's hash mixes its n
    word hashes with fixed odd multipliers (position-dependent, so word order counts) in uint64
    arithmetic, vectorized over the document, and keeps the high 32 bits.
    """
    words = normalized.split()
    if not words:
        return np.zeros(0, dtype=np.uint32)
    cache = _word_hashes
    for w in set(words).difference(cache):
        cache[w] = xxhash.xxh64_intdigest(w.encode())
    wh = np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))
    m = min(n, len(words))                       # a text shorter than n words is one shingle
    h = np.zeros(len(words) - m + 1, dtype=np.uint64)
    for j in range(m):
        h += wh[j:j + len(h)] * _MIX[j]          # wraps mod 2^64 by design
    return np.unique((h >> np.uint64(32)).astype(np.uint32))


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / max(1, a.size + b.size - inter)


def signatures(shard: str | Path, shingle: int, num_perm: int, seed: int = 1) -> list[DocSignature]:
    """MinHash signatures of every document in one JSONL shard (vectorized permutations, xxh32 hashes)."""
    docs = list(read_jsonl(shard))
    for i, doc in enumerate(docs):
        if not isinstance(doc.get("text"), str):
            raise ValueError(f"{shard}:{i + 1}: document has no text field")
    normalized = [normalize(d["text"]) for d in docs]
    hashed = [shingle_hashes(t, shingle) for t in normalized]
    # each shingle is hashed once (xxh32); datasketch applies its vectorized permutations to those ints
    mhs = MinHash.bulk([h.tolist() for h in hashed], num_perm=num_perm, seed=seed, hashfunc=int, scheme=SCHEME)
    return [DocSignature(str(shard), i, str(d.get("id", f"{Path(shard).name}:{i}")),
                         hashlib.sha1(t.encode()).hexdigest(), m.hashvalues, h)
            for i, (d, t, h, m) in enumerate(zip(docs, normalized, hashed, mhs, strict=True))]


def _signatures_of(args: tuple) -> list[DocSignature]:
    return signatures(*args)


def iter_signatures(shards: list[Path], shingle: int, num_perm: int, workers: int, runner: str = "local",
                    address: str | None = None) -> Iterator[DocSignature]:
    """Signatures of all shards in shard order, computed by `workers` processes (or on a cluster:
    hatchling/data/shard_map.py). Locally they arrive shard by shard, so the ordered dedup pass
    consuming them overlaps with the workers still hashing."""
    args = [(str(s), shingle, num_perm) for s in shards]
    for shard_sigs in map_ordered(_signatures_of, args, workers, runner, address):
        yield from shard_sigs


def all_signatures(shards: list[Path], shingle: int, num_perm: int, workers: int) -> list[DocSignature]:
    return list(iter_signatures(shards, shingle, num_perm, workers))


def deduplicate(sigs: Iterable[DocSignature], threshold: float, num_perm: int) -> DedupResult:
    """Keep-first exact and near-duplicate removal over signatures in their given order.

    LSH proposes candidates from the MinHash signatures; a candidate is a duplicate when the exact
    Jaccard of the two shingle-hash sets reaches `threshold` (no estimation error at the border).
    """
    # LSH only proposes candidates: tune its bands for recall (a lower threshold, false negatives
    # weighted 4x), and let the signature Jaccard below decide, which restores precision.
    lsh = MinHashLSH(threshold=max(threshold - 0.1, 0.05), num_perm=num_perm, weights=(0.2, 0.8))
    seen_exact: dict[str, str] = {}
    kept: dict[str, np.ndarray] = {}
    result = DedupResult()
    for sig in sigs:
        result.docs_in += 1
        if sig.exact in seen_exact:
            result.exact_dups += 1
            result.clusters.setdefault(seen_exact[sig.exact], []).append(sig.doc_id)
            continue
        mh = LeanMinHash(seed=1, hashvalues=sig.hashvalues, scheme=SCHEME)   # no permutation tables: cheap
        candidates = sorted(lsh.query(mh), key=lambda key: int(key.split("\0")[0]))
        match = next((c for c in candidates if exact_jaccard(kept[c], sig.shingles) >= threshold), None)
        if match is not None:
            head = match.split("\0", 1)[1]
            result.near_dups += 1
            result.clusters.setdefault(head, []).append(sig.doc_id)
            seen_exact.setdefault(sig.exact, head)   # later exact copies of this one join the cluster
            continue
        key = f"{len(kept)}\0{sig.doc_id}"          # insertion order first: keep-first is deterministic
        lsh.insert(key, mh)
        kept[key] = sig.shingles
        seen_exact[sig.exact] = sig.doc_id
        result.keep.add((sig.shard, sig.line))
    return result
