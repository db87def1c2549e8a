"""Benchmark contamination: find eval items in training text the ways they leak, field by field.

Pages print an item as a question with its choices labelled "(A) ... (B) ..." or shuffled, a
question without its answer, a code prompt without its solution, with case, spacing and
punctuation changed. One concatenated string per item misses most of these, so each item is
matched by its fields (``hatchling.data.benchmarks.item_fields`` lists them per benchmark):

- *anchors* name the item: its question, context, passage, sentence or code prompt. Alternative
  renderings of it (WinoGrande's sentence with its blank filled by each option) are alternative
  anchors.
- *supports* are evidence only beside an anchor: each choice, answer, ending or solution. A choice
  such as "Sunlight", an option such as "Sarah" or a common two-line solution is ordinary text on
  its own.

Text is compared normalized (``textnorm``: NFKC, lower case, punctuation removed, whitespace
collapsed). A field of at least n words (13 by default) *occurs* in a document when at least
`threshold` of its distinct word n-grams do (containment, not Jaccard: a 40-word question in a
3,000-word page has a tiny Jaccard but a containment of 1); a shorter field occurs wherever all
its words appear in order: it is matched whole.

**The rule.** An item is found in a document when one of its anchors occurs and that anchor plus
the supports occurring within ``W + n`` words of it hold at least ``min(n, W)`` words, where W is
the item's word count (the anchor and all its supports). Hence:

- a question, context or prompt of n words or more is found alone: printed without its choices
  or answer, a GSM8K problem without its solution, a HumanEval prompt without its solution;
- a shorter question needs enough of its choices beside it, in any order, labelled or not; an
  item shorter than n words in all must appear whole;
- except a *distinctive* short anchor, which counts alone: one anchoring one item and used by no
  other, that no field of any other indexed item holds as a run of words, and either
  (1) of ALONE_WORDS (6) to n - 1 words with at least one rare word (held by at most RARE_WORDS,
  1 %, of the index's fields): found wherever it occurs whole; or
  (2) of at least UNIT_BITS (27) bits of information: found where it occurs whole *as a unit*, a
  whole line or sentence of the page (a line break, a sentence end . ? ! or a colon, or the page's
  edge, before its first word and after its last: ``unit_breaks``), not inside running text;
- supports never count without their anchor, however many occur.

An anchor's *information* is the sum over its words of -log2 of the larger of the word's share of
the index's fields and its share of the fields of the anchor's own benchmark: a word common in the
set's own text ("which", "statement", "how to" in PIQA's goals) says little about which item it
is, wherever else it is rare. The second rule's threshold comes from the index's own text
(``bench/contamination.py --calibrate``): of the shipped sets' ~4,500 short one-item anchors, five
stand as a line or sentence in another item's text ("Which statement is an inference?", 26.6
bits, ends another ARC-Easy question; "How to grow a beard", 21.9 bits, is a HellaSwag WikiHow
title; "whisk", "shampoo"), so UNIT_BITS lies above the most informative of them.

Why other short questions need their choices: the shipped sets themselves hold distinct items with
the same 5-9-word question ("What causes day and night on Earth?" is two ARC-Easy items, "Which is
a chemical change?" two ARC-Challenge ones), so such a question alone names none of them, and a
science page asking it is no leak; a question made of common words ("What is the capital of
France?" once other fields hold each of its words, "Which substance is a compound?", 23 bits) or
worded like a web title ("How to make hot chocolate", a PIQA goal that HellaSwag's WikiHow contexts
also hold; "How to get great cookies", 23 bits) is ordinary web text. Choices printed beside it
are what tells the item apart. The other items' text (Wikipedia passages, WikiHow and ActivityNet
contexts, science questions: ~110,000 fields) is the frequency check: with 6 words and a rare word
no distinctive anchor of one set occurred in another set's text, with 5 words four did; none of
27 bits or more stands as a line or sentence in another item's text (docs/benchmarks.md).
The information is measured on benchmark text only (nothing else ships offline): web how-to
titles are far more common on the web than in it, so on a web-scale crawl the second rule may flag
pages titled like a PIQA goal ("Get rid of flies indoors", 35.6 bits).
`threshold` keeps templates apart: a GSM8K train problem with other numbers shares exactly half
of the n-grams of one test question, so 0.5 flags it and anything above does not (the planted-leak
benchmark, bench/contamination.py, and its results in docs/benchmarks.md).

**Speed.** ``scan_batch`` filters with 64-bit polynomial hashes (keys) of the word windows of every
field length, vectorized over a batch of documents: the windows whose first and last words may
begin and end a field's window of their length are keyed (from prefix hashes, ``window_key``) and
looked up; a field *may* occur where its keys do (equal words always hash alike, so the filter
loses nothing), and an item whose anchor and supports may hold enough words is a candidate. Each
candidate is then decided on the words themselves by ``find``, the rule above written plainly;
``reference_scan`` runs ``find`` on every item, the slow reference the filter is tested against
(tests/test_decontam.py).

**Cache.** Building the index of every shipped set takes seconds (normalizing ~110,000 field
texts, the distinctive test), the same each run until a set, a param or this code changes.
``cached_index`` keeps the built index in a file named by a sha256 of what decides it: the
items' text, ``n`` and ``threshold``, the rule's constants and the source of this module and of
``textnorm``. The file holds its own key and a sha256 of its payload, both checked before it is
unpickled: a truncated or altered file, or one of another key, is rebuilt and rewritten (written
atomically, so a killed writer leaves the old file or none). The checksum guards against
corruption, not an adversary: whoever can write the project's ``.hatchling/`` can edit its code.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import itertools
import json
import pickle
import unicodedata
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import xxhash

from hatchling.data import textnorm
from hatchling.data.textnorm import normalized_words, words_with_spans
from hatchling.io import atomic_path


@dataclass(frozen=True)
class Item:
    """One eval item as the check sees it: its id and the texts it can leak by."""

    id: str
    anchors: tuple[str, ...]          # the question, context or prompt (alternative renderings)
    supports: tuple[str, ...] = ()    # choices, answers, endings, solution


@dataclass(frozen=True)
class Hit:
    benchmark: str
    item_id: str
    coverage: float                        # share of the item's words found around its anchor
    spans: tuple[tuple[int, int], ...]     # character spans in the document holding them


class Page:
    """A document's normalized words, with the lookups the exact rule needs (built on first use);
    `text`, the document itself, tells where its lines and sentences begin and end (``unit_breaks``)."""

    def __init__(self, words: list[str], n: int, text: str | None = None):
        self.words, self.n, self.text = words, n, text

    @cached_property
    def breaks(self) -> list[bool]:
        return unit_breaks(self.text) if self.text is not None else [False] * (len(self.words) + 1)

    def stands(self, start: int, end: int) -> bool:
        """Whether words[start:end] are a whole line or sentence of the text (a unit, module doc)."""
        return self.breaks[start] and self.breaks[end]

    @cached_property
    def starts(self) -> dict[str, list[int]]:
        out = defaultdict(list)
        for i, w in enumerate(self.words):
            out[w].append(i)
        return out

    @cached_property
    def grams(self) -> dict[str, list[int]]:
        out = defaultdict(list)
        for i in range(len(self.words) - self.n + 1):
            out[" ".join(self.words[i:i + self.n])].append(i)
        return out

    def occurrences(self, field: list[str], threshold: float) -> list[tuple[int, int]]:
        """Word intervals where `field` occurs: each whole match of a short field; the merged runs of
        a long field's n-grams when at least `threshold` of its distinct n-grams are here, else none."""
        k, n = len(field), self.n
        if not k:
            return []
        if k < n:
            return [(p, p + k) for p in self.starts.get(field[0], ()) if self.words[p:p + k] == field]
        grams = {" ".join(field[i:i + n]) for i in range(k - n + 1)}
        matched = [self.grams[g] for g in grams if g in self.grams]
        if len(matched) < threshold * len(grams):
            return []
        return merge_spans((p, p + n) for positions in matched for p in positions)


def find(item: Item, page: Page, threshold: float, alone: frozenset[str] = frozenset(),
         units: frozenset[str] = frozenset()) -> tuple[float, list[tuple[int, int]]] | None:
    """(coverage, word intervals) of `item` in `page` by the module's rule, else None: the rule written
    plainly, on the words themselves, which decides every candidate of ``scan_batch``. `alone` and
    `units`: the normalized texts of the short anchors that count alone anywhere, and of those that
    count alone standing as a line or sentence (``ContaminationIndex.alone``, ``.units``)."""
    n = page.n
    supports = [normalized_words(s) for s in item.supports]
    support_words = sum(map(len, supports))
    placed = None                             # each support's occurrences, looked up once an anchor is here
    coverage, intervals = 0.0, []
    for anchor in map(normalized_words, item.anchors):
        occurrences = page.occurrences(anchor, threshold)
        distinctive, unit = " ".join(anchor) in alone, " ".join(anchor) in units
        if not occurrences:
            continue
        if placed is None:
            placed = [page.occurrences(s, threshold) for s in supports]
        total = len(anchor) + support_words
        # a long anchor is one match (its n-gram runs); a short one is a match at each place it stands
        for region in [occurrences] if len(anchor) >= n else [[o] for o in occurrences]:
            lo, hi = region[0][0] - total - n, region[-1][1] + total + n
            near = [[(a, b) for a, b in spans if a < hi and b > lo] for spans in placed]
            words = len(anchor) + sum(len(s) for s, spans in zip(supports, near, strict=True) if spans)
            if words >= min(n, total) or distinctive or (unit and page.stands(*region[0])):
                coverage = max(coverage, words / total)
                intervals += region + [span for spans in near for span in spans]
    return (round(coverage, 4), merge_spans(intervals)) if intervals else None


ALONE_WORDS = 6              # a short anchor of this many words or more may count alone (module doc)
RARE_WORDS = 0.01            # ... when one of its words is held by at most this share of the index's fields
UNIT_BITS = 27.0             # a short anchor of this much information counts alone as a line or sentence
# what ends a line or sentence: line breaks, sentence ends and the colon of "Question: ..." (after NFKC)
UNIT_BREAKS = frozenset(".?!:\u2026\u3002\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def unit_breaks(text: str) -> list[bool]:
    """For i = 0 .. len(normalized_words(text)): whether a line or sentence may begin at word i and end
    before it. True at both ends; between two words when the text between their letters (the first
    one's trailing and the second one's leading punctuation and what lies between) holds a UNIT_BREAKS
    character. Two words from one token (NFKC split it) are never apart."""
    spans = words_with_spans(text)[1]
    out = [True] * (len(spans) + 1)
    for i in range(1, len(spans)):
        (a0, b0), (a1, b1) = spans[i - 1], spans[i]
        if (a0, b0) == (a1, b1):
            out[i] = False
            continue
        while b0 > a0 and unicodedata.category(text[b0 - 1])[0] == "P":
            b0 -= 1
        while a1 < b1 and unicodedata.category(text[a1])[0] == "P":
            a1 += 1
        out[i] = not UNIT_BREAKS.isdisjoint(unicodedata.normalize("NFKC", text[b0:a1]))
    return out
MAX_N = 64                   # a word's edge bits (one per window length) fill a uint64
EDGE_SLOT_BITS = 20          # the edge bits are looked up by the word hash's top bits: 2^20 slots
_SEED, _P = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)   # rolling-hash start, odd base


def window_keys(values: np.ndarray, longest: int) -> Iterator[tuple[int, np.ndarray]]:
    """(L, the 64-bit key of every window of L consecutive word values) for L = 1 .. `longest`.

    A key is a polynomial hash from a fixed start (so windows of different lengths differ as well),
    each length's keys one multiply-add on the previous length's; wraps mod 2^64 by design.
    """
    h = np.full(len(values), _SEED, dtype=np.uint64)
    for length in range(1, min(longest, len(values)) + 1):
        h = h[:len(values) - length + 1] * _P + values[length - 1:]
        yield length, h


@functools.lru_cache(maxsize=4)
def _powers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """P^k and P^-k mod 2^64 for k < size (P is odd, so it has an inverse mod 2^64)."""
    up, down = np.full(size, _P, dtype=np.uint64), np.full(size, pow(int(_P), -1, 2**64), dtype=np.uint64)
    up[0] = down[0] = 1
    up, down = np.cumprod(up), np.cumprod(down)
    up.setflags(write=False)                 # shared by every call (cached)
    down.setflags(write=False)
    return up, down


def window_key(values: np.ndarray, at: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The keys of the windows of `values` of `length` values starting at `at` (arrays, elementwise):
    ``window_keys``' keys of those windows, each in O(1).

    From prefix hashes pre[j] = sum_{k<j} values[k] P^(j-1-k) (one cumsum of values[k] P^-k, times
    P^(j-1)), a window's key is pre[at + L] - pre[at] P^L + SEED P^L, all mod 2^64: the scan keys only
    the windows its edge bits let through instead of every window of every length.
    """
    values = np.asarray(values, dtype=np.uint64)
    up, down = _powers(1 << max(12, (len(values) + 1).bit_length()))
    pre = np.zeros(len(values) + 1, dtype=np.uint64)
    np.cumsum(values * down[:len(values)], out=pre[1:])
    pre[1:] *= up[:len(values)]
    return pre[at + length] - pre[at] * up[length] + _SEED * up[length]


def segment_starts(offsets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """offsets[i], offsets[i] + 1, ..., offsets[i] + counts[i] - 1 for every i, concatenated."""
    total = int(counts.sum())
    first = np.repeat(offsets - np.cumsum(counts) + counts, counts)
    return first + np.arange(total)


class WordHashes(dict):
    """word -> its xxh64, each computed on the first lookup of the word (a seen word costs one dict lookup)."""

    def __missing__(self, word: str) -> int:
        h = self[word] = xxhash.xxh64_intdigest(word.encode())
        return h


_word_hashes = WordHashes()      # per process (grows with the words seen)


def word_hashes(words: list[str], cache: WordHashes | None = None) -> np.ndarray:
    """The xxh64 of each word (uint64): what the index's keys are made of, and dedup's shingles
    (hatchling/data/dedup.py), so a dedup worker computes them once for both. Each distinct word is
    hashed once per `cache`: by default the process's, which a dedup worker fills with its shards'
    words; a caller that should not keep every word it sees passes its own ``WordHashes()``."""
    cache = _word_hashes if cache is None else cache
    return np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))


class ContaminationIndex:
    """Every field of the items of some benchmarks, hashed for ``scan_batch``.

    Each distinct normalized field text is one field (SIQA's stories that several questions share,
    ARC's one-word choices are stored once). A short field has one key, that of its whole window;
    a long one a key per n-gram. The keys are sorted, each with the fields that hold it (CSR).
    Two cheap tests run before a window's key is looked up: its first and last words must begin
    and end some field's window of its length (a bit per length, looked up by the word's hash:
    ``_index_windows``), and its key must pass a two-probe Bloom filter (~32 bits a key, so ~0.4% of
    other windows pass). A page's words enter as their ``word_hashes``, which dedup computes for its
    shingles anyway: the scan looks nothing up in a dictionary.

    ``alone`` and ``units`` are the normalized texts of the distinctive short anchors of the module
    doc's first and second rule; ``bits``, every short anchor of one item's information.
    """

    def __init__(self, benchmarks: dict[str, list[Item]], n: int = 13, threshold: float = 0.5):
        if not 1 <= n <= MAX_N:
            raise ValueError(f"n-gram length {n}: the index takes 1 to {MAX_N} words")
        self.n, self.threshold = n, threshold
        self.items: list[tuple[str, Item]] = [(b, item) for b, items in benchmarks.items() for item in items]
        numbers: dict[str, int] = {}                      # normalized field text -> field number
        fields: list[list[str]] = []                      # field number -> its normalized words

        def number(text: str) -> int:
            words = normalized_words(text)
            key = " ".join(words)
            if key not in numbers:
                numbers[key] = len(fields)
                fields.append(words)
            return numbers[key]

        self._anchors = [[number(t) for t in item.anchors] for _, item in self.items]
        self._supports = [[number(t) for t in item.supports] for _, item in self.items]
        self._readers: dict[int, list[int]] = defaultdict(list)      # anchor field -> the items it anchors
        for idx, anchors in enumerate(self._anchors):
            for f in set(anchors):
                self._readers[f].append(idx)
        self._length = np.array([len(w) for w in fields], dtype=np.int64)
        flat = list(itertools.chain.from_iterable(fields))
        # the build's word numbers (0: a word that no field holds) and their hashes; a scan needs neither
        self._vocab = {w: i for i, w in enumerate(dict.fromkeys(flat), 1)}
        self._values = np.concatenate([np.zeros(1, dtype=np.uint64), word_hashes(list(self._vocab), WordHashes())])
        ids = np.fromiter(map(self._vocab.__getitem__, flat), dtype=np.int64, count=len(flat))
        self._index_windows(ids)
        self._fields = fields
        self._alone, self._unit = self._distinctive(ids)
        self.alone = frozenset(" ".join(fields[f]) for f in np.flatnonzero(self._alone).tolist())
        self.units = frozenset(" ".join(fields[f]) for f in np.flatnonzero(self._unit).tolist())
        del self._vocab, self._values

    def __getstate__(self) -> dict:
        """For the cache (``write_index``): the items and fields as a few flat lists and strings, which
        unpickle ~10x faster than 24,000 dataclasses and 110,000 lists of words."""
        state = dict(self.__dict__)
        state.pop("cached_as", None)
        items = state.pop("items")
        state["items"] = ([b for b, _ in items], [i.id for _, i in items], [i.anchors for _, i in items],
                          [i.supports for _, i in items])
        state.pop("_fields", None)
        state["_field_text"] = self._field_text
        state["_readers"] = dict(self._readers)
        return state

    def __setstate__(self, state: dict) -> None:
        benches, ids, anchors, supports = state.pop("items")
        self.items = [(b, Item(i, a, s)) for b, i, a, s in zip(benches, ids, anchors, supports, strict=True)]
        self.__dict__.update(state)

    @cached_property
    def _field_text(self) -> str:
        """Every field's normalized words, a field a line (normalized words hold no whitespace)."""
        return "\n".join(" ".join(words) for words in self._fields)

    @cached_property
    def _fields(self) -> list[list[str]]:
        """Field number -> its normalized words (set by the build; from ``_field_text`` after unpickling,
        when first needed: only the slow reference needs them after the build)."""
        return [line.split(" ") if line else [] for line in self._field_text.split("\n")] if len(self._length) else []

    def _owners(self) -> np.ndarray:
        """Field -> the one item that uses it (as anchor or support), or -1 when several do."""
        owner = np.full(len(self._length), -2, dtype=np.int64)
        for idx, (anchors, supports) in enumerate(zip(self._anchors, self._supports, strict=True)):
            for f in set(anchors + supports):
                owner[f] = idx if owner[f] == -2 else -1
        return owner

    def _short_candidates(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(owner of each field, whether each field passes the tests of the first rule that need no
        search: an anchor of one item, of ALONE_WORDS to n - 1 words, with a rare word; whether it
        passes those of the second: an anchor of one item, under n words, of UNIT_BITS or more)."""
        owner, (df, bench_df, bench_fields) = self._owners(), self._document_frequency(ids)
        rare = df <= max(1, RARE_WORDS * len(self._length))
        short = np.zeros(len(self._length), dtype=bool)
        short[list(self._readers)] = True
        short &= (owner >= 0) & (self._length < self.n)
        has_rare = np.array([bool(rare[[self._vocab[w] for w in words]].any()) if short[f] else False
                             for f, words in enumerate(self._fields)], dtype=bool)
        bench = self._bench_numbers()
        bits = np.zeros(len(self._length))
        for f in np.flatnonzero(short).tolist():
            b = bench[owner[f]]
            words = [self._vocab[w] for w in self._fields[f]]
            share = np.maximum(df[words] / len(self._length), bench_df[b, words] / bench_fields[b])
            bits[f] = -np.log2(share).sum()
        self.bits = {" ".join(self._fields[f]): float(bits[f]) for f in np.flatnonzero(short).tolist()}
        return owner, short & (self._length >= ALONE_WORDS) & has_rare, short & (bits >= UNIT_BITS)

    def _bench_numbers(self) -> np.ndarray:
        """Item -> the number of its benchmark (in order of first appearance)."""
        names = {b: k for k, b in enumerate(dict.fromkeys(b for b, _ in self.items))}
        return np.array([names[b] for b, _ in self.items], dtype=np.int64)

    def _document_frequency(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(word id -> how many fields hold it, (benchmark, word id) -> how many of the fields the
        benchmark's items use hold it, benchmark -> how many fields its items use); `ids`: all fields'
        words, concatenated."""
        vocab, fields = len(self._values), len(self._length)
        field = np.repeat(np.arange(fields), self._length)
        pairs = np.sort(field * vocab + ids)           # a sort: np.unique's hashing is slower here
        pairs = pairs[np.append(True, pairs[1:] != pairs[:-1])[:len(pairs)]]
        holder, word = np.divmod(pairs, vocab)
        df = np.bincount(word, minlength=vocab)
        bench = self._bench_numbers()
        used = np.unique([bench[idx] * fields + f for idx, (a, s) in enumerate(zip(self._anchors, self._supports,
                                                                                   strict=True)) for f in a + s])
        used_bench, used_field = np.divmod(used.astype(np.int64), fields)
        benches = int(bench.max()) + 1 if len(bench) else 0
        first = np.searchsorted(holder, np.arange(fields + 1))      # field f's distinct words: first[f]:first[f + 1]
        count = first[used_field + 1] - first[used_field]
        rows = np.repeat(used_bench, count) * vocab + word[segment_starts(first[used_field], count)]
        bench_df = np.bincount(rows, minlength=benches * vocab).reshape(benches, vocab)
        return df, bench_df, np.bincount(used_bench, minlength=benches)

    def _distinctive(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(field -> whether it is a short anchor that counts alone wherever it occurs whole, field ->
        whether one that counts alone standing as a line or sentence; module doc): the candidates of
        ``_short_candidates`` that no other item's field holds as a window. Windows are compared by
        their 64-bit keys (a collision can only make a field not distinctive); ``reference_distinctive``
        is the same test on the words."""
        owner, alone, unit = self._short_candidates(ids)
        ok = alone | unit
        if not ok.any():
            return ok, ok
        length = self._length
        offsets = np.cumsum(length) - length
        field_of = np.repeat(np.arange(len(length)), length)
        for size, h in window_keys(self._values[ids], self.n - 1):
            cand = np.flatnonzero(ok & (length == size))
            if not len(cand):
                continue
            keys = h[offsets[cand]]
            order = np.argsort(keys)
            keys, cand = keys[order], cand[order]
            begins = np.zeros(len(self._values), dtype=bool)           # the words some candidate begins with
            begins[ids[offsets[cand]]] = True
            window = np.flatnonzero(begins[ids[:len(h)]] & (field_of[:len(h)] == field_of[size - 1:]))
            at = np.searchsorted(keys, h[window]).clip(max=len(keys) - 1)
            hit = window[keys[at] == h[window]]
            holder, held = field_of[hit], cand[at[keys[at] == h[window]]]
            ok[held[owner[holder] != owner[held]]] = False
        return ok & alone, ok & unit & ~alone

    def reference_distinctive(self) -> tuple[frozenset[str], frozenset[str]]:
        """(``alone``, ``units``) computed plainly: each short anchor of one item that no field of another
        item holds, (alone) of ALONE_WORDS to n - 1 words with a word held by at most RARE_WORDS of the
        fields, or else (units) of at least UNIT_BITS (slow)."""
        users: dict[int, set[int]] = defaultdict(set)
        for idx, fs in enumerate(zip(self._anchors, self._supports, strict=True)):
            for f in fs[0] + fs[1]:
                users[f].add(idx)
        texts = [f" {' '.join(words)} " for words in self._fields]
        sets = [set(words) for words in self._fields]
        rare = max(1, RARE_WORDS * len(self._fields))
        alone, units = set(), set()
        for f, words in enumerate(self._fields):
            if not (f in self._readers and len(users[f]) == 1 and len(words) < self.n):
                continue
            if any(texts[f] in texts[g] and users[g] != users[f] for g in range(len(self._fields))):
                continue
            bench = self.items[next(iter(users[f]))][0]
            mine = [g for g in range(len(self._fields)) if any(self.items[i][0] == bench for i in users[g])]
            bits = 0.0
            for w in words:
                share = max(sum(w in other for other in sets) / len(sets), sum(w in sets[g] for g in mine) / len(mine))
                bits -= float(np.log2(share))
            if len(words) >= ALONE_WORDS and any(sum(w in other for other in sets) <= rare for w in words):
                alone.add(texts[f].strip())
            elif bits >= UNIT_BITS:
                units.add(texts[f].strip())
        return frozenset(alone), frozenset(units)

    def _index_windows(self, ids: np.ndarray) -> None:
        """Keys, edge bits and Bloom filter of every field's windows (`ids`: all fields' words, concatenated).

        The edge bits are kept by slot, the top bits of a word's hash (about eight slots a word, at most
        2^EDGE_SLOT_BITS), not by word: a page's words are looked up by the hashes dedup computes anyway
        (``word_hashes``), with no dictionary. A slot holds the bits of every indexed word hashed there,
        so a word outside the index that shares one lets more windows through to the Bloom filter and
        the key search, never fewer."""
        n, length = self.n, self._length
        offsets = np.cumsum(length) - length
        edge = np.min_scalar_type(1 << (n - 1))            # a bit per window length
        starts = np.zeros(len(self._values), dtype=edge)            # word -> bit L-1: it begins a window of length L
        ends = np.zeros(len(self._values), dtype=edge)              # ... it ends one
        keys, owners = [np.zeros(0, dtype=np.uint64)], [np.zeros(0, dtype=np.int64)]
        for size, h in window_keys(self._values[ids], n):
            if size < n:                                 # a short field: its whole window
                own = np.flatnonzero(length == size)
                first = offsets[own]
            else:                                        # a long one: each of its n-grams
                long = np.flatnonzero(length >= n)
                own = np.repeat(long, length[long] - n + 1)
                first = segment_starts(offsets[long], length[long] - n + 1)
            bit = edge.type(1 << (size - 1))
            np.bitwise_or.at(starts, ids[first], bit)
            np.bitwise_or.at(ends, ids[first + size - 1], bit)
            keys.append(h[first])
            owners.append(own)
        slot_bits = min(EDGE_SLOT_BITS, max(8, int(np.ceil(np.log2(8 * len(self._values))))))   # ~8 slots a word
        self._slot_shift = np.uint64(64 - slot_bits)
        slot = self._values[1:] >> self._slot_shift
        self._starts, self._ends = (np.zeros(1 << slot_bits, dtype=edge) for _ in range(2))
        np.bitwise_or.at(self._starts, slot, starts[1:])
        np.bitwise_or.at(self._ends, slot, ends[1:])
        keys, owners = np.concatenate(keys), np.concatenate(owners)
        order = np.lexsort((owners, keys))
        keys, owners = keys[order], owners[order]
        distinct = np.ones(len(keys), dtype=bool)            # a field holding an n-gram twice counts it once
        distinct[1:] = (keys[1:] != keys[:-1]) | (owners[1:] != owners[:-1])
        keys, self._key_fields = keys[distinct], owners[distinct]
        self._keys, first = np.unique(keys, return_index=True)
        self._key_start = np.append(first, len(keys))
        grams = np.bincount(self._key_fields, minlength=len(length))     # distinct keys of each field
        self._need = np.where(length < n, 1, np.ceil(self.threshold * grams)).astype(np.int64)
        bits = max(6, int(np.ceil(np.log2(32 * max(1, len(self._keys))))))
        self._bloom_shift, self._bloom_low = np.uint64(64 - bits), np.uint64((1 << bits) - 1)
        flags = np.zeros(1 << bits, dtype=bool)
        flags[self._keys >> self._bloom_shift] = True
        flags[self._keys & self._bloom_low] = True
        self._bloom = np.packbits(flags, bitorder="little").view("<u8")      # flag 64 w + i: bit i of word w

    def _in_bloom(self, h: np.ndarray) -> np.ndarray:
        """Indices of the keys in `h` that pass the filter: both their bits (top and low) are set."""
        keep = np.flatnonzero(self._bloom_bit(h >> self._bloom_shift))
        return keep[self._bloom_bit(h[keep] & self._bloom_low)]

    def _bloom_bit(self, slot: np.ndarray) -> np.ndarray:
        return ((self._bloom[slot >> np.uint64(6)] >> (slot & np.uint64(63))) & np.uint64(1)).astype(bool)

    def scan(self, text: str) -> list[Hit]:
        return self.scan_batch([text])[0]

    def scan_batch(self, texts: list[str], words: list[list[str]] | None = None,
                   hashes: list[np.ndarray] | None = None) -> list[list[Hit]]:
        """The hits in each text; `words` (each text's ``normalized_words``) and `hashes` (their
        ``word_hashes``) when already at hand."""
        words = [normalized_words(t) for t in texts] if words is None else words
        if hashes is None:
            cache = WordHashes()                      # this batch's words only (module doc of word_hashes)
            hashes = [word_hashes(w, cache) for w in words]
        elif [len(h) for h in hashes] != [len(w) for w in words]:
            raise ValueError("scan_batch: `hashes` must hold one hash per word of each text")
        hits: list[list[Hit]] = [[] for _ in texts]
        for doc, candidates in self._candidates(hashes).items():
            page = Page(words[doc], self.n, texts[doc])
            found = [(self.items[idx], f) for idx in sorted(candidates)
                     if (f := find(self.items[idx][1], page, self.threshold, self.alone, self.units))]
            hits[doc] = located(texts[doc], found)
        return hits

    def reference_scan(self, text: str) -> list[Hit]:
        """``scan`` without the hash filter: the rule tried on every item (slow; for tests)."""
        page = Page(normalized_words(text), self.n, text)
        return located(text, [(entry, f) for entry in self.items
                              if (f := find(entry[1], page, self.threshold, self.alone, self.units))])

    def _candidates(self, hashes: list[np.ndarray]) -> dict[int, set[int]]:
        """{document: the items whose anchor and supports may hold enough words there}; `hashes`: each
        document's ``word_hashes``."""
        present: dict[int, set[int]] = defaultdict(set)
        for d, f in self._fields_present(hashes):
            present[d].add(f)
        out: dict[int, set[int]] = defaultdict(set)
        for d, here in present.items():
            for f in here & self._readers.keys():
                out[d].update(idx for idx in self._readers[f] if self._may_hold(idx, f, here))
        return {d: items for d, items in out.items() if items}

    def _fields_present(self, hashes: list[np.ndarray]) -> Iterator[tuple[int, int]]:
        """(document, field) for each field whose keys say it may occur in the document (`hashes`: each
        document's ``word_hashes``)."""
        if not hashes or not len(self._keys):
            return iter(())
        gap = np.zeros(1, dtype=np.uint64)     # after each document: a word no window begins or ends at
        values = np.concatenate([part for h in hashes for part in (np.asarray(h, dtype=np.uint64), gap)])
        sizes = [len(h) + 1 for h in hashes]
        doc = np.repeat(np.arange(len(hashes)), sizes)
        slot = values >> self._slot_shift
        starts, ends = self._starts[slot], self._ends[slot]
        gaps = np.cumsum(sizes) - 1
        starts[gaps] = ends[gaps] = 0
        # bit L-1 of edges[i]: a window of L words at i begins and ends with words some field's windows
        # of length L begin and end with (most windows of text have no such bit: a pass over small ints)
        reach = np.zeros_like(ends)
        for size in range(1, min(self.n, len(values)) + 1):
            reach[:len(values) - size + 1] |= ends[size - 1:] & ends.dtype.type(1 << (size - 1))
        edges = starts & reach
        first = np.flatnonzero(edges)
        bits = edges[first]
        at = [first[(bits & bits.dtype.type(1 << (size - 1))) != 0] for size in range(1, self.n + 1)]
        length = np.repeat(np.arange(1, self.n + 1), [len(a) for a in at])
        at = np.concatenate(at)
        h = window_key(values, at, length)
        window = self._in_bloom(h)
        key = np.searchsorted(self._keys, h[window]).clip(max=len(self._keys) - 1)
        match = self._keys[key] == h[window]
        doc_key = np.unique(doc[at[window[match]]] * len(self._keys) + key[match])   # distinct per document
        doc_of, key = np.divmod(doc_key, len(self._keys))
        lo, hi = self._key_start[key], self._key_start[key + 1]
        fields = self._key_fields[segment_starts(lo, hi - lo)]
        doc_field, count = np.unique(np.repeat(doc_of, hi - lo) * len(self._length) + fields, return_counts=True)
        doc_of, field = np.divmod(doc_field, len(self._length))
        occurs = count >= self._need[field]
        return zip(doc_of[occurs].tolist(), field[occurs].tolist(), strict=True)

    def _may_hold(self, idx: int, anchor: int, here: set[int]) -> bool:
        """Whether the anchor and the item's supports present anywhere may reach the rule's word count."""
        if self._alone[anchor] or self._unit[anchor]:
            return True
        supports = self._supports[idx]
        total = int(self._length[anchor] + self._length[supports].sum())
        words = int(self._length[anchor]) + sum(int(self._length[s]) for s in supports if s in here)
        return words >= min(self.n, total)


def located(text: str, found: list[tuple[tuple[str, Item], tuple[float, list[tuple[int, int]]]]]) -> list[Hit]:
    """Hits with their word intervals turned into character spans of `text`."""
    if not found:
        return []
    spans = words_with_spans(text)[1]
    return [Hit(bench, item.id, coverage, tuple(merge_spans((spans[a][0], spans[b - 1][1]) for a, b in intervals)))
            for (bench, item), (coverage, intervals) in found]


def merge_spans(spans) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [tuple(s) for s in merged]


def redact(text: str, spans: list[tuple[int, int]]) -> str:
    """Remove the given character spans (merged first)."""
    out, pos = [], 0
    for start, end in merge_spans(spans):
        out.append(text[pos:start])
        pos = end
    out.append(text[pos:])
    return "".join(out)


INDEX_CACHE = ".hatchling/cache/contamination"     # under the project root (git- and DVC-ignored, as .hatchling/)
CACHE_KEEP = 4               # index files kept in the cache directory (the most recently used)
_CACHE_MAGIC = b"hatchling contamination index 1\n"


def index_key(benchmarks: dict[str, list[Item]], n: int, threshold: float) -> str:
    """sha256 of everything a built index depends on (module doc, **Cache**)."""
    h = hashlib.sha256()
    for source in (__file__, textnorm.__file__):
        h.update(Path(source).read_bytes())
    h.update(json.dumps([n, threshold, ALONE_WORDS, RARE_WORDS, UNIT_BITS, sorted(UNIT_BREAKS), MAX_N,
                         EDGE_SLOT_BITS]).encode())
    h.update(json.dumps([[name, [[i.id, i.anchors, i.supports] for i in items]]
                         for name, items in benchmarks.items()]).encode())
    return h.hexdigest()


class CacheError(ValueError):
    """A cached index file that cannot be trusted: not one, truncated, altered, or of another key."""


def write_index(path: Path, key: str, index: ContaminationIndex) -> None:
    """`index` with its key into `path`, atomically: magic, sha256 of the payload, payload (a pickle)."""
    payload = pickle.dumps((key, index), protocol=pickle.HIGHEST_PROTOCOL)
    with atomic_path(path) as tmp:
        tmp.write_bytes(_CACHE_MAGIC + hashlib.sha256(payload).digest() + payload)


def read_index(path: Path, key: str) -> ContaminationIndex:
    """The index cached in `path` under `key`; CacheError when the file is not one intact index of that key."""
    data = Path(path).read_bytes()
    head = len(_CACHE_MAGIC)
    if not data.startswith(_CACHE_MAGIC) or len(data) < head + 32:
        raise CacheError(f"{path}: not a cached contamination index")
    payload = memoryview(data)[head + 32:]
    if hashlib.sha256(payload).digest() != data[head:head + 32]:
        raise CacheError(f"{path}: checksum mismatch (truncated or altered)")
    gc.disable()                  # unpickling many small objects: the collector would walk them over and over
    try:
        stored, index = pickle.loads(payload)
    finally:
        gc.enable()
    if stored != key or not isinstance(index, ContaminationIndex):
        raise CacheError(f"{path}: an index of other sets, params or code")
    return index


def cached_index(benchmarks: dict[str, list[Item]], n: int = 13, threshold: float = 0.5,
                 cache_dir: str | Path | None = None) -> tuple[ContaminationIndex, str]:
    """(the index of `benchmarks`, how it was had: "hit", "built" or "rebuilt: <why the file was not
    used>"). Without `cache_dir`, or with no items, it is built. A cache that cannot be written (a
    read-only or full disk) leaves the build as it is: the cache only saves time. The index's
    ``cached_as`` is (its key, its file) when the file holds it, else None."""
    if cache_dir is None or not any(benchmarks.values()):
        index = ContaminationIndex(benchmarks, n, threshold)
        index.cached_as = None
        return index, "built"
    key = index_key(benchmarks, n, threshold)
    path = Path(cache_dir) / f"{key}.index"
    how = "built"
    if path.exists():
        try:
            index = read_index(path, key)
            with contextlib.suppress(OSError):        # most recently used: pruned last (a read-only cache still serves)
                path.touch()
            index.cached_as = (key, str(path))
            return index, "hit"
        except (CacheError, OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError,
                IndexError, TypeError, ValueError) as error:
            how = f"rebuilt: {error}"
    index = ContaminationIndex(benchmarks, n, threshold)
    index.cached_as = None
    try:
        write_index(path, key, index)
        index.cached_as = (key, str(path))
        for old in sorted(Path(cache_dir).glob("*.index"), key=lambda p: p.stat().st_mtime)[:-CACHE_KEEP]:
            old.unlink(missing_ok=True)
    except OSError:
        pass
    return index, how
