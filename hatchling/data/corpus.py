"""Documents in the shared schema: writing and reading JSONL shards.

Documents are JSONL objects ``{"id", "url", "text", "lang", "license", "fetched_at", "sha1"}``
(extra keys allowed). The crawl stage writes them, dedup and tokenize read them; dedup (and the tasks
stage) also take plain .txt files in data/crawl, one document each, for users who bring their own text:
dedup writes them on as shards.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

from hatchling.errors import InputError, MissingInputError
from hatchling.io import atomic_path, numbered_jsonl, sha1_text, write_jsonl


def write_shards(docs: list[dict], out_dir: str | Path, docs_per_shard: int) -> int:
    """Write documents as out_dir/shard-00000.jsonl, ... atomically (the whole directory at once)."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for i in range(0, len(docs), docs_per_shard):
            write_jsonl(tmp / f"shard-{i // docs_per_shard:05d}.jsonl", docs[i:i + docs_per_shard])
    return (len(docs) + docs_per_shard - 1) // docs_per_shard


def corpus_files(spec: str | Path) -> list[Path]:
    """Files named by a directory (its *.jsonl and *.txt), a glob, or a single file; sorted."""
    spec = str(spec)
    if Path(spec).is_dir():
        files = [p for p in Path(spec).rglob("*") if p.suffix in (".jsonl", ".txt")]
    else:
        files = [Path(p) for p in glob.glob(spec, recursive=True)]
    return sorted(f for f in files if f.is_file())


def read_documents(path: str | Path) -> Iterator[dict]:
    """The documents of one corpus file: a JSONL shard's objects (each with a "text" string) or a UTF-8
    .txt file as one document (its file name the id: no path, which would differ between checkouts)."""
    path = Path(path)
    if path.suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not valid UTF-8 (byte {e.start + 1})") from None
        yield {"id": path.name, "text": text, "sha1": sha1_text(text)}
        return
    for line, doc in numbered_jsonl(path):
        if not isinstance(doc.get("text"), str):
            raise InputError(f"{path}:{line}: document {doc.get('id', '?')!r} has no text field")
        yield doc


def iter_documents(spec: str | Path) -> Iterator[dict]:
    """Documents from JSONL shards (objects with a "text" field) or text files (one document each)."""
    files = corpus_files(spec)
    if not files:
        raise MissingInputError(f"no corpus files (*.jsonl, *.txt) at {spec}")
    for f in files:
        yield from read_documents(f)
