"""The pipeline's stages, declared once.

Each :class:`Stage` names its function, the params.yaml sections it reads, the data it reads
(upstream stages' outputs), the code whose change invalidates it, its outputs, metrics file and
plots. ``dvc.yaml`` is generated from this list (``hatchling dvc-yaml``; a test checks the file
in the repo is current) and ``flows/pipeline.py`` builds the Prefect flow from it, so a stage
added here shows up in both orchestrators and in MLflow with no second edit.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from hatchling.config import Params, load_params
from hatchling.errors import StageError
from hatchling.io import atomic_write_json, hash_paths


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str                      # "module:function" with signature run(params, root, log) -> metrics
    params: tuple[str, ...]         # params.yaml sections it reads
    deps: tuple[str, ...]           # data it reads
    code: tuple[str, ...]           # source whose change reruns it
    outs: tuple[str, ...]
    persist: tuple[str, ...] = ()   # outputs kept across reruns (resume checkpoints), not cached
    plots: tuple[str, ...] = ()     # CSV logs with a `step` column
    reports: tuple[str, ...] = ()   # further human-readable reports (not cached by DVC)
    network: bool = False           # retried by the Prefect flow
    description: str = ""

    @property
    def metrics(self) -> str:
        return f"reports/{self.name}.json"

    def function(self):
        module, func = self.entry.split(":")
        return getattr(importlib.import_module(module), func)


STAGES: tuple[Stage, ...] = (
    Stage("crawl", "hatchling.data.crawl.stage:run", params=("crawl",), deps=(),
          code=("hatchling/data/crawl", "hatchling/data/corpus.py", "hatchling/io.py"), outs=("data/crawl",),
          network=True, description="polite Scrapy crawl of the seeds (default: a local docs mirror on 127.0.0.1)"),
    Stage("tasks", "hatchling.data.tasks_stage:run", params=("tasks", "benchmarks", "dedup"), deps=("data/crawl",),
          code=("hatchling/data/tasks.py", "hatchling/data/tasks_stage.py", "hatchling/data/decontam.py",
                "hatchling/data/textnorm.py", "hatchling/eval/datasets.py"),
          outs=("data/tasks",),
          description="verifiable math and code tasks (train / held-out) and docs QA chats for SFT, RLVR, eval"),
    Stage("dedup", "hatchling.data.dedup_stage:run", params=("dedup", "benchmarks"), deps=("data/crawl", "data/tasks"),
          code=("hatchling/data/dedup.py", "hatchling/data/decontam.py", "hatchling/data/dedup_stage.py",
                "hatchling/data/textnorm.py", "hatchling/eval/datasets.py"),
          outs=("data/dedup",), reports=("reports/dedup.md", "reports/contamination.json"),
          description="exact + MinHash-LSH near-duplicate removal, benchmark-contamination check"),
    Stage("tokenize", "hatchling.data.tokenize:run", params=("tokenize",), deps=("data/dedup",),
          code=("hatchling/data",), outs=("data/tokenized",),
          description="train byte-level BPE, pack train/val token files"),
    Stage("pretrain", "hatchling.train.pretrain:run", params=("model", "pretrain"), deps=("data/tokenized",),
          code=("hatchling/model", "hatchling/train"), outs=("checkpoints/pretrain",),
          persist=("checkpoints/pretrain-run",), plots=("logs/pretrain.csv",),
          description="next-token pretraining of the hybrid LM"),
    Stage("sft", "hatchling.train.sft:run", params=("sft",), deps=("checkpoints/pretrain", "data/tasks"),
          code=("hatchling/train", "hatchling/model", "hatchling/data/chat.py"), outs=("checkpoints/sft",),
          persist=("checkpoints/sft-run",), plots=("logs/sft.csv",),
          description="chat SFT of the pretrained model, loss on assistant tokens only"),
    Stage("rlvr", "hatchling.train.rlvr:run", params=("rlvr",), deps=("checkpoints/sft", "data/tasks"),
          code=("hatchling/train", "hatchling/model", "hatchling/eval/generation.py", "hatchling/sandbox.py"),
          outs=("checkpoints/rlvr",), plots=("logs/rlvr.csv",),
          description="PPO-lite RL with verifiable math/code rewards and adaptive KL to the SFT policy"),
    Stage("eval", "hatchling.eval.stage:run", params=("eval", "benchmarks"),
          deps=("checkpoints/pretrain", "checkpoints/sft", "checkpoints/rlvr", "data/tokenized", "data/tasks",
                "reports/contamination.json"),
          code=("hatchling/eval", "hatchling/sandbox.py", "hatchling/inference.py"), outs=(),
          reports=("reports/eval.md", "reports/eval_probes.png"),
          description="benchmarks (log-likelihood, GSM8K, HumanEval in the sandbox), long-range probes, report card"),
    Stage("export", "hatchling.export.stage:run", params=("export",),
          deps=("checkpoints/pretrain", "checkpoints/sft", "checkpoints/rlvr", "data/tokenized"),
          code=("hatchling/export", "hatchling/inference.py"), outs=("checkpoints/export",),
          description="INT8 and bf16 artifacts, measured against fp32"),
)


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise StageError(f"unknown stage {name!r}; stages are: {', '.join(s.name for s in STAGES)}")


def upstream(stage: Stage) -> list[str]:
    """Names of the stages whose outputs this stage reads."""
    return [s.name for s in STAGES if set(s.outs) & set(stage.deps)]


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


def dvc_yaml() -> dict:
    """The dvc.yaml document for the registry."""
    stages = {}
    for s in STAGES:
        entry: dict = {"cmd": f"hatchling run {s.name}", "deps": [*s.deps, *s.code], "params": list(s.params),
                       "outs": [*s.outs, *({p: {"persist": True, "cache": False}} for p in s.persist),
                                *({r: {"cache": False}} for r in s.reports)],
                       "metrics": [{s.metrics: {"cache": False}}]}
        if s.plots:
            entry["plots"] = [{p: {"cache": False}} for p in s.plots]
        if s.description:
            entry["desc"] = s.description
        stages[s.name] = entry
    plots = [{p: {"x": "step", "y": ["train_loss", "val_loss"]}} for s in STAGES for p in s.plots]
    return {"stages": stages, "plots": plots}


def dvc_yaml_text() -> str:
    header = "# Generated from hatchling/stages.py by `hatchling dvc-yaml`: edit the registry, not this file.\n"
    return header + yaml.safe_dump(dvc_yaml(), sort_keys=False)


def input_hash(stage: Stage, root: Path) -> str:
    return hash_paths(root / d for d in stage.deps)


def run_stage(name: str, params: Params | None = None, root: Path = Path("."),
              params_path: str | Path = "params.yaml", overrides: list[str] = ()) -> dict:
    """Run one stage: validate params and inputs first, track it in MLflow, write its report."""
    from hatchling.tracking import StageRun, end_failed

    stage = get_stage(name)
    root = Path(root)
    if params is None:
        params = load_params(root / params_path, overrides)     # an absolute params_path stays as it is
    for dep in stage.deps:
        if not (root / dep).exists():
            producer = next((s.name for s in STAGES if dep in (*s.outs, *s.reports)), None)
            hint = f" (output of stage {producer}: run `hatchling run {producer}` first)" if producer else ""
            raise StageError(f"stage {name} needs {dep}{hint}")
    fn = stage.function()
    if int(os.environ.get("RANK", "0")) != 0:     # torchrun: rank 0 alone tracks and reports
        return fn(params, root, lambda metrics, step: None)
    sections = {sec: params.section(sec) for sec in stage.params}
    run = StageRun(name, sections, {"hatchling.input_hash": input_hash(stage, root)}, root)
    try:
        metrics = fn(params, root, run.log_metrics)
    except BaseException:
        end_failed(lambda: run.end("FAILED"), f"the run of stage {name}")
        raise
    atomic_write_json(root / stage.metrics, metrics)
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                    step=int(metrics.get("steps", 0) or 0))
    for path in (stage.metrics, *stage.plots, *stage.reports):
        run.log_artifact(root / path)
    for out in stage.outs:
        sidecar = root / out / "model.json"
        run.log_artifact(sidecar)
    run.end()
    return metrics

