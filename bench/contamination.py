"""Planted-leak benchmark of the contamination check (hatchling/data/decontam.py) on the shipped eval sets.

    python bench/contamination.py [--items 40] [--seed 0] [--set KEY=VALUE ...] [--out reports/bench_contamination.json]
    python bench/contamination.py --calibrate      # the probe behind decontam.UNIT_BITS, then exit
    python bench/contamination.py --stage [--docs 12000] [--repeats 3]     # the dedup stage's rate, then exit
    python bench/contamination.py --baseline aadce63     # also dedup on the prose pages as REV ran it

Every benchmark that params.yaml lists and that has data. Per benchmark, --items items are drawn
(seeded) as leaks and --items more as look-alikes:

- leaks: items in the index, each printed in every form it leaks in (verbatim; choices labelled
  "(A) ..."; choices shuffled "A. ..."; the question alone, without choices or answer — for
  HumanEval the prompt without its solution; WinoGrande's sentence and HellaSwag's context with the
  right answer filled in), each form once as is and once with case, whitespace and punctuation
  noise;
- look-alikes: items held out of the index together with every item sharing their question,
  story or passage (or their WinoGrande twin), printed in the same forms: same topics, same
  templates, different items. Besides them, every GSM8K *train* problem with its solution (against
  GSM8K test in the index) and plain pages.

Each plant is buried at a random place in a page of real prose: the pydoc text of the standard
library modules the crawl's pydoc mirror serves (params crawl.pydoc_modules). Reports recall per
form, per benchmark and by question length, every false positive, and the index's build time and
scan rate on 300-word pages (bench/dedup.py's page size) beside dedup's own per-core rate on them.

The sample weighs every set alike with --items items, so a set of short questions (PIQA's goals,
OpenBookQA's sentence stems) moves the question-only rate by a few items. The census after it
counts every item instead: each item's question alone (HumanEval: its prompt), as is and noisy, in a
page of its own, against the index of every item as the dedup stage builds it.

--calibrate runs the probe that sets decontam.UNIT_BITS instead: every short anchor of one item in
the index of all items, searched in the text of every other item's fields (the shipped sets'
questions, passages, WikiHow and ActivityNet contexts, choices, solutions); those it finds standing
as a line or sentence there are ordinary text of that size and information, so UNIT_BITS must lie
above the most informative of them. Its table lists them, most bits first.

--baseline REV adds, on the same prose pages, 1-worker runs of REV's dedup alone, of this tree's and
of this tree's with the check (the index read from its cache file), each in a fresh child process,
in rotating order (bench/dedup.py's --baseline, which does the same on its synthetic corpus).

--stage times the dedup stage itself (hatchling/data/dedup_stage.py, 1 worker: read, dedup, then
the check on the kept documents and the write) on bench/dedup.py's corpus (--docs documents of ~300
words in 8 shards), with none of the benchmarks indexed, with every one params.yaml lists indexed
and the index built (its cache emptied first), and with them all indexed and the index read from
its cache (decontam.cached_index), the three in rotating order --repeats times: documents per second
per core, and where the seconds go (dedup, loading the benchmarks, the index build or cache read,
reading the kept documents again with the scan).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import pydoc
import random
import shutil
import statistics
import sys
import tempfile
import time
import unicodedata
from collections import defaultdict
from pathlib import Path

from hatchling.config import load_params
from hatchling.data.benchmarks import SCHEMAS, item_fields, load_benchmarks, load_records
from hatchling.data.decontam import INDEX_CACHE, UNIT_BITS, ContaminationIndex, Item, Page, cached_index, word_hashes
from hatchling.data.dedup import deduplicate, iter_signatures
from hatchling.data.textnorm import ngrams, normalized_words
from hatchling.io import write_jsonl

LETTERS = "ABCDE"


def choices(schema: str, r: dict) -> tuple[list[str], list[str], int] | None:
    """(the prompt's parts, the choices, the gold index) of a multiple-choice item, else None."""
    if schema == "arc":
        return [r["question"]], r["choices"], r["label"]
    if schema == "piqa":
        return [r["goal"]], [r["sol1"], r["sol2"]], r["label"]
    if schema == "siqa":
        return [r["context"], r["question"]], r["answers"], r["label"]
    if schema == "hellaswag":
        return [r["query"]], r["endings"], r["label"]
    if schema == "winogrande":
        return [r["sentence"]], [r["option1"], r["option2"]], r["label"]
    return None


def leak_forms(schema: str, r: dict, rng: random.Random) -> dict[str, str]:
    """The ways item `r` is printed on pages, by form name."""
    mc = choices(schema, r)
    if mc:
        prompt, options, gold = mc
        order = rng.sample(range(len(options)), len(options))
        forms = {
            "verbatim": "\n".join([*prompt, *options, f"Answer: {options[gold]}"]),
            "labelled": "\n".join([*prompt, " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options)),
                                   f"Answer: ({LETTERS[gold]})"]),
            "reordered": "\n".join([*prompt, *(f"{LETTERS[i]}. {options[j]}" for i, j in enumerate(order)),
                                    f"Answer: {LETTERS[order.index(gold)]}"]),
            "question_only": "\n".join(prompt),
        }
        if schema == "winogrande":
            forms["filled"] = r["sentence"].replace("_", options[gold])
        if schema == "hellaswag":
            forms["filled"] = f"{r['query']} {options[gold]}"
        return forms
    if schema == "boolq":
        return {"verbatim": f"{r['passage']}\n{r['question']}?\nAnswer: {'yes' if r['label'] else 'no'}",
                "question_only": f"{r['passage']}\n{r['question']}?"}
    if schema == "gsm8k":
        return {"verbatim": f"{r['question']}\n{r['answer']}", "question_only": r["question"]}
    if schema == "humaneval":
        return {"verbatim": r["prompt"] + r["canonical_solution"], "prompt_only": r["prompt"]}
    raise ValueError(f"no leak forms for schema {schema!r}")


def noisy(text: str, rng: random.Random) -> str:
    """`text` as a page might reprint it: words' case changed, punctuation (Unicode's P* characters,
    what normalization removes) dropped or added at word ends, quotes curled, whitespace redone."""
    out = []
    for word in text.split():
        word = rng.choice([str.lower, str.upper, str.title, str])(word)
        if rng.random() < 0.3:
            word = "".join(ch for ch in word if not unicodedata.category(ch).startswith("P")) or word
        if rng.random() < 0.15:
            word += rng.choice(",.;:!?")
        out.append(word.replace("'", "\u2019").replace('"', "\u201c"))
        out.append(rng.choice([" ", " ", " ", "  ", "\n", "\t", " \n "]))
    return "".join(out).strip()


def groups(schema: str, records: list[dict], n: int) -> list[int]:
    """A group number per record: records sharing text are held out together — an n-gram (or the
    whole, when shorter) of a question, story, passage or context (ARC's reworded duplicates,
    SIQA's shared stories, HellaSwag's contexts that continue one another), or WinoGrande's twins."""
    parent = list(range(len(records)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, r in enumerate(records):
        keys = [r["id"].rsplit("-", 1)[0]] if schema == "winogrande" else []
        for anchor in item_fields(schema, r)[0]:
            keys += ngrams(normalized_words(anchor), n)
        for key in keys:
            parent[root(i)] = root(first.setdefault(key, i))
    return [root(i) for i in range(len(records))]


def prose(modules: list[str]) -> list[str]:
    """The words of the pydoc pages of `modules` (pydoc's plain-text rendering)."""
    words = []
    for module in modules:
        words += pydoc.render_doc(importlib.import_module(module), renderer=pydoc.plaintext).split()
    return words


class Pages:
    """Pages of real prose with a plant buried at a random place."""

    def __init__(self, words: list[str], rng: random.Random):
        self.words, self.rng = words, rng

    def text(self, n: int) -> str:
        start = self.rng.randrange(len(self.words) - n)
        return " ".join(self.words[start:start + n])

    def page(self, plant: str = "", words: tuple[int, int] = (100, 1500)) -> str:
        parts = [self.text(self.rng.randint(*words)), plant, self.text(self.rng.randint(*words))]
        return "\n\n".join(p for p in parts if p)


def plants(name: str, schema: str, records: list[dict], rng: random.Random) -> list[dict]:
    """Every form of every record, as is and with noise: {benchmark, id, form, noise, text}."""
    out = []
    for r in records:
        for form, text in leak_forms(schema, r, rng).items():
            out.append({"benchmark": name, "id": r["id"], "form": form, "noise": False, "text": text})
            out.append({"benchmark": name, "id": r["id"], "form": form, "noise": True, "text": noisy(text, rng)})
    return out


def census(sets: dict[str, list[dict]], everything: dict[str, list[Item]], pages: Pages, params) -> dict:
    """Recall of the question alone (HumanEval: the prompt alone) over every item of every set, as is
    and with noise, each buried in a page of 50-300 words of prose on either side, scanned against the
    index of every item (as the dedup stage builds it). The sample weighs each set alike with --items
    items; this counts every item: {benchmark: {"as is"/"noisy": [caught, items]}, "missed": ...}."""
    index = ContaminationIndex(everything, params.contamination.ngram, params.contamination.threshold)
    plants = []
    for name, records in sets.items():
        for r in records:
            forms = leak_forms(SCHEMAS[name], r, pages.rng)
            text = forms.get("question_only", forms.get("prompt_only"))
            plants += [(name, r["id"], "as is", text), (name, r["id"], "noisy", noisy(text, pages.rng))]
    hits = scan_all(index, [pages.page(text, (50, 300)) for *_, text in plants])
    out: dict = defaultdict(lambda: {"as is": [0, 0], "noisy": [0, 0]})
    missed = []
    for (name, item, noise, text), found in zip(plants, hits, strict=True):
        caught = any(h.benchmark == name and h.item_id == item for h in found)
        out[name][noise][0] += caught
        out[name][noise][1] += 1
        if not caught and noise == "as is":
            missed.append({"benchmark": name, "id": item, "text": text})
    return {**dict(sorted(out.items())), "missed": missed}


def scan_all(index: ContaminationIndex, texts: list[str], batch: int = 256, words: list[list[str]] | None = None,
             hashes: list | None = None) -> list[list]:
    hits = []
    for i in range(0, len(texts), batch):
        part = slice(i, i + batch)
        hits += index.scan_batch(texts[part], None if words is None else words[part],
                                 None if hashes is None else hashes[part])
    return hits


def throughput(index_of, items: dict[str, list[Item]], words: list[str], repeats: int, params,
               baseline: str | None = None) -> dict:
    """Index build seconds (all items) and scan rate on 300-word pages, with dedup's rate (1 worker) on them.
    The scan is timed as the dedup workers run it: on the pages' normalized words and their hashes,
    which dedup computes for its shingles anyway. With `baseline` (a git revision), also the module
    doc's child runs (``baseline_children``)."""
    builds, scans, dedups = [], [], []
    docs = [" ".join(words[i:i + 300]) for i in range(0, len(words) - 300, 300)]
    page_words = [normalized_words(d) for d in docs]
    page_hashes = [word_hashes(w) for w in page_words]
    c, d = params.contamination, params.dedup
    with tempfile.TemporaryDirectory() as tmp:
        shards = []
        for s in range(8):
            shards.append(Path(tmp) / f"shard-{s:05d}.jsonl")
            write_jsonl(shards[-1], [{"id": f"d{i}", "text": t} for i, t in enumerate(docs[s::8])])
        for _ in range(repeats):             # interleaved, so a noisy neighbour hits all three alike
            t0 = time.perf_counter()
            index = index_of(items, c.ngram, c.threshold)
            builds.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            found = sum(map(bool, scan_all(index, docs, words=page_words, hashes=page_hashes)))
            scans.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            deduplicate(iter_signatures(shards, d.shingle, d.num_perm, 1), d.threshold, d.num_perm)
            dedups.append(time.perf_counter() - t0)
        children = baseline_children(baseline, shards, len(docs), 3 * repeats, params) if baseline else {}
    scan, dedup = len(docs) / min(scans), len(docs) / min(dedups)
    return children | {"items_indexed": sum(map(len, items.values())), "index_build_s": round(min(builds), 2),
            "pages": len(docs), "words_per_page": 300, "pages_flagged": found,
            "scan_inputs": "normalized words and their hashes at hand, as in the dedup workers",
            "scan_pages_per_s": round(scan), "scan_words_per_s": round(300 * scan),
            "dedup_pages_per_s_1_worker": round(dedup), "dedup_and_scan_pages_per_s": round(1 / (1 / scan + 1 / dedup)),
            "cpus": os.cpu_count()}


def baseline_children(rev: str, shards: list[Path], pages: int, repeats: int, params) -> dict:
    """Pages/s (worst / median / best) of 1-worker dedup on `shards` in fresh children: as git revision
    `rev` ran it, as this tree runs it, and with the check of every params.yaml benchmark."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # the repo root, when run as a script
    from bench.dedup import REPO, baseline_tree, child_seconds

    d = params.dedup
    index = cached_index(load_benchmarks(params.benchmarks)[0], params.contamination.ngram,
                         params.contamination.threshold, INDEX_CACHE)[0]
    if index.cached_as is None:
        raise SystemExit(f"--baseline: the index could not be cached under {INDEX_CACHE}")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {f"dedup alone at {rev}": (baseline_tree(rev, Path(tmp)), ("-", "-")),
                "dedup alone": (REPO, ("-", "-")),
                "dedup + check": (REPO, (index.cached_as[0], str(index.cached_as[1])))}
        seconds = {name: [] for name in runs}
        names = list(runs)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                tree, scan = runs[name]
                seconds[name].append(child_seconds(tree, shards, d.num_perm, d.threshold, scan))
    median = {name: statistics.median(ts) for name, ts in seconds.items()}
    rates = {f"children: {name}, pages/s (worst / median / best)":
             " / ".join(f"{pages / t:,.0f}" for t in (max(ts), median[name], min(ts))) for name, ts in seconds.items()}
    check = median["dedup + check"]
    return rates | {f"children: dedup + check / dedup alone at {rev} (medians)": round(median[names[0]] / check, 3),
                    "children: dedup + check / dedup alone (medians)": round(median["dedup alone"] / check, 3)}


def calibrate(items: dict[str, list[Item]], n: int) -> list[dict]:
    """Each short anchor of one item (with its information, ``ContaminationIndex.bits``) found standing
    as a line or sentence in the field text of another item, once per anchor and holding benchmark."""
    index = ContaminationIndex(items, n)
    owner: dict[str, tuple[str, str]] = {}
    for bench, item in index.items:
        for anchor in item.anchors:
            owner.setdefault(" ".join(normalized_words(anchor)), (bench, item.id))
    users: dict[str, set[tuple[str, str]]] = defaultdict(set)             # raw field text -> the items using it
    for bench, item in index.items:
        for text in item.anchors + item.supports:
            users[text].add((bench, item.id))
    texts = list(users)
    probe = ContaminationIndex({"probe": [Item(a, (a,)) for a in index.bits]}, n)
    found: dict[tuple[str, str], dict] = {}
    for text, hits in zip(texts, scan_all(probe, texts), strict=True):
        page = Page(normalized_words(text), n, text)
        for h in hits:
            anchor = h.item_id
            if not users[text] - {owner[anchor]}:
                continue
            words = anchor.split()
            if not any(page.stands(a, b) for a, b in page.occurrences(words, 1.0)):
                continue
            holders = sorted({b for b, _ in users[text] - {owner[anchor]}})
            for holder in holders:
                found.setdefault((anchor, holder), {
                    "bits": round(index.bits[anchor], 2), "anchor": anchor, "benchmark": owner[anchor][0],
                    "item": owner[anchor][1], "in": holder, "text": text[:200]})
    return sorted(found.values(), key=lambda r: -r["bits"])


def stage_throughput(params, docs: int, repeats: int) -> dict:
    """The dedup stage's seconds on bench/dedup.py's corpus, with all benchmarks indexed and with none."""
    from hatchling.context import Declared
    from hatchling.data import dedup_stage
    from hatchling.stages import context

    spec = importlib.util.spec_from_file_location("bench_dedup", Path(__file__).with_name("dedup.py"))
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    documents = corpus.Corpus(docs).docs
    timed: dict[str, float] = {}

    def timing(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            timed[name] = timed.get(name, 0.0) + time.perf_counter() - t0
            return out
        return wrapper

    untimed = dedup_stage.scanned

    def scanned(index, kept):          # the stage's generator, timed: reading the kept documents, the scan
        it = untimed(index, kept)
        while True:
            t0 = time.perf_counter()
            try:
                pair = next(it)
            except StopIteration:
                return
            finally:
                timed["scan"] = timed.get("scan", 0.0) + time.perf_counter() - t0
            yield pair

    rows: dict[str, list[dict]] = {"none": [], "all, cold": [], "all, cached": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data/crawl").mkdir(parents=True)
        for s in range(8):
            write_jsonl(root / f"data/crawl/shard-{s:05d}.jsonl", documents[s::8])
        (root / "data/benchmarks").symlink_to(Path("data/benchmarks").resolve())
        p = params.model_copy(update={"dedup": params.dedup.model_copy(update={"workers": 1})})
        full = context("dedup", p, root)
        values = {name: getattr(full.params, name) for name in ("dedup", "contamination", "benchmarks")}
        none = dataclasses.replace(full, params=Declared("dedup", "params section", {**values, "benchmarks": {}}))
        original = dedup_stage.cached_index, dedup_stage.scanned, dedup_stage.load_benchmarks
        dedup_stage.cached_index, dedup_stage.scanned = timing("build", dedup_stage.cached_index), scanned
        dedup_stage.load_benchmarks = timing("load", dedup_stage.load_benchmarks)
        runs = [("none", none), ("all, cold", full), ("all, cached", full)]
        try:
            for r in range(repeats):
                for name, ctx in runs[r % 3:] + runs[:r % 3]:      # the order rotates: a slow spell hits all alike
                    if name == "all, cold":
                        shutil.rmtree(root / INDEX_CACHE, ignore_errors=True)
                    timed.clear()
                    t0 = time.perf_counter()
                    metrics = dedup_stage.run(ctx)
                    total = time.perf_counter() - t0
                    if name == "all, cached" and metrics["index"] != "hit":        # the first: nothing cached yet
                        shutil.rmtree(root / INDEX_CACHE, ignore_errors=True)
                        name = "all, cold"
                    rows[name].append({"seconds": total, "dedup": metrics["dedup_seconds"], "load": timed["load"],
                                       "build": timed["build"],
                                       "scan": timed.get("scan"), "docs": metrics["docs_in"], "kept": metrics["kept"],
                                       "where": "parent" if "scan" in timed else "-" if name == "none" else "workers"})
        finally:
            dedup_stage.cached_index, dedup_stage.scanned, dedup_stage.load_benchmarks = original
    out = {}
    for name, runs in rows.items():
        if not runs:
            continue
        per_s = sorted(r["docs"] / r["seconds"] for r in runs)
        out[name] = {"docs": runs[0]["docs"], "kept": runs[0]["kept"],
                     "stage_docs_per_s": [round(x) for x in per_s],
                     "stage_less_load_and_build_docs_per_s": sorted(
                         round(r["docs"] / (r["seconds"] - r["load"] - r["build"])) for r in runs),
                     "load_s": sorted(round(r["load"], 2) for r in runs),
                     "dedup_s": sorted(round(r["dedup"], 2) for r in runs),
                     "index_s (build or cache read)": sorted(round(r["build"], 2) for r in runs),
                     "write_pass_s (read kept, [scan,] write)": sorted(
                         round(r["seconds"] - r["dedup"] - r["load"] - r["build"], 2) for r in runs),
                     "check_in": sorted({r["where"] for r in runs})}
    return out


def rate(hits: int, total: int) -> str:
    return f"{hits}/{total} ({100 * hits / max(1, total):.1f}%)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=40, help="leaked items and look-alike items per benchmark")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timing runs (the best counts)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params override")
    ap.add_argument("--out", default="reports/bench_contamination.json")
    ap.add_argument("--calibrate", action="store_true", help="run the probe behind decontam.UNIT_BITS and exit")
    ap.add_argument("--stage", action="store_true", help="time the dedup stage with and without benchmarks, exit")
    ap.add_argument("--docs", type=int, default=12000, help="--stage: bench/dedup.py's corpus size")
    ap.add_argument("--baseline", metavar="REV", help="also time dedup on the prose pages as git revision REV ran it")
    args = ap.parse_args()
    params = load_params("params.yaml", args.set)
    c = params.contamination
    if args.stage:
        result = stage_throughput(params, args.docs, args.repeats)
        for name, row in result.items():
            print(f"benchmarks indexed: {name}")
            for key, value in row.items():
                print(f"  {key:32} {value}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
        return
    if args.calibrate:
        found = calibrate(load_benchmarks(params.benchmarks)[0], c.ngram)
        print(f"short anchors of one item standing as a line or sentence in another item's text: {len(found)} "
              f"(anchor, benchmark holding it); UNIT_BITS = {UNIT_BITS}\n")
        print(f"{'bits':>6}  {'anchor':40} {'of':14} {'in':14}")
        for r in found:
            print(f"{r['bits']:6.1f}  {r['anchor'][:40]:40} {r['benchmark']:14} {r['in']:14}")
        cross = [r for r in found if r["in"] != r["benchmark"]]
        print(f"\nmost bits: {found[0]['bits'] if found else 0} (any other item), "
              f"{cross[0]['bits'] if cross else 0} (another benchmark's item)")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"unit_bits": UNIT_BITS, "found": found}, indent=2))
        print(f"wrote {args.out}")
        return
    rng = random.Random(args.seed)
    pages = Pages(prose(params.crawl.pydoc_modules), rng)

    index_items, everything, sets, leaks, lookalikes, lengths = {}, {}, {}, [], [], {}
    for name, path in params.benchmarks.items():
        records, status = load_records(name, path)
        if records is None:
            print(f"{name}: {status}")
            continue
        schema = SCHEMAS[name]
        sets[name] = records
        everything[name] = [Item(r["id"], *item_fields(schema, r)) for r in records]
        group = groups(schema, records, c.ngram)
        held = set(rng.sample(sorted(set(group)), min(args.items, len(set(group)) // 2)))
        kept = [r for r, g in zip(records, group, strict=True) if g not in held]
        index_items[name] = [Item(r["id"], *item_fields(schema, r)) for r in kept]
        leaked = rng.sample(kept, min(args.items, len(kept)))
        leaks += plants(name, schema, leaked, rng)
        lookalikes += plants(name, schema, [records[group.index(g)] for g in sorted(held)], rng)
        lengths[name] = {r["id"]: len(normalized_words(item_fields(schema, r)[0][0])) for r in leaked}
    train, _ = load_records("gsm8k", params.eval.gsm8k_fewshot_path)
    lookalikes += [{"benchmark": "gsm8k_train", "id": r["id"], "form": "verbatim", "noise": False,
                    "text": f"{r['question']}\n{r['answer']}"} for r in train or []]
    lookalikes += [{"benchmark": "plain page", "id": f"page{i}", "form": "-", "noise": False, "text": ""}
                   for i in range(200)]

    index = ContaminationIndex(index_items, c.ngram, c.threshold)
    for plant in leaks + lookalikes:
        plant["page"] = pages.page(plant["text"])
    t0 = time.perf_counter()
    for plant, hits in zip(leaks + lookalikes, scan_all(index, [p["page"] for p in leaks + lookalikes]), strict=True):
        plant["hits"] = [(h.benchmark, h.item_id, h.coverage) for h in hits]
    scan_s = time.perf_counter() - t0

    by_form, by_bench, by_length = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    missed = []
    for p in leaks:
        caught = any(b == p["benchmark"] and i == p["id"] for b, i, _ in p["hits"])
        keys = [(by_form, (p["form"], "noisy" if p["noise"] else "as is")), (by_bench, (p["benchmark"], p["form"]))]
        if p["form"] == "question_only":
            short = lengths[p["benchmark"]][p["id"]] < c.ngram
            keys.append((by_length, f"question of {'fewer than' if short else 'at least'} {c.ngram} words"))
        for table, key in keys:
            table[key][0] += caught
            table[key][1] += 1
        if not caught:
            missed.append({k: p[k] for k in ("benchmark", "id", "form", "noise", "text")})
    false_positives = [{k: p[k] for k in ("benchmark", "id", "form", "noise", "hits", "text")}
                       for p in lookalikes if p["hits"]]
    negatives = defaultdict(lambda: [0, 0])
    for p in lookalikes:
        negatives[p["benchmark"]][0] += bool(p["hits"])
        negatives[p["benchmark"]][1] += 1

    print(f"ngram {c.ngram}, threshold {c.threshold}; {len(leaks)} leak pages, {len(lookalikes)} look-alike pages, "
          f"scanned in {scan_s:.1f} s\n")
    print(f"{'form':16} {'as is':>18} {'noisy':>18}")
    for form in sorted({f for f, _ in by_form}):
        print(f"{form:16} " + " ".join(f"{rate(*by_form[(form, v)]):>18}" if (form, v) in by_form else f"{'-':>18}"
                                       for v in ("as is", "noisy")))
    forms = sorted({f for _, f in by_bench})
    print(f"\n{'benchmark':14} " + " ".join(f"{f:>16}" for f in forms))
    for bench in sorted({b for b, _ in by_bench}):
        print(f"{bench:14} " + " ".join(f"{rate(*by_bench[(bench, f)]):>16}" if (bench, f) in by_bench
                                        else f"{'-':>16}" for f in forms))
    print()
    for key, value in sorted(by_length.items()):
        print(f"question only, {key}: {rate(*value)}")
    print(f"\n{'look-alikes':14} {'flagged':>16}")
    for source, value in sorted(negatives.items()):
        print(f"{source:14} {rate(*value):>16}")
    for fp in false_positives:
        print(f"  false positive: {fp['benchmark']} {fp['id']} ({fp['form']}) -> {fp['hits']}")

    every = census(sets, everything, pages, params)
    print(f"\nquestion (prompt) alone, every item of every set:\n{'benchmark':14} {'as is':>18} {'noisy':>18}")
    per_set = {name: v for name, v in every.items() if name != "missed"}
    for name, v in per_set.items():
        print(f"{name:14} {rate(*v['as is']):>18} {rate(*v['noisy']):>18}")
    overall = {noise: [sum(v[noise][i] for v in per_set.values()) for i in (0, 1)] for noise in ("as is", "noisy")}
    macro = {noise: round(sum(v[noise][0] / v[noise][1] for v in per_set.values()) / len(per_set), 4)
             for noise in ("as is", "noisy")}
    print(f"{'all items':14} {rate(*overall['as is']):>18} {rate(*overall['noisy']):>18}")
    print(f"{'mean of sets':14} {macro['as is']:>18.1%} {macro['noisy']:>18.1%}")

    perf = throughput(ContaminationIndex, everything, pages.words, args.repeats, params, args.baseline)
    print()
    for key, value in perf.items():
        print(f"{key:28} {value}")
    row = {"ngram": c.ngram, "threshold": c.threshold, "seed": args.seed, "items_per_benchmark": args.items,
           "recall_by_form": {f"{f} ({v})": value for (f, v), value in sorted(by_form.items())},
           "recall_by_benchmark": {f"{b} {f}": value for (b, f), value in sorted(by_bench.items())},
           "question_only_by_length": dict(sorted(by_length.items())),
           "lookalikes_flagged": dict(sorted(negatives.items())), "false_positives": false_positives,
           "missed": missed, "question_alone_every_item": {**every, "all items": overall, "mean of sets": macro},
           "throughput": perf}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
