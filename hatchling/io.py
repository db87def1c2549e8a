"""Atomic writes, JSONL shards and content hashes.

Every output is written to a temporary sibling and renamed into place, so a stage that fails
(or is killed) leaves either the previous output or the new one, never half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from hatchling.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` (file or directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """The objects of a JSONL file, one a line (blank lines skipped); a line that is not UTF-8, not
    JSON or not a JSON object is refused as ``path:line: what is wrong``."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
                yield record


def sha1_text(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def hash_paths(paths: Iterable[str | Path], root: str | Path) -> str:
    """sha256 over the bytes of files and their paths relative to `root` (directories walked in sorted
    order), so the same tree hashes the same wherever it lives. `paths` are relative to `root` (or
    absolute); a file outside `root` is named relative to the folder that holds the given path."""
    root = Path(root).resolve()
    h = hashlib.sha256()
    named = []
    for given in paths:
        path = root / given
        full = path.resolve()
        label = full.relative_to(root) if full.is_relative_to(root) else Path(full.name)
        if path.is_dir():
            named += [((label / f.relative_to(path)).as_posix(), f) for f in path.rglob("*") if f.is_file()]
        elif path.exists():
            named.append((label.as_posix(), path))
    for name, f in sorted(named):
        h.update(name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
