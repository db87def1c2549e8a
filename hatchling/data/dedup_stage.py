"""Stage `dedup`: exact + near-duplicate removal, then the benchmark-contamination check.

Reads the crawl shards, writes cleaned shards (same names, same schema) to data/dedup, and
reports to reports/dedup.json (metrics), reports/dedup.md (largest clusters, quoted overlaps)
and reports/contamination.json (per benchmark: items found and their ids, documents affected, action).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator

from hatchling.data.benchmarks import load_benchmarks
from hatchling.data.corpus import corpus_files
from hatchling.data.decontam import ContaminationIndex, Hit, redact
from hatchling.data.dedup import deduplicate, iter_signatures
from hatchling.errors import InputError, MissingInputError
from hatchling.io import atomic_path, atomic_write_json, atomic_write_text, read_jsonl, sha1_text, write_jsonl

SCAN_BATCH = 256        # documents the contamination check hashes at once (numpy work per batch, not per page)


def scanned(index: ContaminationIndex, docs: Iterator[dict]) -> Iterator[tuple[dict, list[Hit]]]:
    """Each document with the eval items found in it, hashed SCAN_BATCH documents at a time."""
    while batch := list(itertools.islice(docs, SCAN_BATCH)):
        yield from zip(batch, index.scan_batch([d["text"] for d in batch]), strict=True)


def run(ctx) -> dict:
    p = ctx.params.dedup
    t0 = time.perf_counter()
    shards = [f for f in corpus_files(ctx.inputs.crawl) if f.suffix == ".jsonl"]
    if not shards:
        raise MissingInputError(f"no JSONL shards in {ctx.inputs.crawl}")
    workers = p.workers or os.cpu_count() or 1
    sigs = iter_signatures(shards, p.shingle, p.num_perm, workers, p.scale.runner, p.scale.address)
    result = deduplicate(sigs, p.threshold, p.num_perm)
    if not result.docs_in:
        raise InputError(f"the shards in {ctx.inputs.crawl} hold no documents")
    t_dedup = time.perf_counter() - t0

    benchmarks, status = load_benchmarks(ctx.params.benchmarks, ctx.root)
    c = ctx.params.contamination
    index = ContaminationIndex(benchmarks, c.ngram, c.threshold)
    per_bench = {name: {"status": s, "items": len(benchmarks.get(name, [])), "items_found": set(),
                        "documents_affected": 0, "action": c.action} for name, s in status.items()}
    quotes, kept_docs, dropped, redacted = [], 0, 0, 0
    with atomic_path(ctx.outputs.dedup) as tmp:
        tmp.mkdir()
        for shard in shards:     # read again here: workers return signatures only, never the texts
            kept = (doc for line, doc in enumerate(read_jsonl(shard)) if result.kept(str(shard), line))
            out = []
            for doc, hits in scanned(index, kept):
                for bench in {h.benchmark for h in hits}:
                    per_bench[bench]["documents_affected"] += 1
                for h in hits:
                    per_bench[h.benchmark]["items_found"].add(h.item_id)
                    quotes.append((doc.get("id", "?"), h, doc["text"][h.spans[0][0]:h.spans[0][1]]))
                if hits and c.action == "drop":
                    dropped += 1
                    continue
                if hits and c.action == "redact":
                    text = redact(doc["text"], [s for h in hits for s in h.spans])
                    doc = {**doc, "text": text, "sha1": sha1_text(text)}
                    redacted += 1
                out.append(doc)
            kept_docs += len(out)
            write_jsonl(tmp / shard.name, out)

    for info in per_bench.values():         # the ids let the eval score the items no page held
        info["found_ids"] = sorted(info["items_found"])
        info["items_found"] = len(info["found_ids"])
    seconds = time.perf_counter() - t0
    metrics = {"docs_in": result.docs_in, "exact_dups": result.exact_dups, "near_dups": result.near_dups,
               "clusters": len(result.clusters), "kept": kept_docs, "contaminated_dropped": dropped,
               "contaminated_redacted": redacted, "dedup_seconds": round(t_dedup, 3), "seconds": round(seconds, 3),
               "docs_per_s": round(result.docs_in / max(t_dedup, 1e-9), 1), "workers": workers}
    atomic_write_json(ctx.outputs.contamination, per_bench)
    atomic_write_text(ctx.outputs.report, markdown_report(metrics, result.clusters, per_bench, quotes))
    return metrics


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
