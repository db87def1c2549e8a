"""Exact and near-duplicate removal: content hashes, then MinHash + LSH with keep-first.

Work splits in two, so it scales past one machine:

1. ``signatures(shard)`` — per shard, independent: normalize, hash, shingle (word n-grams) and
   MinHash every document (and, given a contamination index, check it on the same words). Here
   shards run in a process pool; a Prefect task runner on Dask or Ray can map the same function
   over shards on many machines.
2. ``deduplicate(...)`` — one pass in a fixed order (shard order, then line order) over the
   signatures: exact duplicates by hash, near duplicates by LSH query + exact shingle Jaccard.
   The first document of a cluster is kept, so the result never depends on scheduling. This pass
   is serial, so it works a shard at a time in numpy (``BandIndex``: sorted runs of band keys,
   the same banding as datasketch's ``MinHashLSH``), ~0.009 ms a document where MinHashLSH took
   0.15 ms. The index holds 18 band keys of 16 bytes per document, the pass also every document's
   shingle hashes (~1.2 KB for 300 words): tens of millions of documents fit one machine.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH

from hatchling.data.corpus import read_documents
from hatchling.data.decontam import ContaminationIndex, Hit, read_index, word_hashes
from hatchling.data.shard_map import map_ordered
from hatchling.data.textnorm import normalized_words

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
    hits: dict[int, list[Hit]] = field(default_factory=dict)   # line -> eval items found there (when scanned)

    def doc_shingles(self, i: int) -> np.ndarray:
        return self.shingles[self.offsets[i]:self.offsets[i + 1]]


@dataclass
class DedupResult:
    docs_in: int = 0
    removed: set[tuple[str, int]] = field(default_factory=set)   # (shard, line) of removed duplicates
    exact_dups: int = 0
    near_dups: int = 0
    clusters: dict[str, list[str]] = field(default_factory=dict)  # kept doc id -> its duplicates' ids

    def kept(self, shard: str, line: int) -> bool:
        return (shard, line) not in self.removed


# odd multipliers by position: of a word in a shingle, of a value in an LSH band (both <= 1024, the config's bound)
_MIX = np.random.default_rng(20261123).integers(1, 2**63, size=1024, dtype=np.uint64) | np.uint64(1)


def hashed_shingles(wh: np.ndarray, n: int) -> np.ndarray:
    """Sorted unique 32-bit hashes of the word n-gram shingles of a text, from its normalized words'
    xxh64 hashes (``decontam.word_hashes``, which the contamination check reads too): a shingle's hash
    mixes its n word hashes with fixed odd multipliers (position-dependent, so word order counts) in
    uint64 arithmetic, vectorized over the document, and keeps the high 32 bits.
    """
    if not len(wh):
        return np.zeros(0, dtype=np.uint32)
    m = min(n, len(wh))                          # a text shorter than n words is one shingle
    h = np.zeros(len(wh) - m + 1, dtype=np.uint64)
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


def minhash_signatures(hashed: list[np.ndarray], num_perm: int, seed: int = 1, block: int = 8192) -> np.ndarray:
    """MinHash signatures (docs, num_perm) of many shingle-hash sets at once, equal to datasketch's
    ``MinHash.bulk(..., hashfunc=int, scheme="affine32")`` (the reference; tests/test_dedup.py).

    datasketch applies its permutations one document at a time; here the shingles of a whole shard
    are concatenated and permuted in blocks of ~`block` shingles, and each document's minimum is a
    ``np.minimum.reduceat`` over its segment. The blocks are permuted in one buffer allocated per call:
    a fresh (num_perm, block) array per block was returned to the OS and page-faulted in again each
    time, and numpy's multiply and add ran ~3x slower per element on 2048-wide blocks than on 8192-wide
    ones (docs/benchmarks.md). An empty set keeps datasketch's initial value (all ones).
    """
    a, b = _permutations(num_perm, seed)
    out = np.full((len(hashed), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    rows = [i for i, h in enumerate(hashed) if h.size]
    buffer = np.empty((num_perm, max([min(block, sum(h.size for h in hashed))] + [h.size for h in hashed])),
                      dtype=np.uint32)
    start = 0
    while start < len(rows):
        stop, size = start, 0
        while stop < len(rows) and (size == 0 or size + hashed[rows[stop]].size <= block):
            size += hashed[rows[stop]].size
            stop += 1
        segments = [hashed[i] for i in rows[start:stop]]
        offsets = np.cumsum([0] + [h.size for h in segments[:-1]])
        permuted = np.multiply(a, _fmix32(np.concatenate(segments)), out=buffer[:, :size])   # wraps mod 2^32
        permuted += b
        out[rows[start:stop]] = np.minimum.reduceat(permuted, offsets, axis=1).T
        start = stop
    return out


_indexes: dict[str, ContaminationIndex] = {}     # index key -> index: what workers scan with (``shared_index``)


@contextlib.contextmanager
def shared_index(index: ContaminationIndex, key: str, path: str | Path) -> Iterator[tuple[str, str]]:
    """Within the block, `index` is the one ``signatures(..., scan=(key, path))`` scans with: forked
    workers inherit it from this process; any other process reads it once from `path`, the index
    cached under `key` (decontam.cached_index). Released after the block (a long-lived process
    running the stage again holds one index, not one per run)."""
    _indexes[key] = index
    try:
        yield key, str(path)
    finally:
        _indexes.pop(key, None)


def _shared_index(scan: tuple[str, str]) -> ContaminationIndex:
    key, path = scan
    if key not in _indexes:
        _indexes[key] = read_index(Path(path), key)
    return _indexes[key]


def signatures(shard: str | Path, shingle: int, num_perm: int, seed: int = 1, chunk: int = 128,
               scan: tuple[str, str] | None = None) -> ShardSignatures:
    """MinHash signatures of every document in one corpus file, a JSONL shard or a .txt document
    (datasketch's affine32 scheme), and with `scan` (from ``shared_index``) the eval items found in each
    document: the contamination check runs here, in the worker, on the words just normalized and hashed
    for the signatures.

    Documents stream through `chunk` at a time, so a worker holds the texts and word lists of one
    chunk, not of its whole shard (~20 KB of small strings per 300-word page: a 1,500-page shard
    peaked at 39 MB, now 7.6 MB, at the same speed).
    """
    name = Path(shard).name
    index = _shared_index(scan) if scan else None
    doc_ids, exact, hashed, hits = [], [], [], {}
    for first, docs in _chunks(read_documents(shard), chunk):
        words = [normalized_words(d["text"]) for d in docs]
        doc_ids += [str(d["id"]) if "id" in d else f"{name}:{i}" for i, d in enumerate(docs, first)]
        exact += [hashlib.sha1(" ".join(w).encode()).digest() for w in words]
        wh = [word_hashes(w) for w in words]
        hashed += [hashed_shingles(h, shingle) for h in wh]
        if index is not None:
            found = index.scan_batch([d["text"] for d in docs], words, wh)
            hits.update((line, h) for line, h in enumerate(found, first) if h)
    return ShardSignatures(
        shard=str(shard), doc_ids=doc_ids, exact=exact, hashvalues=minhash_signatures(hashed, num_perm, seed),
        shingles=np.concatenate(hashed) if hashed else np.zeros(0, dtype=np.uint32),
        offsets=np.cumsum([0] + [h.size for h in hashed]), hits=hits)


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
                    address: str | None = None, scan: tuple[str, str] | None = None) -> Iterator[ShardSignatures]:
    """Signatures of all shards in shard order, computed by `workers` processes (or on a cluster:
    hatchling/data/shard_map.py), with the contamination hits when `scan` is given (``signatures``).
    Locally they arrive shard by shard, so the ordered dedup pass consuming them overlaps with the
    workers still hashing."""
    args = [(str(s), shingle, num_perm, 1, 128, scan) if scan else (str(s), shingle, num_perm) for s in shards]
    yield from map_ordered(_signatures_of, args, workers, runner, address)


@functools.lru_cache(maxsize=8)
def _banding(threshold: float, num_perm: int, weights: tuple[float, float]) -> tuple[int, int]:
    """datasketch MinHashLSH's (bands, rows) for these settings (it integrates to choose them: ~60 ms)."""
    reference = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=weights)
    return reference.b, reference.r


class BandIndex:
    """Banded LSH over MinHash signatures: two signatures are candidates when all `rows` values of
    any one of `bands` bands are equal.

    The (bands, rows) split is the one datasketch's ``MinHashLSH`` picks for the threshold and the
    false positive / false negative weights, and ``matches`` returns the documents
    ``MinHashLSH.query`` returns after the same inserts (the reference; tests/test_dedup.py). A band
    is keyed by a 64-bit hash of its values and its band number (two different bands share a key
    with probability ~2^-64; a shared key only proposes a candidate, which the caller verifies).

    Documents are added a shard at a time, and the index is a few sorted numpy runs of (band key,
    document ordinal), merged like an LSM tree (a new run absorbs the last one while that is not
    more than twice its size, so there are O(log n) runs and each key is re-sorted O(log n) times).
    A shard's lookups are two ``searchsorted`` per run: no Python object per key, so the ordered
    pass that consumes the workers' signatures stays small beside them, and the index costs 16
    bytes per band per document (a dict of Python ints took ~100).
    """

    def __init__(self, threshold: float, num_perm: int, weights: tuple[float, float] = (0.5, 0.5)):
        self.bands, self.rows = _banding(threshold, num_perm, weights)
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []     # (sorted band keys, owners' ordinals)

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(docs, num_perm) signatures -> each document's band keys, (docs, bands) uint64."""
        bands = signatures[:, : self.bands * self.rows].reshape(len(signatures), self.bands, self.rows)
        keys = np.arange(1, self.bands + 1, dtype=np.uint64) * _MIX[-1]   # the band number: bands never meet
        keys = np.broadcast_to(keys, bands.shape[:2]).copy()
        for j in range(self.rows):               # position-dependent odd multipliers, wrapping mod 2^64
            keys += bands[..., j].astype(np.uint64) * _MIX[j]
        return keys ^ (keys >> np.uint64(29))

    @staticmethod
    def sorted_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(docs, bands) band keys -> (all keys sorted, the row each came from). Sorted lookups walk
        the index's runs in order (cache-friendly: 4x faster than random ones), and a sorted run
        merges into the index in linear time."""
        flat = keys.ravel()
        order = np.argsort(flat, kind="stable")           # equal keys keep their rows in order
        return flat[order], order // keys.shape[1]

    def add(self, keys: np.ndarray, owners: np.ndarray) -> None:
        """Index sorted band keys (from sorted_keys) with their documents' ordinals."""
        run_keys, run_owners = keys, np.asarray(owners, dtype=np.int64)
        while self.runs and len(self.runs[-1][0]) <= 2 * len(run_keys):
            last_keys, last_owners = self.runs.pop()
            run_keys, run_owners = np.concatenate([last_keys, run_keys]), np.concatenate([last_owners, run_owners])
        order = np.argsort(run_keys, kind="stable")   # sorted runs back to back: timsort merges them in one pass
        self.runs.append((run_keys[order], run_owners[order]))

    def matches(self, keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, ordinals): each indexed document sharing a band key with a queried row, once per
        shared key; `keys` sorted, `rows` the row of each (from sorted_keys)."""
        found_rows, owners = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        for run_keys, run_owners in self.runs:
            lo = np.searchsorted(run_keys, keys, "left")
            count = np.searchsorted(run_keys, keys, "right") - lo
            hit = np.flatnonzero(count)
            count = count[hit]
            first = np.repeat(np.cumsum(count) - count, count)      # expand each hit to its range
            found_rows.append(np.repeat(rows[hit], count))
            owners.append(run_owners[np.repeat(lo[hit], count) + np.arange(count.sum()) - first])
        return np.concatenate(found_rows), np.concatenate(owners)


def _shared_within(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(later rows, earlier rows): pairs of one shard's documents sharing a band key, once per
    shared key; `keys` sorted, `rows` ascending within equal keys (from BandIndex.sorted_keys)."""
    later, earlier = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for shift in range(1, len(keys)):                     # a group of g equal keys yields g - 1 shifts
        same = np.flatnonzero(keys[shift:] == keys[:-shift])
        if not same.size:
            break
        later.append(rows[same + shift])
        earlier.append(rows[same])
    return np.concatenate(later), np.concatenate(earlier)


def _candidates(rows: np.ndarray, ordinals: np.ndarray) -> dict[int, list[int]]:
    """row -> its candidates' ordinals, ascending and each once."""
    order = np.lexsort((ordinals, rows))
    grouped: dict[int, list[int]] = {}
    for row, ordinal in zip(rows[order].tolist(), ordinals[order].tolist(), strict=True):
        group = grouped.setdefault(row, [])
        if not group or group[-1] != ordinal:
            group.append(ordinal)
    return grouped


class _Documents:
    """Every document seen so far, by ordinal (its place in shard order, then line order): what the
    ordered pass needs of an earlier document that a later one names as a candidate."""

    def __init__(self):
        self.starts: list[int] = []
        self.shards: list[tuple[list[str], np.ndarray, np.ndarray]] = []   # (doc ids, shingles, offsets)
        self.alive = bytearray()                 # 1 while the document is kept

    def add(self, sigs: ShardSignatures) -> int:
        """Append a shard's documents (not their MinHash values: the index has their bands);
        returns the first one's ordinal."""
        start = len(self.alive)
        self.starts.append(start)
        self.shards.append((sigs.doc_ids, sigs.shingles, sigs.offsets))
        self.alive.extend(b"\x01" * len(sigs.doc_ids))
        return start

    def __getitem__(self, ordinal: int) -> tuple[str, np.ndarray]:
        """(doc id, shingle hashes)."""
        k = bisect.bisect_right(self.starts, ordinal) - 1
        line = ordinal - self.starts[k]
        doc_ids, shingles, offsets = self.shards[k]
        return doc_ids[line], shingles[offsets[line]:offsets[line + 1]]


def _exact_suspects(exact: list[bytes], seen_exact: dict[bytes, str]) -> set[int]:
    """Lines whose normalized-text hash was seen before or repeats within the shard."""
    suspect = seen_exact.keys() & exact | {e for e, n in Counter(exact).items() if n > 1}
    return {line for line, e in enumerate(exact) if e in suspect} if suspect else set()


def deduplicate(shards: Iterable[ShardSignatures], threshold: float, num_perm: int) -> DedupResult:
    """Keep-first exact and near-duplicate removal over documents in shard order, then line order.

    LSH proposes candidates from the MinHash signatures; a candidate is a duplicate when the exact
    Jaccard of the two shingle-hash sets reaches `threshold` (no estimation error at the border).

    The decisions are those of taking documents one at a time (tests/test_dedup.py compares with
    that, on datasketch's MinHashLSH): a document is an exact duplicate of the first kept one with
    its hash, else a near duplicate of the earliest kept candidate that passes the Jaccard check,
    else kept. Per shard, candidates come from the index (every earlier document; the removed are
    skipped) and from the shard itself, all in numpy; only documents with a candidate or a repeated
    hash (~15 %) go through the ordered check in Python. The rest are kept in any order.
    """
    # LSH only proposes candidates: tune its bands for recall (a lower threshold, false negatives
    # weighted 4x), and let the exact Jaccard below decide, which restores precision.
    lsh = BandIndex(threshold=max(threshold - 0.1, 0.05), num_perm=num_perm, weights=(0.2, 0.8))
    seen_exact: dict[bytes, str] = {}            # normalized-text hash -> the kept document it belongs to
    docs = _Documents()
    result = DedupResult()
    for sigs in shards:
        start = docs.add(sigs)
        n = len(sigs.doc_ids)
        result.docs_in += n
        keys, rows = lsh.sorted_keys(lsh.band_keys(sigs.hashvalues))
        before_rows, before = lsh.matches(keys, rows)
        later, earlier = _shared_within(keys, rows)
        candidates = _candidates(np.concatenate([before_rows, later]), np.concatenate([before, start + earlier]))
        suspects = _exact_suspects(sigs.exact, seen_exact)
        checked = sorted(suspects.union(candidates))
        unchecked = sorted(set(range(n)).difference(checked))
        seen_exact.update(zip([sigs.exact[i] for i in unchecked], [sigs.doc_ids[i] for i in unchecked], strict=True))
        for line in checked:
            doc_id, exact = sigs.doc_ids[line], sigs.exact[line]
            head = seen_exact.get(exact)
            if head is not None:
                result.exact_dups += 1
            else:
                shingles = sigs.doc_shingles(line)
                match = next((c for c in candidates.get(line, ()) if docs.alive[c]
                              and exact_jaccard(docs[c][1], shingles) >= threshold), None)
                if match is None:
                    seen_exact[exact] = doc_id
                    continue
                head = docs[match][0]
                result.near_dups += 1
                seen_exact[exact] = head         # later exact copies of this one join the cluster
            result.clusters.setdefault(head, []).append(doc_id)
            result.removed.add((sigs.shard, line))
            docs.alive[start + line] = 0
        lsh.add(keys, start + rows)
    return result
