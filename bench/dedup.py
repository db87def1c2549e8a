"""Dedup + contamination benchmark on realistic synthetic documents with planted truth.

    python bench/dedup.py [--docs 4000] [--out reports/bench_dedup.json]
    python bench/dedup.py --docs 12000 --benchmarks     # also with every params.yaml benchmark indexed
    python bench/dedup.py --docs 12000 --benchmarks --baseline aadce63    # and an older tree's dedup

Documents (~300 words drawn from a Zipf-distributed vocabulary, like running text) with planted
exact duplicates (case/punctuation changes) and near duplicates at known word-5-gram Jaccard,
plus benchmark items (verbatim and partial) buried in long documents. Reports end-to-end docs/s
(normalization, shingling, MinHash, LSH) with 1 and 2 worker processes (best of --repeats runs,
interleaved; the 2-worker speedup as best/best and as the median over the pairs), near-duplicate
precision and recall against the planted pairs above the threshold, and contamination recall.

--benchmarks adds runs with the contamination check of the dedup stage in the workers: every
benchmark params.yaml lists indexed (the index read from its cache under .hatchling/cache/, built
on the first run), each document checked as its signature is computed (dedup.signatures with
`scan`). The issue's goal: these runs' per-core rate stays at dedup's own. Every rate is printed as
worst / median / best of the --repeats runs.

--baseline REV compares this tree with the git revision REV on the same shards, interleaved with
the other runs: 1-worker runs of REV's dedup, of this tree's, and with --benchmarks of this tree's
with the check, each in a child process of its own (REV's `hatchling/` extracted to a temporary
directory; a child runs once on one shard to warm up, which also reads the index from its cache
file, then times one whole run). Children, not this process, because this one holds the corpus and
the index: the same code ran up to a quarter slower here than in a fresh process. Machines drift by
tens of percent between days, so an old figure in docs/benchmarks.md says little beside today's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
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


def recorded(signatures, flagged: set):
    """The workers' signatures as they come, adding the ids of the documents they found items in to `flagged`."""
    for sigs in signatures:
        flagged.update(sigs.doc_ids[line] for line in sigs.hits)
        yield sigs


REPO = Path(__file__).resolve().parents[1]

CHILD_RUN = """
import sys, time
from pathlib import Path
import hatchling
from hatchling.data.dedup import deduplicate, iter_signatures
print(hatchling.__file__)
num_perm, threshold, shards = int(sys.argv[1]), float(sys.argv[2]), [Path(p) for p in sys.argv[5:]]
scan = {"scan": (sys.argv[3], sys.argv[4])} if sys.argv[3] != "-" else {}        # (index key, cache file)
deduplicate(iter_signatures(shards[:1], 5, num_perm, 1, **scan), threshold, num_perm)   # warm up, read the index
t0 = time.perf_counter()
deduplicate(iter_signatures(shards, 5, num_perm, 1, **scan), threshold, num_perm)
print(time.perf_counter() - t0)
"""


def child_seconds(tree: Path, shards: list[Path], num_perm: int, threshold: float,
                  scan: tuple[str, str] = ("-", "-")) -> float:
    """Seconds of one 1-worker dedup run (with `scan`: and the check) in a fresh process running the
    code in `tree` (its hatchling/ first on PYTHONPATH; the child says which it imported, checked)."""
    out = subprocess.run([sys.executable, "-c", CHILD_RUN, str(num_perm), str(threshold), *scan, *map(str, shards)],
                         cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the dedup run of {tree} failed:\n{out.stderr}")
    imported, seconds = out.stdout.split()[-2:]
    if not Path(imported).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the run meant for {tree} imported {imported}")
    return float(seconds)


def baseline_tree(rev: str, tmp: Path) -> Path:
    """A directory holding git revision `rev`'s hatchling/ (for ``child_seconds``)."""
    tree = tmp / "baseline"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "hatchling"], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"--baseline {rev}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def jaccard(a: str, b: str, n: int = 5) -> float:
    """True word-n-gram Jaccard on the strings themselves (the ground truth, no hashing)."""
    x, y = set(ngrams(normalize(a).split(), n)), set(ngrams(normalize(b).split(), n))
    return len(x & y) / max(1, len(x | y))


LABELS = {"alone": "", "check": ", all benchmarks", "baseline": ", dedup alone at {}, child",
          "alone, child": ", child", "check, child": ", all benchmarks, child"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="runs per worker count, interleaved; the best counts")
    ap.add_argument("--out", default="reports/bench_dedup.json")
    ap.add_argument("--benchmarks", action="store_true", help="also time with every params.yaml benchmark indexed")
    ap.add_argument("--baseline", metavar="REV", help="also time dedup alone (1 worker) as git revision REV wrote it")
    args = ap.parse_args()
    configs = [(1, "alone"), (2, "alone")]
    scan = None
    if args.benchmarks:
        from hatchling.config import load_params
        from hatchling.data.benchmarks import load_benchmarks
        from hatchling.data.decontam import INDEX_CACHE, cached_index
        from hatchling.data.dedup import shared_index
        params = load_params("params.yaml", [])
        t0 = time.perf_counter()
        index, how = cached_index(load_benchmarks(params.benchmarks)[0], params.contamination.ngram,
                                  params.contamination.threshold, INDEX_CACHE)
        print(f"index of {len(index.items)} items: {how} in {time.perf_counter() - t0:.2f} s (load the sets + index)")
        if args.baseline and index.cached_as is None:
            raise SystemExit(f"--baseline: the index could not be cached under {INDEX_CACHE} (a child reads it there)")
        scan = shared_index(index, *index.cached_as or ("unsaved", "")).__enter__()    # for the whole run
        configs += [(1, "check"), (2, "check")]
    if args.baseline:
        configs += [(1, "baseline"), (1, "alone, child")] + ([(1, "check, child")] if args.benchmarks else [])
    corpus = Corpus(args.docs)
    by_id = {d["id"]: d for d in corpus.docs}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            tree = baseline_tree(args.baseline, Path(tmp))
        shards = []
        for s in range(8):
            path = Path(tmp) / f"shard-{s:05d}.jsonl"
            write_jsonl(path, corpus.docs[s::8])
            shards.append(path)
        timings = {config: [] for config in configs}
        flagged = set()
        for r in range(args.repeats):            # interleaved, rotating, so a noisy neighbour hits all alike
            for workers, kind in configs[r % len(configs):] + configs[:r % len(configs)]:
                if kind == "baseline" or kind.endswith("child"):
                    timings[workers, kind].append(child_seconds(
                        tree if kind == "baseline" else REPO, shards, args.num_perm, args.threshold,
                        *((scan,) if kind == "check, child" else ())))
                    continue
                t0 = time.perf_counter()
                if kind == "check":
                    flagged = set()
                    deduplicate(recorded(iter_signatures(shards, 5, args.num_perm, workers, scan=scan), flagged),
                                args.threshold, args.num_perm)
                else:
                    result = deduplicate(iter_signatures(shards, 5, args.num_perm, workers), args.threshold,
                                         args.num_perm)
                timings[workers, kind].append(time.perf_counter() - t0)
    # the speedup of each interleaved pair of runs, then their median: a slow spell on this shared
    # VM hits one pair, not the statistic (best/best divides two runs taken at different times)
    paired = statistics.median(one / two for one, two in zip(timings[1, "alone"], timings[2, "alone"], strict=True))
    spread = {key: " / ".join(f"{len(corpus.docs) / t:,.0f}" for t in (max(ts), statistics.median(ts), min(ts)))
              for key, ts in timings.items()}
    medians = {key: statistics.median(ts) for key, ts in timings.items()}
    timings = {w: min(timings[w, "alone"]) for w in (1, 2)} | {key: min(ts) for key, ts in timings.items()}
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
           "contamination_docs_per_s": round(len(corpus.leaks) / scan_s, 1), "cpus": os.cpu_count(),
           **{f"docs_per_s_{w}_worker{'s' if w > 1 else ''}{LABELS[kind].format(args.baseline)}"
              " (worst / median / best)": v for (w, kind), v in spread.items()}}
    if args.benchmarks:
        row |= {"docs_per_s_1_worker_all_benchmarks": round(n / timings[1, "check"], 1),
                "docs_per_s_2_workers_all_benchmarks": round(n / timings[2, "check"], 1),
                "docs_flagged_all_benchmarks": len(flagged),
                "median_1_worker_all_benchmarks_over_alone": round(medians[1, "alone"] / medians[1, "check"], 3)}
    if args.baseline:             # fresh processes alike (module doc)
        row |= {"baseline": args.baseline,
                "median_1_worker_over_baseline": round(medians[1, "baseline"] / medians[1, "alone, child"], 3)}
        if args.benchmarks:
            row |= {"median_1_worker_all_benchmarks_over_baseline":
                    round(medians[1, "baseline"] / medians[1, "check, child"], 3),
                    "median_1_worker_all_benchmarks_over_alone, children":
                    round(medians[1, "alone, child"] / medians[1, "check, child"], 3)}
    for key, value in row.items():
        print(f"{key:32} {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
