"""Stage `tasks`: the verifiable tasks and chats that SFT, RLVR and eval use (data/tasks/).

- math_{train,heldout}.jsonl: arithmetic problems, GSM8K's schema, in tiers from one-digit sums to
  two-step word problems (each item's ``tier``; hatchling/tasks/math.py)
- code_{train,heldout}.jsonl: small Python functions with tests, HumanEval's schema, in tiers from
  returning a constant to loops (hatchling/tasks/code.py)
- sft_train.jsonl, sft_heldout.jsonl: the chat form ({"messages": [...]}) of the splits above, plus
  question/answer chats derived from the crawled documents (train only)

The held-out files are listed under `benchmarks:` (hatchling_math, hatchling_code), so the
contamination check guards them and the eval stage scores each tier on its own. The training items are checked
against the other eval sets the same way the crawl is (field by field, hatchling/data/decontam.py;
params contamination): with action drop or redact a contaminated training item is dropped (a
redacted worked solution would teach the wrong thing), with report it is only counted.
"""

from __future__ import annotations

import logging
from collections import Counter

from hatchling.data.benchmarks import load_benchmarks
from hatchling.data.corpus import iter_documents
from hatchling.data.decontam import ContaminationIndex
from hatchling.io import atomic_path, write_jsonl
from hatchling.tasks import docs_qa
from hatchling.tasks.code import Code
from hatchling.tasks.math import Math

log = logging.getLogger(__name__)

def run(ctx) -> dict:
    p = ctx.params.tasks
    math, code = Math(), Code()
    math_train, math_heldout = math.split(math.generate(p.math_per_tier, p.seed), p.heldout_fraction)
    code_train, code_heldout = code.split(code.generate(p.code_per_template, p.seed), p.heldout_fraction)
    qa = docs_qa.chats(list(iter_documents(ctx.inputs.crawl)), p.docs_qa)
    c = ctx.params.contamination
    out = ctx.outputs.tasks
    produced_here = {name for name, path in ctx.params.benchmarks.items() if (ctx.root / path).parent == out}
    benchmarks, checked = load_benchmarks({k: v for k, v in ctx.params.benchmarks.items() if k not in produced_here},
                                          ctx.root)
    if unchecked := {name: why for name, why in checked.items() if why != "ok"}:
        log.warning("tasks: the generated items are not checked against %s", "; ".join(
            f"{name} ({why})" for name, why in unchecked.items()))
    index = ContaminationIndex(benchmarks, c.ngram, c.threshold)
    contaminated: dict[str, int] = {}

    def clean(items: list[dict], text) -> list[dict]:
        kept = []
        for item, hits in zip(items, index.scan_batch([text(x) for x in items]), strict=True):
            for bench in {h.benchmark for h in hits}:
                contaminated[bench] = contaminated.get(bench, 0) + 1
            if not hits or c.action == "report":
                kept.append(item)
        return kept

    math_train = clean(math_train, math.text)
    code_train = clean(code_train, code.text)
    qa = clean(qa, lambda x: " ".join(m["content"] for m in x["messages"]))
    files = {
        "math_train.jsonl": math_train, "math_heldout.jsonl": math_heldout,
        "code_train.jsonl": code_train, "code_heldout.jsonl": code_heldout,
        "sft_train.jsonl": [*map(math.messages, math_train), *map(code.messages, code_train), *qa],
        "sft_heldout.jsonl": [*map(math.messages, math_heldout), *map(code.messages, code_heldout)],
    }
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for name, records in files.items():
            write_jsonl(tmp / name, records)
    tiers = {f"{name.removesuffix('.jsonl')}_tier{t}": n for name, records in files.items()
             for t, n in sorted(Counter(r["tier"] for r in records if "tier" in r).items())}
    return ({name.removesuffix(".jsonl"): len(records) for name, records in files.items()} | tiers
            | {"docs_qa": len(qa), "contaminated_training_items": contaminated, "contamination_action": c.action,
               "benchmarks_checked": checked})
