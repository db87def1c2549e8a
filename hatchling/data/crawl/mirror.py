"""The crawl stage's offline default target: a local documentation mirror served on 127.0.0.1.

The mirror is real documentation that no one here wrote, crawled over HTTP like any other site
(robots.txt included), so the default pipeline exercises the same crawler a user points at the web:

- Python's HTML documentation where Debian's ``python3-doc`` installed it, else
- HTML pages that CPython's own pydoc renders for a list of standard-library modules (each in a
  fresh isolated interpreter, so nothing a module does on import can leak into another page),
  laid out like the real docs: ``library/index.html`` links ``library/<module>.html``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import html
import http.server
import os
import platform
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from hatchling.errors import ConfigError

PYTHON_DOC_DIR = Path("/usr/share/doc/python3/html")

# What a documentation site keeps crawlers out of: build sources, assets and generated indexes.
MIRROR_ROBOTS = """User-agent: *
Disallow: /_sources/
Disallow: /_static/
Disallow: /_images/
Disallow: /_downloads/
Disallow: /genindex
Disallow: /search.html
"""

_RENDER_HTML = ("import importlib, pydoc, sys; m = importlib.import_module(sys.argv[1]);"
                "sys.stdout.write(pydoc.html.page(pydoc.describe(m), pydoc.html.document(m, sys.argv[1])))")
_ADDRESS = re.compile(r"(?:\s|&nbsp;)+at(?:\s|&nbsp;)+0x[0-9a-fA-F]+")     # "<object at 0x7f..>", plain or HTML
_PAGE_LINK = re.compile(r'<a href="([^"#:/]+)\.html(?:#[^"]*)?"[^>]*>(.*?)</a>', re.S)   # a title's has a class
_FILE_LINK = re.compile(r'<br><a href="file:[^"]*">[^<]*</a>|<a href="file:[^"]*">[^<]*</a>')


def render_pydoc_html(module: str) -> str:
    """pydoc's HTML page of one module, without memory addresses and local file links (so the page
    is the same on every machine)."""
    proc = subprocess.run([sys.executable, "-I", "-c", _RENDER_HTML, module], capture_output=True, text=True,
                          timeout=120, env={"LANG": "C.UTF-8", "PATH": os.environ.get("PATH", ""),
                                            "PYTHONHASHSEED": "0"})     # sets in defaults print in one order
    if proc.returncode != 0 or not proc.stdout:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
        raise ConfigError(f"crawl.pydoc_modules: cannot document module {module!r}: {last}")
    page = _FILE_LINK.sub("", _ADDRESS.sub("", proc.stdout))
    # CPython's documentation is under the PSF license; say so the way a site would.
    return page.replace("<head>", '<head>\n<meta name="license" content="PSF-2.0">', 1)


def build_pydoc_mirror(modules: list[str], out: Path) -> Path:
    """Write library/index.html and library/<module>.html for `modules` under `out`."""
    library = out / "library"
    library.mkdir(parents=True, exist_ok=True)
    pages = set(modules)

    def unlink_missing(match: re.Match) -> str:     # pydoc links every module it names; keep ours
        return match.group(0) if match.group(1) in pages else match.group(2)

    for module in modules:
        page = _PAGE_LINK.sub(unlink_missing, render_pydoc_html(module))
        (library / f"{module}.html").write_text(page, encoding="utf-8")
    items = "\n".join(f'<li><a href="{html.escape(m)}.html">{html.escape(m)}</a></li>' for m in modules)
    (library / "index.html").write_text(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="license" content="PSF-2.0">'
        f"<title>The Python Standard Library (pydoc)</title></head><body><h1>The Python Standard Library</h1>"
        f"<p>Module documentation rendered by pydoc.</p><ul>\n{items}\n</ul></body></html>\n", encoding="utf-8")
    return out


def snapshot_date(name: str, directory: Path) -> str:
    """The date of a mirror's content, recorded as its pages' `fetched_at` so that crawling the same
    mirror gives the same shards on any day: Python's build date for pages pydoc renders, else the
    newest file's modification date (a Debian package's files carry its build time)."""
    if name == "pydoc":
        month, day, year = platform.python_build()[1].split()[:3]         # "Mar  5 2024 07:35:25"
        return datetime.datetime.strptime(f"{month} {day} {year}", "%b %d %Y").date().isoformat()
    newest = max((f.stat().st_mtime for f in directory.rglob("*") if f.is_file()), default=0.0)
    return datetime.datetime.fromtimestamp(newest, datetime.UTC).date().isoformat()


def resolve_mirror(spec: str, modules: list[str], scratch: Path) -> tuple[str, Path]:
    """(name, directory) of the mirror that ``crawl.mirror`` names: ``auto`` (python3-doc if
    installed, else pydoc), ``python3-doc``, ``pydoc`` (rendered into `scratch`) or a directory."""
    if spec == "auto":
        spec = "python3-doc" if (PYTHON_DOC_DIR / "index.html").is_file() else "pydoc"
    if spec == "python3-doc":
        if not (PYTHON_DOC_DIR / "index.html").is_file():
            raise ConfigError(f"crawl.mirror = python3-doc, but {PYTHON_DOC_DIR} holds no docs "
                                    "(apt-get install python3-doc, or use mirror: auto)")
        return spec, PYTHON_DOC_DIR
    if spec == "pydoc":
        return spec, build_pydoc_mirror(modules, scratch)
    directory = Path(spec)
    if not directory.is_dir():
        raise ConfigError(f"crawl.mirror = {spec!r}: no such directory")
    return directory.name, directory


class _MirrorHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that also answers /robots.txt for a directory that has none."""

    def do_GET(self):
        if self.path == "/robots.txt" and not (Path(self.directory) / "robots.txt").is_file():
            body = MIRROR_ROBOTS.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, format, *args):     # quiet: the crawler's report counts what happened
        pass


@contextlib.contextmanager
def serve_on_loopback(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve `handler` on 127.0.0.1 (a free port) in a background thread; yield the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def serve_directory(directory: Path) -> contextlib.AbstractContextManager[str]:
    return serve_on_loopback(functools.partial(_MirrorHandler, directory=str(directory)))
