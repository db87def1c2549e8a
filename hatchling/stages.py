"""The pipeline's stages, declared once.

Each :class:`Stage` names its function, the params.yaml sections it reads, the data it reads
(upstream stages' outputs), the code whose change invalidates it, its outputs, metrics file and
plots. ``dvc.yaml`` is generated from this list (``hatchling dvc-yaml``; a test checks the file
in the repo is current) and ``flows/pipeline.py`` builds the Prefect flow from it, so a stage
added here shows up in both orchestrators and in MLflow with no second edit.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import functools
import hashlib
import importlib
import json
import logging
import os
import posixpath
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml
from pydantic import BaseModel

import hatchling
from hatchling.config import RUN_KEYS, Params, load_params, load_yaml, validate_params
from hatchling.context import Declared, StageContext
from hatchling.errors import ConfigError, StageError
from hatchling.io import atomic_write_json, complete, hash_paths, outputs_together, written

PACKAGE = Path(hatchling.__file__).resolve().parent      # hatchling/ ; its parent is the repo the code lists name
LOCKS = ".hatchling/locks"      # under the project root: one <stage>.lock per stage (git- and DVC-ignored)
COMMITS = ".hatchling/commits"  # ... and <stage>.json while a stage's new outputs are being put in place
_HELD: set[int] = set()         # the lock descriptors this process holds
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plot:
    """A CSV log with a `step` column, and the charts `dvc plots show` draws from it: title -> columns
    (a stage's plots that name the same title share one chart)."""

    path: str
    charts: Mapping[str, tuple[str, ...]]


def training_logs(stage: str) -> dict[str, Plot]:
    """The trainer's two logs: every step (train loss, lr, ...) and every evaluation (val loss, bits/byte)."""
    return {"log": Plot(f"logs/{stage}.csv", {"loss": ("train_loss",), "learning rate": ("lr",)}),
            "eval_log": Plot(f"logs/{stage}_eval.csv", {"loss": ("val_loss",), "val bits per byte": ("val_bpb",)})}


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str                      # "module:function" with signature run(ctx: StageContext) -> metrics
    params: tuple[str, ...]         # params.yaml sections it reads
    inputs: Mapping[str, str] = field(default_factory=dict)    # name -> data it reads (path under the root)
    outputs: Mapping[str, str] = field(default_factory=dict)   # name -> what it writes, cached by DVC
    # resume state, kept across reruns: written by the stage but no DVC output (a queued or --temp
    # experiment's workspace, or a clone, lacks it and that must not rerun the stage)
    persist: Mapping[str, str] = field(default_factory=dict)
    plots: Mapping[str, Plot] = field(default_factory=dict)    # CSV logs with a `step` column
    reports: Mapping[str, str] = field(default_factory=dict)   # further human-readable reports (not cached)
    network: bool = False           # retried by the Prefect flow
    headline: tuple[str, ...] = ()  # metrics copied to the pipeline's MLflow run (a mapping: all its leaves)
    model: str | None = None        # the output that is a trained model: logged as an MLflow model
    distributed: bool = False       # trains across torchrun's processes (DDP / FSDP); other stages run in one
    registers: bool = False         # ... and registered (the pipeline's final model)
    description: str = ""

    @property
    def metrics(self) -> str:
        return f"reports/{self.name}.json"

    @property
    def deps(self) -> tuple[str, ...]:
        return tuple(self.inputs.values())

    @property
    def outs(self) -> tuple[str, ...]:
        return tuple(self.outputs.values())

    @property
    def kept_in_git(self) -> tuple[str, ...]:
        """Its plots' logs and its reports: DVC outputs with ``cache: false``, which git keeps."""
        return (*(p.path for p in self.plots.values()), *self.reports.values())

    @property
    def written(self) -> dict[str, str]:
        """Every path the stage writes, by name (its metrics file aside)."""
        return {**self.outputs, **self.persist, **{k: p.path for k, p in self.plots.items()}, **self.reports}

    @property
    def module(self) -> str:
        return self.entry.split(":")[0]

    @property
    def code(self) -> tuple[str, ...]:
        """The source files whose change reruns the stage: its entry module's import closure, and the
        params schema (whose defaults are part of what the stage is given)."""
        files = {*import_closure(self.module), PACKAGE / "config.py"}
        return tuple(sorted(str(path.relative_to(PACKAGE.parent)) for path in files))

    def function(self) -> Callable[[StageContext], dict]:
        module, func = self.entry.split(":")
        return getattr(importlib.import_module(module), func)


STAGES: tuple[Stage, ...] = (
    Stage("crawl", "hatchling.data.crawl.stage:run", params=("crawl",),
          outputs={"crawl": "data/crawl"}, network=True, headline=("kept", "characters"),
          description="polite Scrapy crawl of the seeds (default: a local docs mirror on 127.0.0.1)"),
    Stage("tasks", "hatchling.tasks.stage:run", params=("tasks", "contamination", "benchmarks"),
          inputs={"crawl": "data/crawl", "benchmarks": "data/benchmarks"}, outputs={"tasks": "data/tasks"},
          description="verifiable math and code tasks (train / held-out) and docs QA chats for SFT, RLVR, eval"),
    Stage("dedup", "hatchling.data.dedup_stage:run", params=("dedup", "contamination", "benchmarks"),
          inputs={"crawl": "data/crawl", "tasks": "data/tasks", "benchmarks": "data/benchmarks"},
          outputs={"dedup": "data/dedup"}, headline=("kept", "near_dups", "contaminated_dropped"),
          reports={"report": "reports/dedup.md", "contamination": "reports/contamination.json"},
          description="exact + MinHash-LSH near-duplicate removal, benchmark-contamination check"),
    Stage("tokenize", "hatchling.data.tokenize:run", params=("tokenize",), inputs={"dedup": "data/dedup"},
          outputs={"tokenized": "data/tokenized"}, headline=("train_tokens", "bytes_per_token"),
          description="train byte-level BPE, pack train/val token files"),
    Stage("pretrain", "hatchling.train.pretrain:run", params=("model", "train", "pretrain"),
          inputs={"tokenized": "data/tokenized"}, outputs={"model": "checkpoints/pretrain"},
          persist={"run": "checkpoints/pretrain-run"}, plots=training_logs("pretrain"),
          headline=("val_loss", "val_bpb"), model="model", distributed=True,
          description="next-token pretraining of the hybrid LM"),
    Stage("sft", "hatchling.train.sft:run", params=("train", "sft"),
          inputs={"init": "checkpoints/pretrain", "tasks": "data/tasks"}, outputs={"model": "checkpoints/sft"},
          persist={"run": "checkpoints/sft-run"}, plots=training_logs("sft"),
          headline=("val_loss", "val_bpb"), model="model", distributed=True,
          description="chat SFT of the pretrained model, loss on assistant tokens only"),
    Stage("rlvr", "hatchling.train.rlvr:run", params=("rlvr",),
          inputs={"init": "checkpoints/sft", "tasks": "data/tasks"}, outputs={"model": "checkpoints/rlvr"},
          persist={"run": "checkpoints/rlvr-run"},
          plots={"log": Plot("logs/rlvr.csv", {"reward": ("reward_mean", "pass_rate"), "KL": ("kl", "kl_coef")})},
          headline=("tier", "heldout_pass_before", "heldout_pass_after", "heldout_gain", "heldout_sampled_gain"),
          model="model", registers=True,
          description="PPO-lite RL with verifiable math/code rewards and adaptive KL to the SFT policy"),
    Stage("eval", "hatchling.eval.stage:run", params=("eval", "benchmarks"),
          inputs={"pretrain": "checkpoints/pretrain", "sft": "checkpoints/sft", "rlvr": "checkpoints/rlvr",
                  "tokenized": "data/tokenized", "tasks": "data/tasks", "benchmarks": "data/benchmarks",
                  "contamination": "reports/contamination.json", "pretrain_report": "reports/pretrain.json",
                  "rlvr_report": "reports/rlvr.json", "pretrain_eval_log": "logs/pretrain_eval.csv",
                  "sft_log": "logs/sft.csv", "sft_eval_log": "logs/sft_eval.csv", "rlvr_log": "logs/rlvr.csv"},
          reports={"report": "reports/eval.md", "training_plot": "reports/eval_training.png",
                   "probes_plot": "reports/eval_probes.png"}, headline=("scores",),
          description="benchmarks and the task ladder, the probe bench, the report card with its figures"),
    Stage("export", "hatchling.export.stage:run", params=("export",),
          inputs={"pretrain": "checkpoints/pretrain", "sft": "checkpoints/sft", "rlvr": "checkpoints/rlvr",
                  "tokenized": "data/tokenized"}, outputs={"export": "checkpoints/export"},
          headline=("int8_val_bpb", "fp32_decode_ms_per_token", "int8_decode_ms_per_token"),
          description="INT8 and bf16 artifacts, measured against fp32"),
)


def module_file(module: str) -> Path | None:
    """The source file of a module of the hatchling package (None outside it)."""
    parts = module.split(".")
    if parts[0] != "hatchling":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def module_imports(module: str) -> frozenset[str]:
    """The hatchling modules `module` imports anywhere in its source (module level or inside functions);
    `from pkg import name` counts as pkg.name when that is a module, else as pkg."""
    path = module_file(module)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" if module_file(f"{node.module}.{alias.name}") else node.module
                     for alias in node.names]
        else:
            continue
        found |= {name for name in names if module_file(name)}
    return frozenset(found)


def import_closure(module: str) -> list[Path]:
    """Source files of `module`, everything it imports within hatchling (transitively), and the
    packages' __init__ files that importing them runs."""
    seen, frontier = set(), [module]
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        frontier += [".".join(parts[:i]) for i in range(1, len(parts))]      # parent packages run first
        frontier += module_imports(name)
    return sorted({module_file(name) for name in seen})


def context(name: str, params: Params, root: Path = Path("."),
            log: Callable[[dict, int], None] = lambda metrics, step: None) -> StageContext:
    stage = get_stage(name)
    root = Path(root).resolve()
    return StageContext(name, root, Declared(name, "params section", {s: getattr(params, s) for s in stage.params}),
                        Declared(name, "input", {k: root / v for k, v in stage.inputs.items()}),
                        Declared(name, "output", {k: root / v for k, v in stage.written.items()}),
                        lambda: hash_paths(stage.code, PACKAGE.parent), log)


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise StageError(f"unknown stage {name!r}; stages are: {', '.join(s.name for s in STAGES)}")


def upstream(stage: Stage) -> list[str]:
    """Names of the stages whose outputs this stage reads."""
    return [s.name for s in STAGES if set(s.written.values()) & set(stage.deps)]


def with_upstream(names: list[str]) -> set[str]:
    """The named stages and every stage they depend on, transitively (what `dvc repro NAME` runs)."""
    wanted, frontier = set(), [get_stage(n).name for n in names]
    while frontier:
        name = frontier.pop()
        if name not in wanted:
            wanted.add(name)
            frontier += upstream(get_stage(name))
    return wanted


def topological_order() -> list[Stage]:
    done: list[Stage] = []
    pending = list(STAGES)
    while pending:
        ready = [s for s in pending if all(u in {d.name for d in done} for u in upstream(s))]
        if not ready:
            raise StageError("stage graph has a cycle: " + ", ".join(s.name for s in pending))
        done += ready
        pending = [s for s in pending if s not in ready]
    return done


def dvc(args: list[str], root: Path) -> str:
    """`dvc ARGS` run in the project `root` (DVC's command line: its Python API resolves stages against the
    process's working directory), waiting for DVC's repo lock rather than giving up after 3 s (another dvc
    command may hold it a moment); what it printed, or StageError with its message."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "--wait-for-lock", *args], cwd=root, capture_output=True,
                          text=True)
    if proc.returncode:
        raise StageError(f"dvc {' '.join(args)} failed in {root}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def dvc_stale(names: list[str], root: Path) -> set[str]:
    """Which of the stages `dvc status` finds changed: deps, params or outputs other than dvc.lock
    recorded (the ones `dvc repro` would run)."""
    if not names:
        return set()
    out = dvc(["status", "--json", *names], root)
    try:
        return set(json.loads(out or "{}"))
    except json.JSONDecodeError:
        raise StageError(f"dvc status --json printed what is not JSON in {root}: {out[:300]!r}") from None


def skipped_by_dvc(stage: Stage, root: Path) -> set[str]:
    """Under `dvc repro`, as `stage` runs: the stages DVC skips as up to date, those `dvc status` finds
    unchanged and downstream of none that changed (which DVC may yet run, `stage` among them). The stages
    downstream of `stage` are not asked about: DVC holds `stage`'s outputs, which they read, while it runs."""
    others = [s.name for s in STAGES if stage.name not in with_upstream([s.name])]
    stale = dvc_stale(others, root) | {stage.name}
    return {s.name for s in STAGES if not with_upstream([s.name]) & stale}


def dvc_params(stage: Stage) -> list[str]:
    """The params keys DVC tracks for a stage: its sections, and the run-level settings its sections
    inherit (progress bars change no output)."""
    inherited = {key for section in stage.params for key in RUN_KEYS
                 if key != "progress" and key in getattr(Params.model_fields[section].annotation, "model_fields", {})}
    return [*stage.params, *(f"run.{key}" for key in RUN_KEYS if key in inherited)]


def _named_paths(value, keywords: list[str]) -> list[str]:
    """The paths in a reads_paths field's value (a path, a list of them, a {name: path} mapping)."""
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, str) and v and v not in keywords and not re.match(r"\w+:(?![/\\])", v)]


def param_paths(stage: Stage, params: Params) -> list[str]:
    """The files and directories the stage's params sections name (the fields hatchling/config.py marks
    with reads_paths, at any depth), in order, once each."""
    found: list[str] = []

    def visit(spec, value) -> None:
        marked = spec.json_schema_extra if isinstance(spec.json_schema_extra, dict) else {}
        if "reads_paths" in marked:
            found.extend(_named_paths(value, marked["reads_paths"]))
        elif isinstance(value, BaseModel):
            for name, field_spec in type(value).model_fields.items():
                visit(field_spec, getattr(value, name))

    for section in stage.params:
        visit(Params.model_fields[section], getattr(params, section))
    return list(dict.fromkeys(found))


def _within(path: str, places) -> bool:
    path = posixpath.normpath(path)
    return any(path == place or path.startswith(place.rstrip("/") + "/") for place in map(posixpath.normpath, places))


def param_deps(stage: Stage, params: Params) -> list[str]:
    """The files the stage's params name that lie outside its declared inputs and its own outputs: deps
    beside them (a changed sft.data file reruns sft), for DVC and the Prefect flow's cache key alike."""
    named = [posixpath.normpath(p) for p in param_paths(stage, params)]
    return [p for p in dict.fromkeys(named) if not _within(p, [*stage.deps, *stage.written.values()])]


def dvc_deps(stage: Stage, params: Params) -> list[str]:
    """A stage's DVC deps: its declared inputs, the files its params name (:func:`param_deps`), then its code."""
    return [*stage.deps, *param_deps(stage, params), *stage.code]


def dvc_yaml(params: Params) -> dict:
    """The dvc.yaml document for the registry, with the paths `params` (params.yaml) name as deps. A
    stage's resume state (`persist`) is not among its outs: DVC would count it missing, and rerun the
    stage, wherever it is absent (a queued or --temp experiment's workspace, a fresh clone after
    `dvc pull`). Every DVC output is marked `persist: true` (DVC's flag, not the Stage field): DVC
    deletes unmarked outputs before it runs the stage, so a stage that failed or was killed under
    `dvc repro` left none (and lost its reports, which DVC does not cache); kept in place, they are
    replaced only once the stage has ended well (run_stage). The price: DVC keeps no run-cache entry
    for a stage with a persist output (params that ran before run again instead of being restored)."""
    stages = {}
    for s in STAGES:
        entry: dict = {"cmd": f"python -m hatchling run {s.name}", "deps": dvc_deps(s, params), "params": dvc_params(s),
                       "outs": [*({o: {"persist": True}} for o in s.outs),
                                *({r: {"cache": False, "persist": True}} for r in s.kept_in_git)],
                       "metrics": [{s.metrics: {"cache": False, "persist": True}}]}
        if s.description:
            entry["desc"] = s.description
        stages[s.name] = entry
    # each chart once, from these top-level definitions only (a stage-level `plots:` entry would draw
    # its CSV a second time with DVC's guessed fields); charts of one title merge their CSVs' columns
    charts: dict[str, dict] = {}
    for s in STAGES:
        for plot in s.plots.values():
            for title, columns in plot.charts.items():
                chart = charts.setdefault(f"{s.name} {title}", {"x": "step", "y": {}, "title": f"{s.name}: {title}",
                                                                "x_label": "step", "y_label": title})
                chart["y"][plot.path] = list(columns)
    plots = [{name: chart} for name, chart in charts.items()]
    return {"stages": stages, "plots": plots}


def dvc_yaml_text(params: Params) -> str:
    header = ("# Generated from hatchling/stages.py and the paths params.yaml names, by `hatchling dvc-yaml`: edit "
              "those, not this file.\n")
    return header + yaml.safe_dump(dvc_yaml(params), sort_keys=False)


def input_digests(stage: Stage, root: Path) -> dict[str, str]:
    """Each declared input's content hash, by name (hashed once per run: the input hash, MLflow's
    dataset inputs and the Prefect cache key all come from these)."""
    return {name: hash_paths([path], root) for name, path in stage.inputs.items()}


def input_hash(stage: Stage, root: Path, digests: dict[str, str] | None = None) -> str:
    """One hash of all the stage's inputs (of `digests` when already computed)."""
    digests = input_digests(stage, root) if digests is None else digests
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def describe_run(params: Params, root: Path) -> dict:
    """What names a pipeline run in MLflow: its flattened params, their digest, and the keys whose
    values differ from the params.yaml of the checkout's commit (an experiment's `-S` overrides, an
    edit not yet committed, a `--set`, a profile such as params-gpu.yaml)."""
    from hatchling.tracking import flatten

    flat = flatten(params.model_dump(mode="json"))
    try:
        # ./: the params.yaml of this folder, also where the project is a subfolder of its repository
        committed = subprocess.run(["git", "show", "HEAD:./params.yaml"], cwd=root, capture_output=True, text=True)
    except OSError:                          # no git on this machine (doctor: optional): nothing to compare with
        committed = None
    overrides = []
    if committed is not None and committed.returncode == 0:
        try:
            baseline = flatten(validate_params(load_yaml(committed.stdout) or {}).model_dump(mode="json"))
        except (ConfigError, yaml.YAMLError):
            baseline = {}                    # the committed file predates the schema: everything differs
        overrides = [f"{k}={v}" for k, v in sorted(flat.items()) if baseline.get(k) != v]
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()
    return {"params": flat, "params_digest": digest, "overrides": overrides}


def reported_headline(stage: Stage, root: Path) -> dict[str, float]:
    """The headline numbers of the stage's last report (reports/<stage>.json), none when it has none."""
    try:
        return headline(stage, json.loads((root / stage.metrics).read_text()))
    except (OSError, ValueError):
        return {}


def headline(stage: Stage, metrics: dict) -> dict[str, float]:
    """The stage's declared headline metrics; a mapping contributes every numeric leaf (a.b.c)."""
    out: dict[str, float] = {}

    def add(name: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{name}.{k}" if name else k, v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name.replace("@", "_at_")] = float(value)        # MLflow names have no "@"

    for key in stage.headline:
        if key in metrics:
            add("" if isinstance(metrics[key], dict) else key, metrics[key])
    return out


class StageLocked(StageError):
    """A stage that another process is running in this project, or whose inputs or readers another
    process's stage is rewriting or reading; the message names that process's PID, command and start.
    (Defined here, by the runner, and not in errors.py: the stages' own code, whose change reruns them
    all under DVC, need not know of it.)"""


def _try_lock(path: str | Path, shared: bool = False) -> int | None:
    """Open `path` (made with its folders if missing) and take an OS lock on it (flock: exclusive, or
    shared with other shared holders) without waiting: the open descriptor, or None when another
    holder has a conflicting lock. `_release` releases it, and so does the end of the process however
    it ends (SIGKILL included; its forked children close their copies), so a lock never outlives its holder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        _HELD.add(fd)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release(fd: int) -> None:
    if fd in _HELD:
        _HELD.discard(fd)
        os.close(fd)


def _forget_locks() -> None:
    """In a forked child (a worker pool's): close the inherited lock descriptors, so that the lock
    ends with the process that took it and is not kept by its workers should it be killed."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks)


def _holder(path: Path, holding: bool = True) -> str:
    """Who holds (or, `holding` False, last held) a stage's lock, from what its holder wrote in the file."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or not info.get("pid"):
        return "another process"
    here = info.get("host") in (None, socket.gethostname())
    who = (f"PID {info['pid']}{'' if here else ' on ' + str(info['host'])} ({info.get('command', '?')}) "
           f"since {info.get('since', '?')}")
    if holding and here:
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:      # it died, but a process it forked still has the lock open
            who += " (that process has ended: a process it started still holds the lock)"
        except (OSError, ValueError):
            pass
    return who


def _running(path: Path) -> bool:
    """Whether a stage's own run holds its lock (exclusively: readers of its outputs share it)."""
    probe = _try_lock(path, shared=True)
    if probe is not None:
        _release(probe)
    return probe is None


def _take_locks(stage: Stage, locks: Path) -> tuple[list[int], str]:
    """The stage's own lock (exclusive) and its upstream stages' (shared), all or none: the open
    descriptors, or none and why not."""
    own = locks / f"{stage.name}.lock"
    fd = _try_lock(own)
    if fd is None:
        if _running(own):
            return [], f"stage {stage.name} is locked by {_holder(own)}"
        readers = [s.name for s in STAGES if stage.name in upstream(s) and _running(locks / f"{s.name}.lock")]
        return [], (f"stage {stage.name} cannot rewrite its outputs while stage {readers[0]} reads them: "
                    f"{readers[0]} is locked by {_holder(locks / f'{readers[0]}.lock')}" if readers else
                    f"stage {stage.name} is locked by another process")
    taken = [fd]
    for name in upstream(stage):
        fd = _try_lock(locks / f"{name}.lock", shared=True)
        if fd is None:
            for taken_fd in taken:
                _release(taken_fd)
            return [], (f"stage {stage.name} cannot read the outputs of stage {name} while they are rewritten: "
                        f"{name} is locked by {_holder(locks / f'{name}.lock')}")
        taken.append(fd)
    return taken, ""


@contextlib.contextmanager
def stage_lock(name: str, root: Path = Path("."), timeout: float = 0.0) -> Iterator[Path]:
    """Hold stage `name`'s lock in the project at `root` (yields the lock file): one writer at a time
    per stage, and no stage rewrites outputs that a running stage reads (it holds its upstream
    stages' locks shared). Waits up to `timeout` seconds, then raises StageLocked naming the holder's
    PID, command and start time. The OS drops a lock when its holder dies (SIGKILL included), so a
    lock left by a killed run is simply taken over."""
    stage = get_stage(name)
    locks = Path(root).resolve() / LOCKS
    deadline = time.monotonic() + timeout
    while True:
        taken, why = _take_locks(stage, locks)
        if taken:
            break
        if time.monotonic() >= deadline:
            raise StageLocked(why)
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    own = taken[0]
    try:
        left = os.pread(own, 4096, 0)          # a holder that ended cleanly emptied it: one that was killed did not
        if left.strip():
            log.info("stage %s: taking over the lock left by %s", name, _holder(locks / f"{name}.lock", False))
        program = Path(sys.argv[0]) if sys.argv and sys.argv[0] not in ("", "-c") else Path("python -c")
        program = f"python -m {program.parent.name}" if program.name == "__main__.py" else program.name
        command = " ".join([program, *map(shlex.quote, sys.argv[1:])])
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "since": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")}
        os.ftruncate(own, 0)
        os.pwrite(own, (json.dumps(info) + "\n").encode(), 0)
        yield locks / f"{name}.lock"
    finally:
        if own in _HELD:           # not in a forked child, which closed its copies at the fork
            with contextlib.suppress(OSError):
                os.ftruncate(own, 0)
        for fd in taken:
            _release(fd)


def run_stage(name: str, params: Params | None = None, root: Path = Path("."),
              params_path: str | Path = "params.yaml", overrides: list[str] = ()) -> dict:
    """Run one stage: validate params and inputs first, track it in MLflow, write its report. It holds
    the stage's lock (:func:`stage_lock`) throughout, so a second run of it, or of a stage that reads
    or writes its outputs, in the same project stops with StageLocked instead of interleaving. Its
    outputs (and metrics) are put in place together once it has ended well (hatchling.io's
    outputs_together): a run that fails or is killed leaves all of the previous ones."""
    stage = get_stage(name)
    root = Path(root)
    if params is None:
        params = load_params(root / params_path, overrides)     # an absolute params_path stays as it is
    check_world(stage, params, int(os.environ.get("WORLD_SIZE", "1")))
    leader = int(os.environ.get("RANK", "0")) == 0       # torchrun: rank 0 alone locks, tracks and reports
    with stage_lock(name, root) if leader else contextlib.nullcontext():
        if leader and (moved := complete(commit_journal(name, root), root)):
            log.warning("stage %s: its last run was killed while putting its new outputs in place; moved in the rest "
                        "first: %s", name, ", ".join(moved))
        return _run_locked(stage, params, root, leader)


def commit_journal(name: str, root: Path) -> Path:
    """Where stage `name`'s run lists its new outputs while it puts them in place (hatchling.io's complete)."""
    return root / COMMITS / f"{name}.json"


def check_world(stage: Stage, params: Params, world: int) -> None:
    """ConfigError, before any work, where `world` processes (torchrun's WORLD_SIZE) cannot run the stage: one that
    does not train across processes (each would do all of its work, and all but one unlocked), or a batch that
    does not share out evenly."""
    if world <= 1:
        return
    if not stage.distributed:
        trainers = " and ".join(s.name for s in STAGES if s.distributed)
        raise ConfigError(f"stage {stage.name} runs in one process (only {trainers} train across torchrun's "
                          f"processes): run it as `hatchling run {stage.name}`")
    batch = getattr(params, stage.name).batch_size
    if batch % world:
        raise ConfigError(f"{stage.name}.batch_size {batch} does not divide across torchrun's {world} processes")


def _run_locked(stage: Stage, params: Params, root: Path, leader: bool) -> dict:
    from hatchling.tracking import StageRun, drop_skipped_record, end_failed, record_skipped

    name = stage.name
    if half := [up for up in upstream(stage) if commit_journal(up, root).exists()]:
        raise StageError(f"stage {half[0]}'s last run was killed while putting its new outputs in place: run "
                         f"`hatchling run {half[0]}` (it completes them first), then this stage")
    for dep in stage.deps:
        if not (root / dep).exists():
            producer = next((s.name for s in STAGES if dep in s.written.values()), None)
            hint = f" (output of stage {producer}: run `hatchling run {producer}` first)" if producer else ""
            raise StageError(f"stage {name} needs {dep}{hint}")
    fn = stage.function()
    if not leader:
        return fn(context(name, params, root))
    sections = {sec: params.section(sec) for sec in stage.params}
    digests = input_digests(stage, root)
    run = StageRun(name, sections, {"hatchling.input_hash": input_hash(stage, root, digests)}, root,
                   describe=describe_run(params, root))
    if run.orchestrator == "dvc":
        try:            # bookkeeping of the pipeline run: its failure must not fail the stage
            skipped = skipped_by_dvc(stage, root)
            record_skipped(run, {s.name: reported_headline(s, root) for s in topological_order() if s.name in skipped})
        except Exception as e:
            log.warning("the stages DVC skips are not recorded in MLflow: %s: %s", type(e).__name__, e)
    run.log_inputs({key: (stage.inputs[key], digest) for key, digest in digests.items()})
    home = root.resolve()           # as context() gives the stage its paths: the writes are known by them
    outputs = (*stage.outs, *stage.kept_in_git)
    try:
        with outputs_together([home / path for path in (*outputs, stage.metrics)], commit_journal(name, home), home):
            with run.system_metrics() if stage.model else contextlib.nullcontext():
                metrics = fn(context(name, params, root, run.log_metrics))
            # each output written by this run (under dvc repro, whose outputs persist, an old one is still there)
            if missing := [path for path in outputs if written(home / path) == home / path]:
                raise StageError(f"stage {name} did not write {', '.join(missing)}, which hatchling/stages.py "
                                 "declares as its outputs (dvc.yaml's outs): a bug in the stage")
            atomic_write_json(home / stage.metrics, metrics)
            run.log_summary(metrics)
            run.log_headline(headline(stage, metrics))
            for path in (stage.metrics, *(p.path for p in stage.plots.values()), *stage.reports.values()):
                run.log_artifact(written(home / path))
            if stage.model:
                from hatchling.registry import log_model

                log_model(run.run_id, run.uri, written(home / stage.outputs[stage.model]), register=stage.registers)
    except BaseException as error:
        end_failed(lambda error=error: run.fail(error), f"the run of stage {name}")
        raise
    run.end()
    if run.orchestrator == "dvc":
        try:
            drop_skipped_record(run)
        except Exception as e:
            log.warning("MLflow keeps stage %s's record as skipped: %s: %s", name, type(e).__name__, e)
    return metrics
