"""Stage `dedup`: exact + near-duplicate removal and the benchmark-contamination check.

The check's index comes from its cache when the sets, params and code are unchanged
(decontam.cached_index). With the local runner each dedup worker checks its shard's documents on
the words it normalizes and hashes for MinHash (dedup.signatures); the hits of the kept documents are used
when they are written. On a cluster runner the check runs here, after dedup, on the kept ones.

Reads the crawl shards (and .txt documents), writes cleaned shards (same paths, same schema; a .txt as
a one-document .jsonl) to data/dedup, and reports to reports/dedup.json (metrics; `index`: whether the
benchmark index came from its cache under .hatchling/cache/, decontam.cached_index), reports/dedup.md
(largest clusters, quoted overlaps) and reports/contamination.json (per benchmark: items found and their
ids, documents affected, action).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from hatchling.data.benchmarks import load_benchmarks
from hatchling.data.corpus import corpus_files, read_documents
from hatchling.data.decontam import INDEX_CACHE, ContaminationIndex, Hit, cached_index, redact
from hatchling.data.dedup import deduplicate, iter_signatures, shared_index
from hatchling.errors import InputError, MissingInputError
from hatchling.io import atomic_path, atomic_write_json, atomic_write_text, sha1_text, write_jsonl

SCAN_BATCH = 256        # documents the contamination check hashes at once (numpy work per batch, not per page)


def scanned(index: ContaminationIndex, docs: Iterator[dict]) -> Iterator[tuple[dict, list[Hit]]]:
    """Each document with the eval items found in it, hashed SCAN_BATCH documents at a time."""
    while batch := list(itertools.islice(docs, SCAN_BATCH)):
        yield from zip(batch, index.scan_batch([d["text"] for d in batch]), strict=True)


def run(ctx) -> dict:
    p = ctx.params.dedup
    t0 = time.perf_counter()
    shards = corpus_files(ctx.inputs.crawl)
    if not shards:
        raise MissingInputError(f"no corpus files (JSONL shards, .txt documents) in {ctx.inputs.crawl}")
    written = shard_names(shards, ctx.inputs.crawl)
    workers = p.workers or os.cpu_count() or 1
    benchmarks, status = load_benchmarks(ctx.params.benchmarks, ctx.root)
    c = ctx.params.contamination
    t_index = time.perf_counter()
    index, index_how = cached_index(benchmarks, c.ngram, c.threshold, ctx.root / INDEX_CACHE)
    t_index = time.perf_counter() - t_index
    # Local workers check each document for contamination as they hash it (on the words they just
    # normalized, in parallel; forked, they inherit the index). A cluster's workers may not see the
    # cache file: there the check runs here, after dedup, on the kept documents. With no benchmark
    # there is nothing to check.
    in_workers = p.scale.runner == "local" and bool(index.items)
    hits: dict[str, dict[int, list[Hit]]] = {}

    def keeping_hits(stream):
        for sigs in stream:
            hits[sigs.shard] = sigs.hits
            yield sigs

    t_dedup = time.perf_counter()
    with shared_index(index, *index.cached_as or (f"unsaved-{id(index)}", "")) if in_workers \
            else contextlib.nullcontext() as scan:
        sigs = iter_signatures(shards, p.shingle, p.num_perm, workers, p.scale.runner, p.scale.address, scan)
        result = deduplicate(keeping_hits(sigs), p.threshold, p.num_perm)
    if not result.docs_in:
        raise InputError(f"the shards in {ctx.inputs.crawl} hold no documents")
    t_dedup = time.perf_counter() - t_dedup
    per_bench = {name: {"status": s, "items": len(benchmarks.get(name, [])), "items_found": set(),
                        "documents_affected": 0, "action": c.action} for name, s in status.items()}
    quotes, kept_docs, dropped, redacted = [], 0, 0, 0
    with atomic_path(ctx.outputs.dedup) as tmp:
        tmp.mkdir()
        for shard, name in zip(shards, written, strict=True):    # read again: workers return signatures, not texts
            kept = ((line, doc) for line, doc in enumerate(read_documents(shard)) if result.kept(str(shard), line))
            found = hits.get(str(shard), {})
            pairs = ((doc, found.get(line, [])) for line, doc in kept) if in_workers or not index.items \
                else scanned(index, (doc for _, doc in kept))
            out = []
            for doc, doc_hits in pairs:
                for bench in {h.benchmark for h in doc_hits}:
                    per_bench[bench]["documents_affected"] += 1
                for h in doc_hits:
                    per_bench[h.benchmark]["items_found"].add(h.item_id)
                    quotes.append((doc.get("id", "?"), h, doc["text"][h.spans[0][0]:h.spans[0][1]]))
                if doc_hits and c.action == "drop":
                    dropped += 1
                    continue
                if doc_hits and c.action == "redact":
                    text = redact(doc["text"], [s for h in doc_hits for s in h.spans])
                    doc = {**doc, "text": text, "sha1": sha1_text(text)}
                    redacted += 1
                out.append(doc)
            kept_docs += len(out)
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(tmp / name, out)

    for info in per_bench.values():         # the ids let the eval score the items no page held
        info["found_ids"] = sorted(info["items_found"])
        info["items_found"] = len(info["found_ids"])
    seconds = time.perf_counter() - t0
    metrics = {"docs_in": result.docs_in, "exact_dups": result.exact_dups, "near_dups": result.near_dups,
               "clusters": len(result.clusters), "kept": kept_docs, "contaminated_dropped": dropped,
               "contaminated_redacted": redacted, "dedup_seconds": round(t_dedup, 3), "seconds": round(seconds, 3),
               "docs_per_s": round(result.docs_in / max(t_dedup, 1e-9), 1), "workers": workers,
               "index_seconds": round(t_index, 3), "index": index_how}
    atomic_write_json(ctx.outputs.contamination, per_bench)
    atomic_write_text(ctx.outputs.report, markdown_report(metrics, result.clusters, per_bench, quotes))
    return metrics


def shard_names(files: list[Path], crawl: Path) -> list[str]:
    """Where each corpus file's kept documents go under data/dedup: its path under data/crawl as a JSONL
    shard (a .txt document becomes a one-document shard); an InputError where two files would share one."""
    names = [Path(f).relative_to(crawl).with_suffix(".jsonl").as_posix() for f in files]
    if clash := next((n for n, count in Counter(names).items() if count > 1), None):
        both = [str(f) for f, n in zip(files, names, strict=True) if n == clash]
        raise InputError(f"{' and '.join(both)} would both be written to data/dedup/{clash}: rename one")
    return names


def markdown_report(metrics: dict, clusters: dict, per_bench: dict, quotes: list, top: int = 10) -> str:
    lines = ["# Dedup and contamination report", "",
             "| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in metrics.items()), "",
             f"## Largest duplicate clusters (top {top})", ""]
    largest = sorted(clusters.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]
    lines += [f"- `{kept}` kept; {len(dups)} removed: " + ", ".join(f"`{d}`" for d in dups[:8])
              + (" …" if len(dups) > 8 else "") for kept, dups in largest] or ["(none)"]
    lines += ["", "## Contamination", "", "| benchmark | status | items | items found | documents | action |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {b} | {i['status']} | {i['items']} | {i['items_found']} | {i['documents_affected']} | {i['action']} |"
              for b, i in per_bench.items()]
    lines += ["", "### Overlapping spans", ""]
    lines += [f"- `{doc}` ⟷ {h.benchmark} `{h.item_id}` (coverage {h.coverage}): “{quote[:300]}”"
              for doc, h, quote in quotes[:50]] or ["(none)"]
    return "\n".join(lines) + "\n"
