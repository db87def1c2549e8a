"""The crawl stage against a real HTTP server on 127.0.0.1 that logs every request it gets."""

from __future__ import annotations

import contextlib
import copy
import http.server
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from parsel import Selector

from hatchling.config import ConfigError, validate_params
from hatchling.data.crawl import stage as crawl_stage
from hatchling.data.crawl.mirror import (
    MIRROR_ROBOTS,
    build_pydoc_mirror,
    render_pydoc_html,
    serve_directory,
    serve_on_loopback,
)
from hatchling.data.crawl.page import classify_license, license_evidence, page_links, robots_directives
from hatchling.errors import BrokenEnvironment
from hatchling.io import read_jsonl, sha1_text
from hatchling.stages import context
from tests.conftest import TINY_PARAMS, hatchling_here, write_params

CRAWL_DELAY = 0.3
TOPICS = ["gardens", "rivers", "bridges", "lanterns", "orchards", "harbors", "meadows", "libraries", "bicycles"]


def respond(handler, status: int, ctype: str, body: bytes, extra: dict) -> None:
    """Write one HTTP response from a test server's handler."""
    handler.send_response(status)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(body)))
    for k, v in extra.items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)


def english(topic: str) -> str:
    return (f"This page is about {topic}. People who care for {topic} often write long notes about what they "
            f"learned, and those notes help the next person who wants to understand {topic} well. The weather, the "
            f"season and the tools at hand all change how the work goes, so every careful account of {topic} is "
            f"worth reading twice before starting.")


def html_page(body: str, head: str = "", footer: str = "This page is licensed under CC BY-SA 4.0.") -> bytes:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>t</title>{head}</head>'
            f"<body><main><article><p>{body}</p></article></main><footer>{footer}</footer></body></html>").encode()


def link(href: str, rel: str = "") -> str:
    return f'<a href="{href}"{f" rel={rel!r}" if rel else ""}>{href}</a> '


class Site:
    """A small site with one of every case the crawler must handle, and a log of what it served."""

    def __init__(self):
        self.log: list[tuple[float, str, str]] = []     # (monotonic time, path, Host header)
        self.lock = threading.Lock()
        self.flaky_calls = 0
        self.base = ""

    def pages(self) -> dict[str, tuple[int, str, bytes, dict]]:
        offsite = self.base.replace("127.0.0.1", "localhost") + "offsite.html"
        index_links = "".join(link(p) for p in (
            "a.html", "private/secret.html", "noindex.html", "nofollow.html", "french.html", "denied.html",
            "big.html", "flaky.html", "loop-a", "file.bin", "dup.html", "plain.txt", offsite))
        page = lambda body, **kw: (200, "text/html; charset=utf-8", html_page(body, **kw), {})
        return {
            "/robots.txt": (200, "text/plain", f"User-agent: *\nDisallow: /private/\nCrawl-delay: {CRAWL_DELAY}\n"
                            .encode(), {}),
            "/index.html": page(english("gardens") + index_links),
            "/a.html": page(english("rivers") + link("index.html")),
            "/dup.html": page(english("rivers") + link("index.html")),
            "/private/secret.html": page(english("bridges")),
            "/noindex.html": page(english("lanterns") + link("from-noindex.html"),
                                  head='<meta name="robots" content="noindex">'),
            "/from-noindex.html": page(english("orchards")),
            "/nofollow.html": page(english("harbors") + link("hidden.html"),
                                   head='<meta name="robots" content="nofollow">'),
            "/hidden.html": page(english("meadows")),
            "/french.html": page("Cette page parle des jardins et des rivières. Les gens qui aiment les jardins "
                                 "écrivent souvent de longues notes sur ce qu'ils ont appris, et ces notes aident la "
                                 "personne suivante qui veut comprendre le jardinage. Le temps et la saison changent "
                                 "la façon dont le travail se fait, alors chaque récit mérite d'être lu deux fois."),
            "/denied.html": page(english("libraries"), footer="Copyright 2024 Example Corp. All rights reserved."),
            "/big.html": page(english("bicycles") + "<!-- padding -->" * 8000),
            "/loop-a": (302, "text/html", b"", {"Location": "/loop-b"}),
            "/loop-b": (302, "text/html", b"", {"Location": "/loop-a"}),
            "/file.bin": (200, "application/octet-stream", bytes(range(256)) * 64, {}),
            "/plain.txt": (200, "text/plain; charset=utf-8",
                           (english("kites") + " This text is licensed under CC0.").encode(), {}),
        }

    def handler(self):
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with site.lock:
                    site.log.append((time.monotonic(), self.path, self.headers.get("Host", "")))
                if self.path == "/flaky.html":
                    site.flaky_calls += 1
                    status, ctype, body, extra = ((500, "text/plain", b"try again", {}) if site.flaky_calls == 1
                                                  else (200, "text/html", html_page(english("harbors and kites")), {}))
                else:
                    status, ctype, body, extra = site.pages().get(self.path, (404, "text/plain", b"no", {}))
                respond(self, status, ctype, body, extra)

            def log_message(self, *args):
                pass

        return Handler

    def requested(self, path: str) -> int:
        return sum(1 for _, p, _ in self.log if p == path)


def crawl_params(seeds: list[str], **crawl):
    tree = copy.deepcopy(TINY_PARAMS)
    tree["crawl"] = {**tree["crawl"], "seeds": seeds, "download_delay": 0.0, "max_page_kb": 64,
                     "retry_backoff_s": 0.2, "max_redirects": 3, "timeout_s": 5, "max_seconds": 60,
                     "progress": False, **crawl}
    return validate_params(tree)


@pytest.fixture(scope="module")
def site_crawl(tmp_path_factory):
    """Crawl the site twice (same server); the report, both shard sets and the server's log."""
    site = Site()
    with serve_on_loopback(site.handler()) as base:
        site.base = base
        runs = []
        for i in range(2):
            root = tmp_path_factory.mktemp(f"crawl{i}")
            site.log.clear()
            metrics = crawl_stage.run(context("crawl", crawl_params([base + "index.html"]), root))
            runs.append((root, metrics, list(site.log)))
    return site, runs


def shard_docs(root: Path) -> list[dict]:
    return [d for f in sorted((root / "data/crawl").glob("*.jsonl")) for d in read_jsonl(f)]


def test_politeness_rules_are_honoured(site_crawl):
    site, [(root, metrics, log), _] = site_crawl
    site.log = log
    paths = [p for _, p, _ in log]
    assert "/private/secret.html" not in paths                      # robots.txt Disallow
    assert "/hidden.html" not in paths                              # meta nofollow: its links not followed
    assert "/from-noindex.html" in paths                            # noindex alone still lets links be followed
    assert all(host.startswith("127.0.0.1") for _, _, host in log)  # off-domain link never fetched
    assert site.requested("/flaky.html") == 2                       # 500 then 200: retried once
    assert 1 <= site.requested("/loop-a") <= 3 and site.requested("/loop-b") <= 3   # redirect loop stopped
    times = [t for t, p, _ in log if p != "/robots.txt"]
    # Crawl-delay, seen by the server. The crawler starts request k at least k - j delays after request j
    # by its own clock; the server logs each arrival some time after that start (never before it), more on
    # a loaded machine. So requests j..k arrive at least (k - j) delays apart less the lateness of request
    # j alone: the checks below hold however late any arrival is, up to one delay (0.3 s), yet a crawler
    # that ignored the delay, or kept half of it, fails each of them.
    spans = [b - a for a, b in zip(times, times[3:], strict=False)]
    assert len(times) >= 8 and min(spans) >= 2 * CRAWL_DELAY, spans          # no 4 requests within 2 delays
    assert times[-1] - times[0] >= (len(times) - 2) * CRAWL_DELAY, times       # the crawl as a whole kept the rate
    urls = {d["url"].rsplit("/", 1)[-1] for d in shard_docs(root)}
    assert urls == {"index.html", "a.html", "from-noindex.html", "nofollow.html", "flaky.html", "plain.txt"}
    assert metrics["dropped"] == {"robots": 1, "meta-robots": 1, "language": 1, "license": 1, "size": 1,
                                  "type": 1, "error": 1, "duplicate": 1}
    assert metrics["offsite_links"] == 1 and metrics["retries"] >= 1 and metrics["kept"] == 6


def test_shards_follow_the_schema_and_two_crawls_agree(site_crawl):
    _, [(root1, m1, _), (root2, m2, _)] = site_crawl
    docs = shard_docs(root1)
    for doc in docs:
        assert set(doc) >= {"id", "url", "text", "lang", "license", "fetched_at", "sha1"}
        assert doc["sha1"] == sha1_text(doc["text"]) and doc["lang"] == "en" and len(doc["text"]) >= 200
    assert {d["license"] for d in docs} == {"CC-BY-SA", "CC0-1.0"}
    files1 = sorted(p.name for p in (root1 / "data/crawl").iterdir())
    assert files1 == sorted(p.name for p in (root2 / "data/crawl").iterdir())
    for name in files1:
        assert (root1 / "data/crawl" / name).read_bytes() == (root2 / "data/crawl" / name).read_bytes()
    assert m1["fetched"] == m2["fetched"] and m1["dropped"] == m2["dropped"] and m1["pages_per_s"] > 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def previous_shards(root: Path) -> Path:
    shard = root / "data/crawl/shard-00000.jsonl"
    shard.parent.mkdir(parents=True)
    shard.write_text('{"id": "old", "text": "previous crawl"}\n')
    return shard


def test_unreachable_seed_is_an_error_and_keeps_previous_shards(tmp_path):
    shard = previous_shards(tmp_path)
    with pytest.raises(crawl_stage.CrawlError, match=r"no seed could be fetched .*127\.0\.0\.1"):
        crawl_stage.run(context("crawl", crawl_params([f"http://127.0.0.1:{free_port()}/"], retries=0), tmp_path))
    assert shard.read_text() == '{"id": "old", "text": "previous crawl"}\n'
    assert sorted(p.name for p in shard.parent.iterdir()) == ["shard-00000.jsonl"]


def test_a_crawl_that_keeps_nothing_is_an_error(tmp_path):
    shard = previous_shards(tmp_path)
    site = Site()
    with serve_on_loopback(site.handler()) as base:
        site.base = base
        with pytest.raises(crawl_stage.CrawlError, match=r"yielded no documents.*language"):
            crawl_stage.run(context("crawl", crawl_params([base + "french.html"]), tmp_path))
    assert shard.read_text() == '{"id": "old", "text": "previous crawl"}\n'


@pytest.mark.parametrize("url", ["htp://example.org/", "example.org/docs", "http:///nohost"])
def test_malformed_seed_is_rejected_before_any_work(url):
    with pytest.raises(ConfigError, match=r"crawl\.seeds.*is not an http\(s\) URL"):
        crawl_params([url])


def test_page_rules():
    sel = Selector(text='<html><head><meta name="ROBOTS" content="NoIndex, follow">'
                        '<meta name="babyhatchlingbot" content="nofollow"><link rel="license" '
                        'href="https://creativecommons.org/licenses/by/4.0/"></head><body>'
                        '<a href="b.html#x">b</a><a href="/c" rel="nofollow">c</a><a href="mailto:x@y">m</a>'
                        '<a href="b.html">again</a><p>Copyright 2020 A. Licensed under CC BY-NC 4.0.</p></body></html>')
    assert robots_directives(sel, "BabyHatchlingBot") == {"noindex", "follow", "nofollow"}
    assert page_links(sel, "http://h/dir/a.html") == ["http://h/dir/b.html"]
    evidence = license_evidence(sel)
    assert evidence[0].startswith("https://creativecommons.org/licenses/by/4.0/")
    allow = {"creativecommons.org/licenses/by/": "CC-BY"}
    assert classify_license(evidence, allow, deny=["CC BY-NC"]) == (None, "CC BY-NC")   # deny wins
    assert classify_license(evidence, allow, deny=[]) == ("CC-BY", None)
    assert classify_license(["nothing here"], allow, deny=[]) == (None, None)


def test_pydoc_mirror_is_served_with_robots_and_crawled_byte_for_byte_the_same_twice(tmp_path):
    # configparser's page shows objects "at 0x..." (HTML-escaped); difflib's, sets in hash order; http.client's title
    # links its package, http, which the mirror does not serve
    modules = ["json", "textwrap", "configparser", "difflib", "http.client"]
    mirror = build_pydoc_mirror(modules, tmp_path / "mirror")
    json_page = (mirror / "library/json.html").read_text()
    assert "file:" not in json_page and 'content="PSF-2.0"' in json_page
    pages = [page.read_text() for page in (mirror / "library").glob("*.html")]
    assert {m for page in pages for m in re.findall(r'href="([^"#:/]+)\.html', page)} == set(modules)   # served only
    assert 'href="textwrap.html"' in (mirror / "library/index.html").read_text()
    import urllib.request

    with serve_directory(mirror) as base:
        assert urllib.request.urlopen(base + "robots.txt", timeout=5).read().decode() == MIRROR_ROBOTS
    params = crawl_params([], mirror="pydoc", pydoc_modules=modules, max_page_kb=1024)
    metrics = crawl_stage.run(context("crawl", params, tmp_path / "first"))
    docs = shard_docs(tmp_path / "first")
    assert metrics["seeds"] == ["mirror://pydoc/library/index.html"]
    assert sorted(d["url"] for d in docs) == sorted(f"mirror://pydoc/library/{m}.html" for m in modules)
    assert {d["license"] for d in docs} == {"PSF-2.0"} and metrics["dropped"]["error"] == 0
    assert not [d["url"] for d in docs if re.search(r"0x[0-9a-fA-F]{6,}", d["text"])]     # no memory addresses
    # a second crawl (a new rendering of the mirror, served on another port) writes the same bytes
    crawl_stage.run(context("crawl", params, tmp_path / "second"))
    first, second = (sorted((tmp_path / run / "data/crawl").iterdir()) for run in ("first", "second"))
    assert [f.name for f in first] == [f.name for f in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True))


def test_pydoc_pages_do_not_depend_on_what_the_caller_imported():
    """Each pydoc page is rendered in its own isolated interpreter (imports elsewhere change pages)."""
    first = render_pydoc_html("collections")
    import mlflow  # noqa: F401  (registers classes that would otherwise show up in the page)

    assert render_pydoc_html("collections") == first
    with pytest.raises(ValueError, match="cannot document module 'no_such_module'"):
        render_pydoc_html("no_such_module")


# What lxml 6 says when jusText, under trafilatura, imports lxml.html.clean without lxml_html_clean.
IMPORT_ERROR = ("lxml.html.clean module is now a separate project lxml_html_clean.\n"
                "Install lxml[html_clean] or lxml_html_clean directly.")
BROKEN_INSTALL = f"raise ImportError({IMPORT_ERROR!r})\n"
FLAKY_EXTRACTOR = """import re


def extract(html, **options):
    if "gardens" in html or "lanterns" in html:
        raise ValueError("unbalanced <table> in the page")
    return re.sub(r"<[^>]+>", " ", html)
"""


def fake_package(directory: Path, monkeypatch, source: str, name: str = "trafilatura") -> None:
    """A package `name` with `source` as its body, first on the crawl process's import path."""
    package = directory / "fake-site" / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(source)
    path = os.pathsep.join(filter(None, (str(package.parent), os.environ.get("PYTHONPATH"))))
    monkeypatch.setenv("PYTHONPATH", path)


def test_a_page_that_fails_is_dropped_as_error_with_its_message_and_the_crawl_goes_on(tmp_path, monkeypatch,
                                                                                     caplog):
    fake_package(tmp_path, monkeypatch, FLAKY_EXTRACTOR)
    error = "ValueError: unbalanced <table> in the page"
    site = Site()
    with serve_on_loopback(site.handler()) as base:
        site.base = base
        seeds = [base + page for page in ("index.html", "noindex.html", "a.html")]
        metrics = crawl_stage.run(context("crawl", crawl_params(seeds, max_depth=0), tmp_path / "some"))
        # the original report said only "dropped: {}"; now the error itself is in the stage's error
        with pytest.raises(crawl_stage.CrawlError, match=re.escape(
                f"yielded no documents to keep (1 pages requested, 1 fetched, dropped: {{'error': 1}}; "
                f"errors: 1 × {error} (first at {base}index.html))")):
            crawl_stage.run(context("crawl", crawl_params([base + "index.html"]), tmp_path / "none"))
    assert metrics["errors"] == [{"error": error, "url": base + "index.html", "count": 2}]
    assert metrics["dropped"]["error"] == 2 and metrics["kept"] == 1
    assert [d["url"] for d in shard_docs(tmp_path / "some")] == [base + "a.html"]     # went on after the errors
    assert f"crawl: pages dropped for errors (2): 2 × {error} (first at {base}index.html); the first of each:\n" \
           f"Traceback (most recent call last):\n" in caplog.text
    assert 'raise ValueError("unbalanced <table> in the page")\n' in caplog.text      # where it was raised


def test_a_broken_install_stops_the_crawl_at_once_and_fails_the_stage_with_its_error(project, monkeypatch, capsys,
                                                                                       own_tracking):
    shard = previous_shards(project)
    fake_package(project.parent, monkeypatch, BROKEN_INSTALL)
    site = Site()
    with serve_on_loopback(site.handler()) as base:
        site.base = base
        crawl = {**TINY_PARAMS["crawl"], "seeds": [base + "index.html", base + "a.html"]}
        write_params(project, {**TINY_PARAMS, "crawl": crawl})
        assert hatchling_here(project, "run", "crawl") == 3      # a broken environment: a rerun cannot help
    err = capsys.readouterr().err
    assert f"error: crawl: stopped at {base}index.html: ImportError: {IMPORT_ERROR}" in err
    assert f'{project.parent}/fake-site/trafilatura/__init__.py", line 1, in <module>' in err   # its traceback
    assert [path for _, path, _ in site.log if path != "/robots.txt"] == ["/index.html"]   # no page after it
    assert shard.read_text() == '{"id": "old", "text": "previous crawl"}\n'
    assert not (project / "reports/crawl.json").exists()


def test_a_crawler_that_cannot_start_fails_with_its_error(tmp_path, monkeypatch):
    """Scrapy itself broken (here its robots.txt parser): the crawl never starts, and says why."""
    fake_package(tmp_path, monkeypatch, 'raise ImportError("protego is broken here on purpose")\n', name="protego")
    with pytest.raises(BrokenEnvironment, match=r"crawl: could not start: ImportError: protego is broken here on "
                                                r"purpose \(the environment is broken, not the site\)\n"
                                                r"(?s:.*)fake-site/protego/__init__\.py"):
        crawl_stage.run(context("crawl", crawl_params([f"http://127.0.0.1:{free_port()}/"]), tmp_path))


def test_depth_and_page_caps(tmp_path):
    site = Site()
    with serve_on_loopback(site.handler()) as base:
        site.base = base
        seed = [base + "index.html"]
        shallow = crawl_stage.run(context("crawl", crawl_params(seed, max_depth=0), tmp_path / "depth"))
        capped = crawl_stage.run(context("crawl", crawl_params(seed, max_pages=3), tmp_path / "pages"))
    assert shallow["requested"] == 1 and shallow["kept"] == 1 and shallow["offsite_links"] == 0
    assert capped["requested"] == 3
    # breadth-first in link order: the seed, then its first two on-site links
    assert [d["url"].rsplit("/", 1)[-1] for d in shard_docs(tmp_path / "pages")] == ["index.html", "a.html"]


# --- the address guard: no request reaches a non-public address (hatchling/data/crawl/guard.py) ---

@pytest.mark.parametrize("address", ["127.0.0.2", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
                                     "100.64.0.1", "224.0.0.1", "240.0.0.1", "0.0.0.0", "255.255.255.255", "::1",
                                     "::", "fe80::1", "fd00::1", "ff02::1", "::ffff:169.254.169.254",
                                     "64:ff9b::a9fe:a9fe", "2002:a00:1::1"])
def test_non_public_addresses_are_refused(address):
    from ipaddress import ip_address

    from hatchling.data.crawl.guard import AddressGuard, is_public

    assert not is_public(ip_address(address))
    assert not AddressGuard().permits(ip_address(address), 80)


def test_public_addresses_the_seeds_own_and_allowed_networks_are_permitted():
    from ipaddress import ip_address as ip

    from hatchling.data.crawl.guard import AddressGuard

    assert AddressGuard().permits(ip("93.184.216.34"), 80) and AddressGuard().permits(ip("2606:4700::1"), 443)
    guard = AddressGuard.for_seeds(["http://127.0.0.1:8000/docs/", "https://93.184.216.34/"], allow=["10.0.0.0/8"])
    assert guard.exempt == {(ip("127.0.0.1"), 8000)}                       # only the non-public seed, its port too
    assert (ip("127.0.0.1"), 8000) in AddressGuard.for_seeds(["http://localhost:8000/"]).exempt   # as resolved
    assert guard.permits(ip("127.0.0.1"), 8000) and guard.permits(ip("::ffff:127.0.0.1"), 8000)
    assert not guard.permits(ip("127.0.0.1"), 8001) and not guard.permits(ip("127.0.0.2"), 8000)
    assert guard.permits(ip("10.1.2.3"), 22) and guard.permits(ip("::ffff:10.1.2.3"), 22)
    assert not guard.permits(ip("169.254.169.254"), 80)
    assert guard.check("metadata.test", 80, [ip("169.254.169.254")]) == []
    assert guard.refusals == {("metadata.test", 80): "metadata.test resolves to non-public 169.254.169.254"}


def test_allow_private_is_validated():
    assert crawl_params([], mirror="pydoc", pydoc_modules=["json"],
                        allow_private=["10.0.0.0/8", "127.0.0.2", "fd00::/8"]).crawl.allow_private
    with pytest.raises(ConfigError, match=r"crawl\.allow_private.*'10\.0\.0\.1/8' is not an IP network"):
        crawl_params([], mirror="pydoc", pydoc_modules=["json"], allow_private=["10.0.0.1/8"])


# Installed in the crawl process through PYTHONPATH: names resolve through a mapping file the test
# (and its server) can change at any time, and every outgoing connection is written to a log.
RESOLVER_OVERRIDE = """import json, socket

_getaddrinfo, _connect_ex, _connect = socket.getaddrinfo, socket.socket.connect_ex, socket.socket.connect


def getaddrinfo(host, port, *args, **kwargs):
    with open({hosts!r}) as f:
        mapped = json.load(f).get(host.decode() if isinstance(host, bytes) else host)
    if mapped is None:
        return _getaddrinfo(host, port, *args, **kwargs)
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (mapped, int(port or 0)))]


def log(address):
    with open({connections!r}, "a") as f:
        f.write(f"{{address[0]}} {{address[1]}}\\n")


def connect_ex(self, address):
    log(address)
    return _connect_ex(self, address)


def connect(self, address):
    log(address)
    return _connect(self, address)


socket.getaddrinfo, socket.socket.connect_ex, socket.socket.connect = getaddrinfo, connect_ex, connect
"""


def map_hosts(path: Path, hosts: dict[str, str]) -> None:
    path.with_suffix(".tmp").write_text(json.dumps(hosts))
    path.with_suffix(".tmp").replace(path)


@contextlib.contextmanager
def logging_server(host: str, pages: dict[str, tuple[int, bytes, dict]], log: list, on_get=None):
    """An HTTP server on `host` (any loopback address) that serves `pages` and logs (path, Host)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            log.append((self.path, self.headers.get("Host", "")))
            if on_get:
                on_get(self.path, self.headers.get("Host", ""))
            status, body, extra = pages.get(self.path, (404, b"no", {}))
            respond(self, status, "text/plain" if self.path == "/robots.txt" else "text/html", body, extra)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_the_crawler_never_reaches_a_non_public_address_unless_allowed(tmp_path, monkeypatch):
    hosts, connections = tmp_path / "hosts.json", tmp_path / "connections.log"
    map_hosts(hosts, {"metadata.test": "169.254.169.254", "rebind.test": "127.0.0.1"})
    fake_package(tmp_path, monkeypatch, "", name="placeholder")      # puts fake-site/ on the crawl's PYTHONPATH
    (tmp_path / "fake-site/sitecustomize.py").write_text(
        RESOLVER_OVERRIDE.format(hosts=str(hosts), connections=str(connections)))
    seed_log, private_log = [], []

    def rebind(path, host):     # DNS rebinding: once rebind.test served robots.txt, it points at the metadata address
        if path == "/robots.txt" and host.startswith("rebind.test"):
            map_hosts(hosts, {"metadata.test": "169.254.169.254", "rebind.test": "169.254.169.254"})

    private_pages = {"/robots.txt": (200, b"User-agent: *\nAllow: /\n", {}),
                     "/secret.html": (200, html_page(english("lanterns")), {})}
    with logging_server("127.0.0.2", private_pages, private_log) as private_port:
        private = f"http://127.0.0.2:{private_port}/secret.html"
        pages = {"/robots.txt": (200, b"User-agent: *\nAllow: /\n", {}),
                 "/to-private": (302, b"", {"Location": private}),
                 "/a.html": (200, html_page(english("rivers")), {})}
        with logging_server("127.0.0.1", pages, seed_log, on_get=rebind) as port:
            pages["/index.html"] = (200, html_page(english("gardens") + "".join(link(u) for u in (
                f"http://metadata.test:{port}/latest/meta-data/", f"http://10.0.0.1:{port}/admin.html",
                "/to-private", f"http://rebind.test:{port}/rebound.html", "a.html"))), {})
            seed = f"http://127.0.0.1:{port}/index.html"
            params = dict(max_depth=1, max_pages=10, retries=0, timeout_s=3, max_seconds=30,
                          allowed_domains=["metadata.test", "10.0.0.1", "127.0.0.2", "rebind.test"])
            t0 = time.monotonic()
            refused = crawl_stage.run(context("crawl", crawl_params([seed], **params), tmp_path / "refused"))
            map_hosts(hosts, {"metadata.test": "169.254.169.254", "rebind.test": "127.0.0.1"})
            allowed = crawl_stage.run(context("crawl", crawl_params([seed], allow_private=["127.0.0.2/32"],
                                                                    **params), tmp_path / "allowed"))
            assert time.monotonic() - t0 < 60
    reasons = {r["url"]: r["reason"] for r in refused["refused"]}
    assert refused["refused_non_public"] == 4 and refused["dropped"]["error"] == 0, refused
    assert reasons == {
        f"http://metadata.test:{port}/latest/meta-data/":
            "refused: metadata.test resolves to non-public 169.254.169.254",
        f"http://10.0.0.1:{port}/admin.html": "refused: 10.0.0.1 is a non-public address",
        private: "refused: 127.0.0.2 is a non-public address",            # the redirect's target
        # rebind.test resolved to the seed's own address for its robots.txt, to 169.254.169.254 when its page
        # connected: the check sits at connect time
        f"http://rebind.test:{port}/rebound.html": "refused at connect: rebind.test resolves to non-public "
                                                   "169.254.169.254"}
    assert ("/robots.txt", f"rebind.test:{port}") in seed_log and not [p for p, _ in seed_log if p == "/rebound.html"]
    assert [d["url"].rsplit("/", 1)[-1] for d in shard_docs(tmp_path / "refused")] == ["index.html", "a.html"]
    # allowed explicitly, the private server is reached (through the same redirect); the rest is still refused
    assert allowed["refused_non_public"] == 3 and [p for p, _ in private_log] == ["/robots.txt", "/secret.html"]
    assert "secret.html" in {d["url"].rsplit("/", 1)[-1] for d in shard_docs(tmp_path / "allowed")}
    # not one connection attempt went to a refused address: only the seed's server, and the allowed one
    attempts = set(connections.read_text().split("\n")) - {""}
    assert attempts == {f"127.0.0.1 {port}", f"127.0.0.2 {private_port}"}, attempts
