"""Dedup + contamination benchmark on realistic synthetic documents with planted truth.

    python bench/dedup.py [--docs 4000] [--out reports/bench_dedup.json]

Documents (~300 words drawn from a Zipf-distributed vocabulary, like running text) with planted
exact duplicates (case/punctuation changes) and near duplicates at known word-5-gram Jaccard,
plus benchmark items (verbatim and partial) buried in long documents. Reports end-to-end docs/s
(normalization, shingling, MinHash, LSH) with 1 and 2 worker processes (best of --repeats runs,
interleaved; the 2-worker speedup as best/best and as the median over the pairs), near-duplicate
precision and recall against the planted pairs above the threshold, and contamination recall.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from hatchling.data.decontam import ContaminationIndex, Item
from hatchling.data.dedup import deduplicate, iter_signatures
from hatchling.data.textnorm import ngrams, normalize
from hatchling.io import write_jsonl

WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "ve", "zo", "ri", "pu") for b in range(400)]


class Corpus:
    def __init__(self, n_docs: int, seed: int = 0):
        self.rng = random.Random(seed)
        self.weights = [1 / (i + 1) for i in range(len(WORDS))]          # Zipf: a few words are common
        self.docs: list[dict] = []
        self.near_truth: dict[str, str] = {}                               # copy id -> original id
        self.exact_truth: dict[str, str] = {}
        self.items: list[tuple[str, str]] = []
        self.leaks: dict[str, str] = {}                                    # doc id -> item id it contains
        self._build(n_docs)

    def text(self, n: int) -> str:
        return " ".join(self.rng.choices(WORDS, self.weights, k=n))

    def _build(self, n_docs: int) -> None:
        rng = self.rng
        n_orig = int(n_docs * 0.8)
        self.docs = [{"id": f"d{i}", "text": self.text(300)} for i in range(n_orig)]
        for i in range(int(n_docs * 0.05)):
            src = rng.randrange(n_orig)
            self.docs.append({"id": f"x{i}", "text": self.docs[src]["text"].upper().replace(" ", "  ") + "."})
            self.exact_truth[f"x{i}"] = f"d{src}"
        for i in range(n_docs - len(self.docs)):
            src = rng.randrange(n_orig)
            words = self.docs[src]["text"].split()
            for j in rng.sample(range(len(words)), rng.choice([1, 2, 3, 6, 12, 30])):   # J from ~0.98 to ~0.4
                words[j] = rng.choice(WORDS)
            self.docs.append({"id": f"n{i}", "text": " ".join(words)})
            self.near_truth[f"n{i}"] = f"d{src}"
        self.items = [(f"q{i}", self.text(rng.randint(40, 80))) for i in range(50)]   # GSM8K/HumanEval-sized
        for k, (item_id, item) in enumerate(self.items):                 # bury each item in a long page
            words = item.split()
            leak = item if k % 2 == 0 else " ".join(words[: int(len(words) * 0.7)])   # verbatim or partial
            doc = {"id": f"leak{k}", "text": f"{self.text(1500)} {leak} {self.text(1500)}"}
            self.docs.append(doc)
            self.leaks[doc["id"]] = item_id
        rng.shuffle(self.docs)


def jaccard(a: str, b: str, n: int = 5) -> float:
    """True word-n-gram Jaccard on the strings themselves (the ground truth, no hashing)."""
    x, y = set(ngrams(normalize(a).split(), n)), set(ngrams(normalize(b).split(), n))
    return len(x & y) / max(1, len(x | y))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="runs per worker count, interleaved; the best counts")
    ap.add_argument("--out", default="reports/bench_dedup.json")
    args = ap.parse_args()
    corpus = Corpus(args.docs)
    by_id = {d["id"]: d for d in corpus.docs}
    with tempfile.TemporaryDirectory() as tmp:
        shards = []
        for s in range(8):
            path = Path(tmp) / f"shard-{s:05d}.jsonl"
            write_jsonl(path, corpus.docs[s::8])
            shards.append(path)
        timings = {1: [], 2: []}
        for _ in range(args.repeats):            # interleaved, so a noisy neighbour hits both counts alike
            for workers in (1, 2):
                t0 = time.perf_counter()
                result = deduplicate(iter_signatures(shards, 5, args.num_perm, workers), args.threshold,
                                     args.num_perm)
                timings[workers].append(time.perf_counter() - t0)
    # the speedup of each interleaved pair of runs, then their median: a slow spell on this shared
    # VM hits one pair, not the statistic (best/best divides two runs taken at different times)
    paired = statistics.median(one / two for one, two in zip(timings[1], timings[2], strict=True))
    timings = {w: min(t) for w, t in timings.items()}
    near_clusters = [(kept, d) for kept, dups in result.clusters.items() for d in dups
                     if d not in corpus.exact_truth]
    # precision: a removed document is right when it really is above the threshold to the one kept
    correct = sum(jaccard(by_id[d]["text"], by_id[kept]["text"]) >= args.threshold for kept, d in near_clusters)
    precision = correct / max(1, len(near_clusters))
    # recall: planted pairs above the threshold whose two sides ended up in one cluster
    cluster_of = {d: kept for kept, d in near_clusters} | {k: k for k in result.clusters}
    true_pairs = [(c, o) for c, o in corpus.near_truth.items()
                  if jaccard(by_id[c]["text"], by_id[o]["text"]) >= args.threshold]
    found = sum(cluster_of.get(c, c) == cluster_of.get(o, o) for c, o in true_pairs)
    recall = found / max(1, len(true_pairs))
    index = ContaminationIndex({"bench": [Item(i, (text,)) for i, text in corpus.items]}, n=13, threshold=0.5)
    t0 = time.perf_counter()
    caught = {doc_id for doc_id in corpus.leaks if index.scan(by_id[doc_id]["text"])}
    scan_s = time.perf_counter() - t0
    n = len(corpus.docs)
    row = {"docs": n, "docs_per_s_1_worker": round(n / timings[1], 1), "docs_per_s_2_workers": round(n / timings[2], 1),
           "speedup_2_workers": round(paired, 2),
           "speedup_best_of": round(timings[1] / timings[2], 2), "near_dup_pairs_above_threshold": len(true_pairs),
           "near_dup_precision": round(precision, 4), "near_dup_recall": round(recall, 4),
           "exact_dups_found": result.exact_dups, "exact_dups_planted": len(corpus.exact_truth),
           "contamination_recall": round(len(caught) / len(corpus.leaks), 4),
           "contamination_docs_per_s": round(len(corpus.leaks) / scan_s, 1), "cpus": os.cpu_count()}
    for key, value in row.items():
        print(f"{key:32} {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
