"""The Scrapy side of the crawl: a polite, deterministic spider, run in a process of its own.

Politeness is set explicitly (Scrapy run from a script would not obey robots.txt and would open 8
connections per domain): robots.txt rules and its Crawl-delay, <meta name="robots"> noindex and
nofollow, an identifying User-Agent, one request at a time with a delay (AutoThrottle on), caps on
depth, pages, time and page size, retries with exponential backoff, a redirect limit, HTML and
plain text only. It never connects to a non-public address (hatchling/data/crawl/guard.py) but the
seeds' own and those ``crawl.allow_private`` allows, and uses no proxy from the environment (a proxy
would resolve names where the guard cannot see them).

Determinism: the spider keeps its own breadth-first frontier and has exactly one request in flight,
issuing the next only when the previous one has been answered (or has failed). The pages fetched,
and their order, therefore depend only on the site and the params, never on timing; under a page
cap two crawls of the same site keep the same documents. Run ``python -m
hatchling.data.crawl.spider CONFIG.json RESULT.json``: Twisted's reactor cannot restart within one
process, so the stage starts one process per crawl.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
from collections import Counter, deque
from hashlib import sha1
from urllib.parse import urlsplit

import scrapy
from scrapy import signals
from scrapy.downloadermiddlewares.robotstxt import RobotsTxtMiddleware
from scrapy.exceptions import (
    CannotResolveHostError,
    CloseSpider,
    DownloadCancelledError,
    IgnoreRequest,
    StopDownload,
)
from scrapy.http import TextResponse
from scrapy.utils.httpobj import urlparse_cached
from tqdm import tqdm
from twisted.internet.defer import CancelledError
from twisted.internet.error import DNSLookupError

from hatchling.data.crawl.guard import AddressGuard, RefusedAddress, resolver_factory, url_host_port
from hatchling.data.crawl.page import (
    HTML_TYPES,
    TEXT_TYPES,
    analyze_html,
    classify_license,
    detect_language,
    doc_id,
    license_sentences,
)
from hatchling.errors import environment_fault

DROP_REASONS = ("robots", "meta-robots", "language", "license", "size", "type", "error", "duplicate")
LISTED_ERRORS = 5      # distinct errors the result lists, each with its first URL and a count (all are counted)


def error_text(error: BaseException) -> str:
    """'ExcClass: message' (the class alone when there is no message)."""
    message = str(error).strip()
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def fatal(error: BaseException, url: str | None) -> dict:
    """What stopped the crawl, for the stage's error: the error, the page (None: the crawl could not
    start), whether the environment is at fault, and the traceback."""
    return {"error": error_text(error), "url": url, "environment": environment_fault(error),
            "traceback": "".join(traceback.format_exception(error))}


class PoliteRobotsMiddleware(RobotsTxtMiddleware):
    """robots.txt rules, plus what Scrapy's own middleware leaves out: the Crawl-delay a site asks
    for (requests to one host are spaced at least that far apart), and exponential backoff before a
    retried request (``HATCHLING_RETRY_BACKOFF`` · 2^(retry-1) seconds)."""

    def __init__(self, crawler):
        super().__init__(crawler)
        self._backoff = crawler.settings.getfloat("HATCHLING_RETRY_BACKOFF")
        self._next_start: dict[str, float] = {}     # host -> earliest start of its next request

    async def process_request(self, request):
        await super().process_request(request)       # raises IgnoreRequest when robots.txt forbids
        if request.meta.get("dont_obey_robotstxt"):
            return
        parser = await self.robot_parser(request)
        user_agent = self._robotstxt_useragent or self._default_useragent
        crawl_delay = (parser.crawl_delay(user_agent) if parser else None) or 0.0
        retries = request.meta.get("retry_times", 0)
        now = time.monotonic()
        host = urlparse_cached(request).netloc
        start = max(now + (self._backoff * 2 ** (retries - 1) if retries else 0.0), self._next_start.get(host, 0.0))
        self._next_start[host] = start + crawl_delay
        if start > now:
            await asyncio.sleep(start - now)


def crawl_settings(cfg: dict, guard: AddressGuard) -> dict:
    """Scrapy settings from the crawl params: every politeness knob set explicitly; every connection
    made through `guard`'s resolver, every request checked by its middleware first."""
    return {
        "USER_AGENT": cfg["user_agent"],
        "ROBOTSTXT_OBEY": cfg["obey_robots"],
        "TWISTED_DNS_RESOLVER": resolver_factory(guard),
        "HTTPPROXY_ENABLED": False,
        "DOWNLOADER_MIDDLEWARES": {
            "hatchling.data.crawl.guard.AddressGuardMiddleware": 50,
            "scrapy.downloadermiddlewares.robotstxt.RobotsTxtMiddleware": None,
            "hatchling.data.crawl.spider.PoliteRobotsMiddleware": 100,
        },
        "HATCHLING_RETRY_BACKOFF": cfg["retry_backoff_s"],
        "CONCURRENT_REQUESTS": 1,
        "CONCURRENT_REQUESTS_PER_DOMAIN": 1,
        "DOWNLOAD_DELAY": cfg["download_delay"],
        "AUTOTHROTTLE_ENABLED": cfg["autothrottle"],
        "AUTOTHROTTLE_START_DELAY": max(cfg["download_delay"], 0.01),
        "AUTOTHROTTLE_TARGET_CONCURRENCY": 1.0,
        "DOWNLOAD_TIMEOUT": cfg["timeout_s"],
        "DOWNLOAD_MAXSIZE": cfg["max_page_kb"] * 1024,
        "DOWNLOAD_WARNSIZE": 0,
        "RETRY_ENABLED": True,
        "RETRY_TIMES": cfg["retries"],
        "REDIRECT_MAX_TIMES": cfg["max_redirects"],
        "METAREFRESH_ENABLED": False,
        "CLOSESPIDER_TIMEOUT": cfg["max_seconds"],
        "COOKIES_ENABLED": False,
        "TELNETCONSOLE_ENABLED": False,
        "HTTPCACHE_ENABLED": False,
        "LOG_LEVEL": "ERROR",
    }


class PoliteSpider(scrapy.Spider):
    name = "hatchling"

    def __init__(self, config: dict, guard: AddressGuard, **kwargs):
        super().__init__(**kwargs)
        self.cfg = config
        self.guard = guard
        self.refused: list[dict] = []         # the first requests refused for their address: {"url", "reason"}
        self.bot_name = config["user_agent"].split("/")[0]
        self.allowed_hosts = {urlsplit(s).hostname for s in config["seeds"]} | set(config["allowed_domains"])
        self.allowed_domains = sorted(self.allowed_hosts)        # Scrapy's offsite check (redirects)
        self.frontier: deque[tuple[str, int]] = deque()
        self.seen: set[str] = set()
        self.hashes: set[str] = set()
        self.counts: Counter = Counter()
        self.seed_errors: dict[str, str] = {}
        self.errors: dict[str, dict] = {}     # error text -> {"error", "url" (the first), "count", "traceback"}
        self.fatal: dict | None = None        # what stopped the crawl (an error of the environment)
        self.progress = tqdm(total=config["max_pages"], desc="crawl", unit="page", file=sys.stdout,
                             disable=not config["progress"], mininterval=2)
        self.requested = self.fetched = self.bytes = self.offsite_links = self.refused_non_public = 0
        for seed in config["seeds"]:
            self._enqueue(seed, 0)

    @classmethod
    def from_crawler(cls, crawler, *args, **kwargs):
        spider = super().from_crawler(crawler, *args, **kwargs)
        crawler.signals.connect(spider.on_headers, signal=signals.headers_received)
        return spider

    def on_host(self, url: str) -> bool:
        host = urlsplit(url).hostname or ""
        return any(host == h or host.endswith("." + h) for h in self.allowed_hosts)

    def _enqueue(self, url: str, depth: int) -> None:
        if url in self.seen or depth > self.cfg["max_depth"]:
            return
        self.seen.add(url)
        if not self.on_host(url):
            self.offsite_links += 1
            return
        self.frontier.append((url, depth))

    def _next(self):
        """The next request of the breadth-first frontier, if the page cap allows one."""
        if self.frontier and self.requested < self.cfg["max_pages"]:
            url, depth = self.frontier.popleft()
            self.requested += 1
            yield scrapy.Request(url, callback=self.parse, errback=self.failed, dont_filter=True,
                                 cb_kwargs={"depth": depth}, meta={"seed": depth == 0})

    async def start(self):
        for request in self._next():
            yield request

    def on_headers(self, headers, body_length, request, spider):
        """Stop a download as soon as its headers say it is not text, or too large (a body without
        Content-Length that grows too large is cut by DOWNLOAD_MAXSIZE)."""
        if request.meta.get("dont_obey_robotstxt"):
            return
        ctype = headers.get(b"Content-Type", b"").decode("latin-1").split(";")[0].strip().lower()
        if ctype and ctype not in TEXT_TYPES:
            request.meta["drop"] = "type"
            raise StopDownload(fail=True)
        if body_length > self.cfg["max_page_kb"] * 1024:
            request.meta["drop"] = "size"
            raise StopDownload(fail=True)

    def parse(self, response, depth: int):
        self.progress.update()
        self.fetched += 1
        self.bytes += len(response.body)
        try:
            yield from self._keep_or_drop(response, depth)
        except Exception as error:
            self._error(response.url, error)
        yield from self._next()

    def _error(self, url: str, error: BaseException) -> None:
        """Count a page lost to `error` and list it. An error of the environment rather than of the
        page (a package that fails to import) stops the crawl: every later page would fail alike."""
        self.counts["error"] += 1
        text = error_text(error)
        if text in self.errors:
            self.errors[text]["count"] += 1
        elif len(self.errors) < LISTED_ERRORS:          # the traceback of each's first: a bug in our code shows
            self.errors[text] = {"error": text, "url": url, "count": 1,
                                 "traceback": "".join(traceback.format_exception(error))}
        if environment_fault(error):
            self.fatal = fatal(error, url)
            raise CloseSpider("broken-environment")

    def _keep_or_drop(self, response, depth: int):
        if not isinstance(response, TextResponse):
            self.counts["type"] += 1
            return
        ctype = response.headers.get(b"Content-Type", b"text/html").decode("latin-1").split(";")[0].strip().lower()
        if ctype in HTML_TYPES:
            page = analyze_html(response.text, response.url, self.bot_name)
            if not page.nofollow:
                for link in page.links:
                    self._enqueue(link, depth + 1)
            if page.noindex:
                self.counts["meta-robots"] += 1
                return
            text, evidence = page.text, page.license_evidence
        else:
            text = response.text.strip()
            evidence = license_sentences(text)
        if not self.cfg["min_chars"] <= len(text) <= self.cfg["max_chars"]:
            self.counts["size"] += 1
            return
        lang, prob = detect_language(text)
        if lang not in self.cfg["languages"] or prob < self.cfg["min_lang_prob"]:
            self.counts["language"] += 1
            return
        rules = self.cfg["license"]
        label, denied = classify_license(evidence, rules["allow"], rules["deny"])
        if denied or (label is None and rules["unknown"] == "drop"):
            self.counts["license"] += 1
            return
        digest = sha1(text.encode("utf-8")).hexdigest()
        if digest in self.hashes:
            self.counts["duplicate"] += 1
            return
        self.hashes.add(digest)
        yield {"id": doc_id(response.url), "url": response.url, "text": text,
               "lang": lang, "license": label or "unknown", "fetched_at": self.cfg["fetched_at"],
               "sha1": digest, "depth": depth}

    def _refusal(self, failure) -> str | None:
        """Why the guard refused the request (before it was sent, or at connect time), else None."""
        if failure.check(RefusedAddress):
            return str(failure.value)
        if failure.check(CannotResolveHostError, DNSLookupError):
            host, port = url_host_port(failure.request.url)
            why = self.guard.refusals.get((host.lower(), port))
            return f"refused at connect: {why}" if why else None
        return None

    def failed(self, failure):
        self.progress.update()
        request = failure.request
        refused = self._refusal(failure)
        if refused:
            self.refused_non_public += 1
            if len(self.refused) < LISTED_ERRORS:
                self.refused.append({"url": request.url, "reason": refused})
            if request.meta.get("seed"):
                self.seed_errors[request.url] = refused
            yield from self._next()
            return
        if failure.check(IgnoreRequest):
            reason = "robots" if "robots" in str(failure.value).lower() else "error"
        elif failure.check(StopDownload):
            reason = request.meta.get("drop", "type")
        elif failure.check(CancelledError, DownloadCancelledError):     # body grew past DOWNLOAD_MAXSIZE
            reason = "size"
        else:
            reason = "error"
        if reason == "error":
            if request.meta.get("seed"):
                self.seed_errors[request.url] = error_text(failure.value)
            self._error(request.url, failure.value)
        else:
            self.counts[reason] += 1
        yield from self._next()


def crawl(config: dict) -> dict:
    """Run one crawl in this process (once per process); return documents, counts, errors and
    timings, or only what stopped it (``fatal``) when it could not start."""
    from scrapy.crawler import CrawlerProcess

    guard = AddressGuard.for_seeds(config["seeds"], config["allow_private"])
    process = CrawlerProcess(settings=crawl_settings(config, guard), install_root_handler=False)
    crawler = process.create_crawler(PoliteSpider)
    docs: list[dict] = []

    def collect(item, **_):
        docs.append(dict(item))

    crawler.signals.connect(collect, signal=signals.item_scraped, weak=False)
    not_started: list = []      # Scrapy would only log why a crawl could not start (e.g. a middleware's import)
    t0 = time.perf_counter()
    process.crawl(crawler, config=config, guard=guard).addErrback(not_started.append)
    process.start()
    if not_started:
        return {"fatal": fatal(not_started[0].value, url=None)}
    seconds = time.perf_counter() - t0
    bar = crawler.spider.progress
    bar.total = bar.n               # the frontier ran out before max_pages: the bar ends full, at what was done
    bar.close()
    spider, stats = crawler.spider, crawler.stats.get_stats()
    return {"docs": docs, "counts": dict(spider.counts), "seed_errors": spider.seed_errors,
            "errors": list(spider.errors.values()), "fatal": spider.fatal,
            "requested": spider.requested, "offsite_links": spider.offsite_links, "fetched": spider.fetched,
            "refused_non_public": spider.refused_non_public, "refused": spider.refused,
            "bytes": spider.bytes,
            "retries": stats.get("retry/count", 0), "finish_reason": stats.get("finish_reason", ""),
            "seconds": seconds}


def main(argv: list[str]) -> None:
    config_path, result_path = argv
    with open(config_path, encoding="utf-8") as f:
        result = crawl(json.load(f))
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1:])
