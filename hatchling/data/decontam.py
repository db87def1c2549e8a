"""Benchmark contamination: find eval items inside training text by n-gram *containment*.

An item is flagged in a document when the fraction of the item's word n-grams (normalized,
13-grams by default) that occur in the document reaches a threshold. Containment, not Jaccard:
a 40-word question buried in a 3,000-word page has a tiny Jaccard but a containment of 1.
Items shorter than n words are matched whole.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from hatchling.data.textnorm import ngrams, words_with_spans


@dataclass(frozen=True)
class Hit:
    benchmark: str
    item_id: str
    containment: float
    spans: tuple[tuple[int, int], ...]     # character spans in the document that overlap the item


class ContaminationIndex:
    def __init__(self, benchmarks: dict[str, list[tuple[str, str]]], n: int = 13):
        self.n = n
        self.items: list[tuple[str, str, int]] = []           # (benchmark, item id, number of grams)
        self.grams: dict[str, list[int]] = defaultdict(list)
        self.short_lengths: set[int] = set()
        for bench, items in benchmarks.items():
            for item_id, text in items:
                words = words_with_spans(text)[0]
                grams = set(ngrams(words, n))
                if not grams:
                    continue
                if len(words) < n:
                    self.short_lengths.add(len(words))
                idx = len(self.items)
                self.items.append((bench, item_id, len(grams)))
                for g in grams:
                    self.grams[g].append(idx)

    def scan(self, text: str, threshold: float) -> list[Hit]:
        words, spans = words_with_spans(text)
        matched: dict[int, set[str]] = defaultdict(set)
        positions: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for length in {self.n, *self.short_lengths}:
            for i in range(len(words) - length + 1):
                gram = " ".join(words[i:i + length])
                for idx in self.grams.get(gram, ()):
                    matched[idx].add(gram)
                    positions[idx].append((i, i + length))
        hits = []
        for idx, grams in sorted(matched.items()):
            bench, item_id, total = self.items[idx]
            containment = len(grams) / total
            if containment >= threshold:
                char_spans = merge_spans((spans[a][0], spans[b - 1][1]) for a, b in positions[idx])
                hits.append(Hit(bench, item_id, round(containment, 4), tuple(char_spans)))
        return hits


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
