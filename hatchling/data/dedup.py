"""Exact and near-duplicate removal: content hashes, then MinHash + LSH with keep-first.

Work splits in two, so it scales past one machine:

1. ``signatures(shard)`` — per shard, independent: normalize, hash, shingle (word n-grams) and
   MinHash every document. Here shards run in a process pool; a Prefect task runner on Dask or
   Ray can map the same function over shards on many machines.
2. ``deduplicate(...)`` — one pass in a fixed order (shard order, then line order) over the
   signatures: exact duplicates by hash, near duplicates by LSH query + exact shingle Jaccard.
   The first document of a cluster is kept, so the result never depends on scheduling. This pass
   is serial, so its index is one plain dict of band keys (``BandIndex``, ~0.016 ms a document;
   the same banding as datasketch's ``MinHashLSH``, which took 0.15 ms). Its memory is ~18 dict
   entries per kept document: tens of millions of documents fit one machine.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash
from datasketch import MinHash, MinHashLSH

from hatchling.data.shard_map import map_ordered
from hatchling.data.textnorm import normalized_words
from hatchling.io import read_jsonl

SCHEME = "affine32"   # datasketch's permutation scheme for 32-bit inputs (our shingle hashes)


@dataclass
class ShardSignatures:
    """What dedup needs of one shard's documents, as a few arrays: cheap to send between processes
    (one shard's worth pickles as ~5 buffers, not two arrays and an object per document)."""

    shard: str
    doc_ids: list[str]
    exact: list[bytes]         # sha1 of each normalized text
    hashvalues: np.ndarray     # (docs, num_perm) MinHash signatures
    shingles: np.ndarray       # every document's sorted unique shingle hashes, concatenated
    offsets: np.ndarray        # document i's shingles are shingles[offsets[i]:offsets[i + 1]]

    def doc_shingles(self, i: int) -> np.ndarray:
        return self.shingles[self.offsets[i]:self.offsets[i + 1]]


@dataclass
class DedupResult:
    docs_in: int = 0
    keep: set[tuple[str, int]] = field(default_factory=set)   # (shard, line) of kept documents
    exact_dups: int = 0
    near_dups: int = 0
    clusters: dict[str, list[str]] = field(default_factory=dict)  # kept doc id -> its duplicates' ids


# odd multipliers by position: of a word in a shingle, of a value in an LSH band (both <= 1024, the config's bound)
_MIX = np.random.default_rng(20261123).integers(1, 2**63, size=1024, dtype=np.uint64) | np.uint64(1)
_word_hashes: dict[str, int] = {}


def shingle_hashes(words: list[str], n: int) -> np.ndarray:
    """Sorted unique 32-bit hashes of the word n-gram shingles of a text's normalized words.

    Each distinct word is hashed once (xxh64, cached per process); a shingle's hash mixes its n
    word hashes with fixed odd multipliers (position-dependent, so word order counts) in uint64
    arithmetic, vectorized over the document, and keeps the high 32 bits.
    """
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
    h = (h >> np.uint64(32)).astype(np.uint32)
    h.sort()
    return h[np.concatenate(([True], h[1:] != h[:-1]))]     # unique: cheaper than np.unique here


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / max(1, a.size + b.size - inter)


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutation parameters (a, b) for this num_perm and seed."""
    a, b = MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations
    return a[:, None], b[:, None]


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer: datasketch's pre-mix of every input hash in the affine32 scheme."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def minhash_signatures(hashed: list[np.ndarray], num_perm: int, seed: int = 1, block: int = 2048) -> np.ndarray:
    """MinHash signatures (docs, num_perm) of many shingle-hash sets at once, equal to datasketch's
    ``MinHash.bulk(..., hashfunc=int, scheme="affine32")`` (the reference; tests/test_dedup.py).

    datasketch applies its permutations one document at a time; here the shingles of a whole shard
    are concatenated and permuted in blocks of ~`block` shingles, and each document's minimum is a
    ``np.minimum.reduceat`` over its segment: ~4x faster on 300-word documents. An empty set keeps
    datasketch's initial value (all ones).
    """
    a, b = _permutations(num_perm, seed)
    out = np.full((len(hashed), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    rows = [i for i, h in enumerate(hashed) if h.size]
    start = 0
    while start < len(rows):
        stop, size = start, 0
        while stop < len(rows) and (size == 0 or size + hashed[rows[stop]].size <= block):
            size += hashed[rows[stop]].size
            stop += 1
        segments = [hashed[i] for i in rows[start:stop]]
        offsets = np.cumsum([0] + [h.size for h in segments[:-1]])
        permuted = np.multiply(a, _fmix32(np.concatenate(segments)))  # (num_perm, shingles), wraps mod 2^32
        permuted += b
        out[rows[start:stop]] = np.minimum.reduceat(permuted, offsets, axis=1).T
        start = stop
    return out


def signatures(shard: str | Path, shingle: int, num_perm: int, seed: int = 1, chunk: int = 128) -> ShardSignatures:
    """MinHash signatures of every document in one JSONL shard (datasketch's affine32 scheme).

    Documents stream through `chunk` at a time, so a worker holds the texts and word lists of one
    chunk, not of its whole shard (~20 KB of small strings per 300-word page: 30 MB for 1,500
    pages, growing with the shard), and its memory stays in the caches it shares with its
    neighbours. Each chunk is done step by step over all its documents, which keeps each step's
    setup off the per-document cost.
    """
    name = Path(shard).name
    doc_ids, exact, hashed = [], [], []
    for first, docs in _chunks(read_jsonl(shard), chunk):
        for i, doc in enumerate(docs, first):
            if not isinstance(doc.get("text"), str):
                raise ValueError(f"{shard}:{i + 1}: document has no text field")
        words = [normalized_words(d["text"]) for d in docs]
        doc_ids += [str(d["id"]) if "id" in d else f"{name}:{i}" for i, d in enumerate(docs, first)]
        exact += [hashlib.sha1(" ".join(w).encode()).digest() for w in words]
        hashed += [shingle_hashes(w, shingle) for w in words]
    return ShardSignatures(
        shard=str(shard), doc_ids=doc_ids, exact=exact, hashvalues=minhash_signatures(hashed, num_perm, seed),
        shingles=np.concatenate(hashed) if hashed else np.zeros(0, dtype=np.uint32),
        offsets=np.cumsum([0] + [h.size for h in hashed]))


def _chunks(items: Iterable, size: int) -> Iterator[tuple[int, list]]:
    """(index of the first, the next up to `size` items), over consecutive runs of `items`."""
    it = iter(items)
    first = 0
    while batch := list(itertools.islice(it, size)):
        yield first, batch
        first += len(batch)


def _signatures_of(args: tuple) -> ShardSignatures:
    return signatures(*args)


def iter_signatures(shards: list[Path], shingle: int, num_perm: int, workers: int, runner: str = "local",
                    address: str | None = None) -> Iterator[ShardSignatures]:
    """Signatures of all shards in shard order, computed by `workers` processes (or on a cluster:
    hatchling/data/shard_map.py). Locally they arrive shard by shard, so the ordered dedup pass
    consuming them overlaps with the workers still hashing."""
    args = [(str(s), shingle, num_perm) for s in shards]
    yield from map_ordered(_signatures_of, args, workers, runner, address)


def all_signatures(shards: list[Path], shingle: int, num_perm: int, workers: int) -> list[ShardSignatures]:
    return list(iter_signatures(shards, shingle, num_perm, workers))


@functools.lru_cache(maxsize=8)
def _banding(threshold: float, num_perm: int, weights: tuple[float, float]) -> tuple[int, int]:
    """datasketch MinHashLSH's (bands, rows) for these settings (it integrates to choose them: ~60 ms)."""
    reference = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=weights)
    return reference.b, reference.r


class BandIndex:
    """Banded LSH over MinHash signatures: two signatures are candidates when all `rows` values of
    any one of `bands` bands are equal.

    The (bands, rows) split is the one datasketch's ``MinHashLSH`` picks for the threshold and the
    false positive / false negative weights, and ``query`` returns the keys ``MinHashLSH.query``
    returns after the same inserts (the reference; tests/test_dedup.py), in insertion order. A
    band is keyed by a 64-bit hash of its values and its band number, computed for a whole shard in
    one numpy pass (two different bands share a key with probability ~2^-64; a shared key only
    proposes a candidate, which the caller verifies anyway).

    All bands live in one dict, whose value is a bucket: the one document holding that band key (an
    int: most buckets never get a second) or a list of them. A document that meets no earlier band,
    most of them, then costs one C-level set intersection and one ``dict.update`` instead of a
    Python loop over its bands: the serial pass that consumes the parallel workers' signatures
    stays small beside them (0.45 -> 0.19 s for 12,000 documents with one dict per band).
    """

    def __init__(self, threshold: float, num_perm: int, weights: tuple[float, float] = (0.5, 0.5)):
        self.bands, self.rows = _banding(threshold, num_perm, weights)
        self.table: dict[int, int | list[int]] = {}

    def band_keys(self, signatures: np.ndarray) -> list[list[int]]:
        """(docs, num_perm) signatures -> each document's `bands` band keys."""
        bands = signatures[:, : self.bands * self.rows].reshape(len(signatures), self.bands, self.rows)
        keys = np.arange(1, self.bands + 1, dtype=np.uint64) * _MIX[-1]   # the band number: bands never meet
        keys = np.broadcast_to(keys, bands.shape[:2]).copy()
        for j in range(self.rows):               # position-dependent odd multipliers, wrapping mod 2^64
            keys += bands[..., j].astype(np.uint64) * _MIX[j]
        return (keys ^ (keys >> np.uint64(29))).tolist()

    def query(self, bands: list[int]) -> tuple[list[int], set[int]]:
        """(candidate keys in insertion order, the band keys already present: pass them to insert)."""
        present = self.table.keys() & bands      # iterates over the few `bands`, in C
        if not present:
            return [], present
        found: set[int] = set()
        for band in present:
            bucket = self.table[band]
            found.update(bucket) if isinstance(bucket, list) else found.add(bucket)
        return sorted(found), present

    def insert(self, key: int, bands: list[int], present: set[int]) -> None:
        """Add `key` under its bands; `present` is what the query of the same bands just returned."""
        if not present:
            self.table.update(dict.fromkeys(bands, key))
            return
        for band in bands:
            if band not in present:
                self.table[band] = key
            elif isinstance(bucket := self.table[band], list):
                bucket.append(key)
            else:
                self.table[band] = [bucket, key]


def deduplicate(shards: Iterable[ShardSignatures], threshold: float, num_perm: int) -> DedupResult:
    """Keep-first exact and near-duplicate removal over documents in shard order, then line order.

    LSH proposes candidates from the MinHash signatures; a candidate is a duplicate when the exact
    Jaccard of the two shingle-hash sets reaches `threshold` (no estimation error at the border).
    """
    # LSH only proposes candidates: tune its bands for recall (a lower threshold, false negatives
    # weighted 4x), and let the exact Jaccard below decide, which restores precision.
    lsh = BandIndex(threshold=max(threshold - 0.1, 0.05), num_perm=num_perm, weights=(0.2, 0.8))
    seen_exact: dict[bytes, str] = {}
    kept: list[tuple[str, np.ndarray]] = []      # (doc id, shingles), in keep order = the LSH keys
    result = DedupResult()
    for sigs in shards:
        result.docs_in += len(sigs.doc_ids)
        for line, (doc_id, exact, bands) in enumerate(zip(sigs.doc_ids, sigs.exact, lsh.band_keys(sigs.hashvalues),
                                                          strict=True)):
            if exact in seen_exact:
                result.exact_dups += 1
                result.clusters.setdefault(seen_exact[exact], []).append(doc_id)
                continue
            shingles = sigs.doc_shingles(line)
            candidates, present = lsh.query(bands)  # earliest kept first: keep-first is deterministic
            match = next((c for c in candidates if exact_jaccard(kept[c][1], shingles) >= threshold), None)
            if match is not None:
                head = kept[match][0]
                result.near_dups += 1
                result.clusters.setdefault(head, []).append(doc_id)
                seen_exact.setdefault(exact, head)   # later exact copies of this one join the cluster
                continue
            lsh.insert(len(kept), bands, present)
            kept.append((doc_id, shingles))
            seen_exact[exact] = doc_id
            result.keep.add((sigs.shard, line))
    return result
