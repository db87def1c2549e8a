"""Documents in the shared schema: reading shards, and the interim offline pydoc corpus.

Documents are JSONL objects ``{"id", "url", "text", "lang", "license", "fetched_at", "sha1"}``.
Until the crawl stage exists, the default corpus is the plain-text pydoc rendering of a list of
standard-library modules: real documentation, PSF-licensed, available offline on any machine.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from hatchling.io import atomic_path, read_jsonl, sha1_text, write_jsonl

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_FILE_SECTION = re.compile(r"\nFILE\n    .*?(?=\n\S|\Z)", re.S)


_RENDER = ("import importlib, pydoc, sys; module = importlib.import_module(sys.argv[1]);"
           "sys.stdout.write(pydoc.render_doc(module, renderer=pydoc.plaintext))")


def render_pydoc(module_name: str) -> str:
    """The plaintext pydoc page of one module, rendered in a fresh isolated interpreter: what else
    is imported changes a page (e.g. subclasses shown), so each module gets a process of its own."""
    proc = subprocess.run([sys.executable, "-I", "-c", _RENDER, module_name], capture_output=True, text=True,
                          timeout=120, env={"LANG": "C.UTF-8", "PATH": os.environ.get("PATH", "")})
    if proc.returncode != 0 or not proc.stdout:
        raise ValueError(f"corpus.modules: cannot document module {module_name!r}: "
                         f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no output'}")
    return proc.stdout


def pydoc_document(module_name: str) -> dict:
    """One document: the plaintext pydoc page of a module (memory addresses and file paths removed,
    so the text is the same on every run)."""
    text = _FILE_SECTION.sub("", _ADDRESS.sub("", render_pydoc(module_name)))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return {
        "id": f"pydoc:{module_name}",
        "url": f"https://docs.python.org/{version}/library/{module_name.split('.')[0]}.html",
        "text": text,
        "lang": "en",
        "license": "PSF-2.0",
        "fetched_at": "python-" + sys.version.split()[0],
        "sha1": sha1_text(text),
    }


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


def iter_documents(spec: str | Path) -> Iterator[dict]:
    """Documents from JSONL shards (objects with a "text" field) or text files (one document each)."""
    files = corpus_files(spec)
    if not files:
        raise FileNotFoundError(f"no corpus files (*.jsonl, *.txt) at {spec}")
    for f in files:
        if f.suffix == ".txt":
            text = f.read_text(encoding="utf-8")
            yield {"id": str(f), "text": text, "sha1": sha1_text(text)}
            continue
        for doc in read_jsonl(f):
            if not isinstance(doc.get("text"), str):
                raise ValueError(f"{f}: document {doc.get('id', '?')!r} has no text field")
            yield doc


def run(params, root: Path = Path("."), log=lambda metrics, step: None) -> dict:
    """Stage `corpus`: write the pydoc documents of params.corpus.modules to data/corpus."""
    t0 = time.perf_counter()
    docs = [pydoc_document(name) for name in params.corpus.modules]
    shards = write_shards(docs, root / "data" / "corpus", params.corpus.docs_per_shard)
    chars = sum(len(d["text"]) for d in docs)
    return {"documents": len(docs), "shards": shards, "characters": chars,
            "seconds": round(time.perf_counter() - t0, 3)}
