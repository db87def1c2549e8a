"""Stage `crawl`: crawl the seeds (or the local documentation mirror) into JSONL shards.

Writes data/crawl/shard-*.jsonl in the shared schema and reports/crawl.json (pages requested,
fetched, kept, dropped by reason, the first distinct errors, requests refused for a non-public
address, bytes, pages per second, duration).
A page that fails to be processed is dropped as `error`, its error listed in the report and logged
as a warning; an error of the environment (a package that fails to import) stops the crawl at
once. That, a crawl that keeps nothing, an unreachable seed or a malformed URL is an error with a
non-zero exit, and the previous shards stay as they were: the new shards replace the old ones only
after a successful crawl.
"""

from __future__ import annotations

import datetime
import json
import logging
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

from hatchling.data.corpus import write_shards
from hatchling.data.crawl.mirror import resolve_mirror, serve_directory, snapshot_date
from hatchling.data.crawl.page import doc_id
from hatchling.data.crawl.spider import DROP_REASONS
from hatchling.errors import BrokenEnvironment, StageError

logger = logging.getLogger(__name__)


class CrawlError(StageError):
    """A crawl that produced nothing usable."""


def run_spider(config: dict, timeout_s: float) -> dict:
    """Run the spider in a fresh process (Twisted's reactor cannot restart) and return its result."""
    with tempfile.TemporaryDirectory(prefix="hatchling-crawl-") as tmp:
        config_path, result_path = Path(tmp) / "config.json", Path(tmp) / "result.json"
        config_path.write_text(json.dumps(config))
        try:
            proc = subprocess.run([sys.executable, "-m", "hatchling.data.crawl.spider", str(config_path),
                                   str(result_path)], timeout=timeout_s, stderr=subprocess.PIPE, text=True)
        except subprocess.TimeoutExpired:
            raise CrawlError(f"crawl process did not finish within {timeout_s:.0f} s") from None
        if proc.returncode != 0 or not result_path.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise CrawlError(f"crawl process failed (exit {proc.returncode}):\n{tail}")
        return json.loads(result_path.read_text())


def spider_config(p, seeds: list[str], fetched_at: str | None = None) -> dict:
    """The spider's settings; `fetched_at` defaults to today (a mirror passes its snapshot's date)."""
    config = p.model_dump(mode="json")
    config["seeds"] = seeds
    config["fetched_at"] = fetched_at or datetime.datetime.now(datetime.UTC).date().isoformat()
    return config


def describe_errors(errors: list[dict]) -> str:
    return "; ".join(f"{e['count']} × {e['error']} (first at {e['url']})" for e in errors)


def check_result(result: dict, seeds: list[str]) -> None:
    fatal = result["fatal"]
    if fatal:
        where = f"stopped at {fatal['url']}" if fatal["url"] else "could not start"
        trace = f"the crawl process's traceback:\n{fatal['traceback']}"
        if fatal["environment"]:
            raise BrokenEnvironment(f"crawl: {where}: {fatal['error']} (the environment is broken, not the site)\n"
                                    f"{trace}")
        raise CrawlError(f"crawl: {where}: {fatal['error']}\n{trace}")
    if result["seed_errors"] and len(result["seed_errors"]) == len(seeds):
        detail = "; ".join(f"{url}: {why}" for url, why in result["seed_errors"].items())
        raise CrawlError(f"crawl: no seed could be fetched ({detail})")
    if not result["docs"]:
        dropped = {k: v for k, v in result["counts"].items() if v}
        errors = f"; errors: {describe_errors(result['errors'])}" if result["errors"] else ""
        raise CrawlError(f"crawl: the seeds {seeds} yielded no documents to keep ({result['requested']} pages "
                         f"requested, {result['fetched']} fetched, dropped: {dropped}{errors})")


def run(ctx) -> dict:
    p = ctx.params.crawl
    with tempfile.TemporaryDirectory(prefix="hatchling-mirror-") as scratch:
        mirror_name = fetched_at = None
        if p.seeds:
            server, seeds = nullcontext(None), list(p.seeds)
        else:
            mirror_name, mirror_dir = resolve_mirror(p.mirror, p.pydoc_modules, Path(scratch))
            server, fetched_at = serve_directory(mirror_dir), snapshot_date(mirror_name, mirror_dir)
        with server as base:
            if base is not None:
                seeds = [base + p.mirror_start]
            result = run_spider(spider_config(p, seeds, fetched_at), timeout_s=p.max_seconds + 120)
    traces = [error.pop("traceback") for error in result.get("errors", [])]     # logged, not reported
    if traces:
        logger.warning("crawl: pages dropped for errors (%d): %s; the first of each:\n%s", result["counts"]["error"],
                       describe_errors(result["errors"]), "\n".join(traces))
    check_result(result, seeds)
    docs, errors = result["docs"], result["errors"]
    if base is not None:      # the mirror's port changes per run: name its pages by the mirror instead
        for page in (*docs, *errors, *(r for r in result["refused"] if r["url"].startswith(base))):
            page["url"] = f"mirror://{mirror_name}/" + page["url"][len(base):]
        for doc in docs:
            doc["id"] = doc_id(doc["url"])
    if result["refused_non_public"]:
        logger.warning("crawl: requests refused for a non-public address (%d): %s", result["refused_non_public"],
                       "; ".join(f"{r['url']} ({r['reason']})" for r in result["refused"]))
    shards = write_shards(docs, ctx.outputs.crawl, p.docs_per_shard)
    dropped = {reason: result["counts"].get(reason, 0) for reason in DROP_REASONS}
    seconds = result["seconds"]
    return {"seeds": seeds if base is None else [f"mirror://{mirror_name}/{p.mirror_start}"],
            "requested": result["requested"], "fetched": result["fetched"], "kept": len(docs),
            "dropped": dropped, "errors": errors, "offsite_links": result["offsite_links"],
            "refused_non_public": result["refused_non_public"], "refused": result["refused"],
            "retries": result["retries"], "bytes": result["bytes"],
            "characters": sum(len(d["text"]) for d in docs), "shards": shards,
            "pages_per_s": round(result["fetched"] / max(seconds, 1e-9), 2), "seconds": round(seconds, 3),
            "finish_reason": result["finish_reason"]}
