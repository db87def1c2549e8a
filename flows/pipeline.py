"""The pipeline as a Prefect 3 flow, built from the stage registry (hatchling/stages.py).

    python flows/pipeline.py [--params params.yaml] [--set key=value ...] [--stage NAME ...]

Each stage is a task cached on the content hash of its inputs, its params sections and its code, so
a second run with nothing changed completes from cache (and says so in MLflow). A task runs its
stage in a process of its own, `python -m hatchling run STAGE` (as dvc.yaml does), so a stage that
dies (killed, out of memory) fails its task, not the flow. Stages that touch the network retry with
backoff, and a trainer whose process was killed retries, resuming from its last checkpoint; not
when the environment is broken (a retry would fail the same way). A flow that fails ends its MLflow
pipeline run FAILED, naming the stage and its error. Each task waits for its upstream stages' tasks
(the UI draws the DAG), logs its headline numbers and publishes its metrics as a table artifact
(`<stage>-metrics`) and its markdown reports as markdown artifacts (`eval-report`: the report card,
its figures embedded, as the UI cannot follow the report's relative links). In a DVC project run on
its own params.yaml, the flow and `dvc repro` share one verdict on what is up to date: a stage that
`dvc status` finds up to date is not run, and each stage the flow settles is recorded in dvc.lock
(`dvc commit`), so DVC has nothing to redo after the flow. flows/prefect.yaml deploys this flow to a
process work pool on a GPU host (see the README).
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import json
import os
import posixpath
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

import hatchling
from hatchling import tracking
from hatchling.cli import BROKEN_ENVIRONMENT
from hatchling.config import Params, load_params
from hatchling.errors import BrokenEnvironment, HatchlingError, StageError, environment_fault
from hatchling.io import hash_paths
from hatchling.stages import (
    PACKAGE,
    STAGES,
    Stage,
    describe_run,
    dvc,
    dvc_stale,
    get_stage,
    headline,
    input_hash,
    param_deps,
    reported_headline,
    topological_order,
    upstream,
    with_upstream,
)


def stage_cache_key(stage: Stage, params: Params, root: Path) -> str:
    """Content hash of what decides a stage's outputs: inputs, the files its params name, params
    sections, code, version (what DVC's deps and params track; all location-free: the same checkout and
    data give the same key wherever they live)."""
    parts = {"stage": stage.name, "version": hatchling.__version__,
             # progress bars change no output (DVC does not track them either)
             "params": {s: {k: v for k, v in params.section(s).items() if k != "progress"} for s in stage.params},
             "inputs": input_hash(stage, root),
             "param_files": hash_paths(param_deps(stage, params), root),
             "code": hash_paths(stage.code, PACKAGE.parent)}
    return f"{stage.name}-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def dvc_tracks(root: Path, params_file: str, overrides: list[str]) -> bool:
    """Whether dvc.lock speaks for this run: a DVC project (`.dvc/`, dvc.yaml) run on its own params.yaml
    with no overrides, the params `dvc repro` reads. Another params file or a --set is a run DVC knows
    nothing of: the flow then keeps to its own cache and leaves dvc.lock alone."""
    return ((root / ".dvc").is_dir() and (root / "dvc.yaml").is_file() and not overrides
            and Path(params_file).resolve() == (root / "params.yaml").resolve())


def outputs_hash(stage: Stage, root: Path) -> str:
    """What a cached result must still find on disk, as DVC checks it: the stage's outputs, its reports
    and plots' logs (DVC's cache-false outs) and its metrics file."""
    return hash_paths([*stage.outs, *stage.kept_in_git, stage.metrics], root)


class StageProcessFailed(StageError):
    """A stage's process that ended without its result: the error it printed, or the signal that killed
    it (an OOM kill, a preempted machine, kill -9)."""

    def __init__(self, stage: str, returncode: int, stderr: str):
        self.stage, self.returncode = stage, returncode
        if returncode < 0:
            why = f"its process was killed by {signal.Signals(-returncode).name}"
        else:
            tail = stderr[stderr.rfind("\nerror: ") + 1:] if "\nerror: " in f"\n{stderr}" else stderr[-3000:]
            why = tail.removeprefix("error: ").strip() or f"its process exited with status {returncode}"
        super().__init__(f"stage {stage}: {why}")

    @property
    def killed(self) -> bool:
        return self.returncode < 0


def settled_lines(stream) -> Iterator[str]:
    """The lines of a process's stderr (bytes) as they end, each as it last stood: a progress bar redraws
    its line with carriage returns, each redraw no line of the log; blank lines left out."""
    for raw in stream:
        line = raw.decode(errors="replace").rstrip("\r\n").rsplit("\r", 1)[-1].rstrip()
        if line:
            yield line


def run_in_process(stage: Stage, params_file: str, overrides: list[str], root: Path) -> dict:
    """Run the stage as `python -m hatchling run STAGE` in `root` (as dvc.yaml does), its log lines
    going to the task's log; its metrics, or StageProcessFailed (BrokenEnvironment for a broken
    environment: exit status 3). Its own process: one that dies (killed, out of memory) fails this
    task, which can then be retried, instead of taking the flow down with it."""
    cmd = [sys.executable, "-m", "hatchling", "run", stage.name, "--params", params_file]
    cmd += [arg for override in overrides for arg in ("--set", override)]
    logger, lines = get_run_logger(), collections.deque(maxlen=200)
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for line in settled_lines(proc.stderr):
            lines.append(line + "\n")
            logger.info("%s", line)
        proc.wait()
    finally:
        if proc.poll() is None:           # the task itself was stopped: so is the stage
            proc.kill()
            proc.wait()
    if proc.returncode == 0:
        return json.loads((root / stage.metrics).read_text())
    if proc.returncode == BROKEN_ENVIRONMENT:
        raise BrokenEnvironment(StageProcessFailed(stage.name, proc.returncode, "".join(lines)).args[0])
    raise StageProcessFailed(stage.name, proc.returncode, "".join(lines))


def worth_retrying(task, task_run, state) -> bool:
    """Prefect's retry condition: a failure of the network may pass, and a trainer whose process was
    killed resumes from its last checkpoint; a broken environment, or any other failure of a stage
    that is not on the network, would fail the same way again."""
    error = state.result(raise_on_failure=False)
    stage = get_stage(task.name)
    if environment_fault(error):
        return False
    return stage.network or (bool(stage.persist) and isinstance(error, StageProcessFailed) and error.killed)


def mark_killed(mlf, parent: str, error: StageProcessFailed) -> None:
    """A stage process killed outright could not end its MLflow run: end it KILLED, saying why."""
    exp = mlf.get_run(parent).info.experiment_id
    for run in mlf.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}' and tags.`hatchling.stage` = "
                                      f"'{error.stage}' and attributes.status = 'RUNNING'"):
        mlf.set_tag(run.info.run_id, "hatchling.error", str(error))
        mlf.set_terminated(run.info.run_id, "KILLED")


FIGURES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
           ".svg": "image/svg+xml"}
EMBED_LIMIT = 512 * 1024        # bytes of one figure embedded in an artifact; a larger one is only named
LINK = re.compile(r"(!?)\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def for_the_ui(markdown: str, report: str, root: Path) -> str:
    """A markdown report (`report`: its path under `root`) as a Prefect artifact. The UI resolves a
    link against its own page (/artifacts/artifact/...), not the report's folder, so a relative link
    (eval.md's figures) would show nothing there: each names the file's path under the project
    instead, and a figure among them is embedded as a data: URI (the UI renders those) in a Figures
    section at the end, or in place for an image. Links with a scheme or an anchor stay as they are."""
    folder = posixpath.dirname(report)
    figures: dict[str, str] = {}

    def embedded(path: str) -> str | None:
        file = root / path
        kind = FIGURES.get(posixpath.splitext(path)[1].lower())
        if kind and file.is_file() and file.stat().st_size <= EMBED_LIMIT:
            return f"data:{kind};base64,{base64.b64encode(file.read_bytes()).decode()}"
        return None

    def rewrite(match: re.Match) -> str:
        image, text, target = match.groups()
        if re.match(r"[a-zA-Z][\w+.-]*:|#|/", target):            # a URL, a data: URI, an anchor, a site path
            return match.group(0)
        path = posixpath.normpath(posixpath.join(folder, target.split("#")[0]))
        named = f"`{path}`" if text.strip() in ("", target, posixpath.basename(target)) else f"{text} (`{path}`)"
        uri = embedded(path)
        if uri and image:
            return f"![{text or path}]({uri})"
        if uri:
            figures.setdefault(path, uri)
        return named

    out, fenced = [], False
    for line in markdown.splitlines(keepends=True):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        out.append(line if fenced else LINK.sub(rewrite, line))
    text = "".join(out)
    if figures:
        text = text.rstrip("\n") + "\n\n## Figures\n\n" + "".join(
            f"`{path}`\n\n![{posixpath.basename(path)}]({uri})\n\n" for path, uri in figures.items())
    return text


def publish(stage: Stage, metrics: dict, root: Path) -> None:
    """What the Prefect UI shows of a stage: its headline numbers in the task's log, its metrics as a
    table artifact and its markdown reports (the eval's report card) as markdown artifacts."""
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    get_run_logger().info("%s: %s", stage.name, ", ".join(f"{k}={v:.4g}" for k, v in
                                                          (headline(stage, metrics) or numbers).items()))
    create_table_artifact(table=[{"metric": k, "value": v} for k, v in numbers.items()], key=f"{stage.name}-metrics",
                          description=f"stage {stage.name}: {stage.metrics}")
    for name, path in stage.reports.items():
        if path.endswith(".md") and (root / path).is_file():
            create_markdown_artifact(markdown=for_the_ui((root / path).read_text(), path, root),
                                     key=f"{stage.name}-{name}", description=f"stage {stage.name}: {path}")


def make_task(stage: Stage):
    def body(params_file: str, overrides: list[str], root: str, cache_key: str, up_to_date: bool) -> dict:
        root = Path(root)
        if up_to_date:
            get_run_logger().info("stage %s is up to date in dvc.lock (its deps, params and outputs as DVC "
                                  "recorded them): not run", stage.name)
            return {"metrics": json.loads((root / stage.metrics).read_text()), "outputs": outputs_hash(stage, root)}
        try:
            metrics = run_in_process(stage, params_file, overrides, root)
        except StageProcessFailed as error:
            if error.killed:
                tracking.end_failed(lambda error=error: mark_killed(tracking.client(root),
                                                                    os.environ[tracking.PARENT_ENV], error),
                                    f"the killed run of stage {stage.name}")
            raise
        publish(stage, metrics, root)
        return {"metrics": metrics, "outputs": outputs_hash(stage, root)}

    # network stages: a failure may pass; trainers (whose resume state persists): a killed one resumes
    retries, delays = (3, [5, 20, 60]) if stage.network else (2, [5, 5]) if stage.persist else (0, 0)
    return task(body, name=stage.name, cache_key_fn=lambda ctx, args: args["cache_key"], persist_result=True,
                retries=retries, retry_delay_seconds=delays, retry_condition_fn=worth_retrying)


TASKS = {s.name: make_task(s) for s in topological_order()}


@flow(name="hatchling-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None, root: str = ".",
             stages: list[str] | None = None) -> dict:
    """Run every stage in dependency order, or only `stages` and what they need (like
    `dvc repro STAGE`); returns {stage: metrics or "cached"}."""
    overrides = list(overrides or [])
    wanted = with_upstream(stages) if stages else {s.name for s in STAGES}
    root_path = Path(root).resolve()
    params_file = params_path if Path(params_path).is_absolute() else str(root_path / params_path)
    params = load_params(params_file, overrides)           # bad params fail before any stage
    # the stages dvc.lock finds stale, when it speaks for this run (None: it does not)
    stale = dvc_stale(sorted(wanted), root_path) if dvc_tracks(root_path, params_file, overrides) else None
    ran: set[str] = set()
    mlf = tracking.client(root_path)
    describe = describe_run(params, root_path)
    describe["tags"] = {"hatchling.prefect_flow_run_id": str(flow_run.id)}
    parent = tracking.start_parent(mlf, tracking.experiment_id(mlf), root_path, f"prefect {flow_run.name}",
                                   "prefect", describe)
    previous = os.environ.get(tracking.PARENT_ENV)
    os.environ[tracking.PARENT_ENV] = parent
    results, futures = {}, {}
    try:
        for stage in (s for s in topological_order() if s.name in wanted):
            key = stage_cache_key(stage, params, root_path)
            if stale is not None and ran.intersection(upstream(stage)):      # its inputs may have moved since
                stale |= dvc_stale([stage.name], root_path)
            up_to_date = stale is not None and stage.name not in stale
            # quoted: Prefect would otherwise look for earlier tasks' results among the arguments (by object
            # identity, which a string or a recycled id can share) and draw edges that are not there
            args = (quote(params_file), quote(overrides), quote(str(root_path)), quote(key), up_to_date)
            after = [futures[name] for name in upstream(stage) if name in futures]  # the UI draws these edges
            future = TASKS[stage.name].submit(*args, wait_for=after)
            future.wait()
            state = future.state
            result = state.result()                          # raises if the stage failed
            if state.name == "Cached" and result["outputs"] != outputs_hash(stage, root_path):
                # served from cache, but its outputs were since changed or deleted: rebuild them
                future = TASKS[stage.name].with_options(refresh_cache=True).submit(*args, wait_for=after)
                future.wait()
                state = future.state
                result = state.result()
            futures[stage.name] = future
            if stale is not None and stage.name in stale:
                # ran, or served from the flow's cache (what its key made is on disk): record it as `dvc repro` would
                dvc(["commit", "--force", stage.name], root_path)
            if state.name == "Cached" or up_to_date:
                why = "up to date in dvc.lock" if up_to_date else "inputs, params and code unchanged"
                tracking.record_cached(stage.name, reported_headline(stage, root_path), root_path, why)
                results[stage.name] = "cached"
            else:
                results[stage.name] = result["metrics"]
                ran.add(stage.name)
    except BaseException as error:
        def failed(error=error):
            stage = getattr(error, "stage", None) or mlf.get_run(parent).data.tags.get("hatchling.failed_stage")
            if stage:
                mlf.set_tag(parent, "hatchling.failed_stage", stage)
            mlf.set_tag(parent, "hatchling.error", f"{type(error).__name__}: {error}"[:5000])
            mlf.set_terminated(parent, "FAILED")

        tracking.end_failed(failed, "the pipeline run")
        raise
    finally:
        if previous is None:
            os.environ.pop(tracking.PARENT_ENV, None)
        else:
            os.environ[tracking.PARENT_ENV] = previous
    if "hatchling.failed_stage" in mlf.get_run(parent).data.tags:     # a stage that failed, then passed on a retry
        mlf.delete_tag(parent, "hatchling.failed_stage")
        mlf.delete_tag(parent, "hatchling.error")
    mlf.set_terminated(parent, "FINISHED")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description="Run the Baby-Hatchling pipeline as a Prefect flow")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--root", default=".")
    ap.add_argument("--stage", action="append", default=[], help="run only this stage and its upstream (repeatable)")
    args = ap.parse_args()
    try:
        results = pipeline(args.params, args.set, args.root, args.stage or None)
    except HatchlingError as e:          # as `hatchling run` says it: one line (Prefect has logged the rest)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(BROKEN_ENVIRONMENT if isinstance(e, BrokenEnvironment) else 2)
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
