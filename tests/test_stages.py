"""The stage registry is the one place a stage's inputs, outputs, params and code are named."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hatchling.config import validate_params
from hatchling.errors import StageError
from hatchling.io import hash_paths
from hatchling.stages import PACKAGE, STAGES, context, dvc_params, input_hash, module_file
from tests.conftest import REPO, TINY_PARAMS, write_params

PATH_LITERAL = re.compile(r"^(data|checkpoints|reports|logs)/")


def _stage_sources():
    for stage in STAGES:
        yield stage, module_file(stage.module)


def test_hashes_are_the_same_wherever_the_tree_lives(tmp_path, monkeypatch):
    for where in ("a", "b/deeper"):
        tree = tmp_path / where / "data/tokenized"
        tree.mkdir(parents=True)
        (tree / "meta.json").write_text('{"vocab_size": 320}')
        (tree / "sub").mkdir()
        (tree / "sub/train.bin").write_bytes(bytes(range(256)))
    a, b = tmp_path / "a", tmp_path / "b/deeper"
    assert hash_paths(["data/tokenized"], a) == hash_paths(["data/tokenized"], b)
    assert hash_paths([a / "data/tokenized"], a) == hash_paths(["data/tokenized"], b)   # absolute = relative
    monkeypatch.chdir(a)
    assert hash_paths(["data/tokenized"], ".") == hash_paths(["data/tokenized"], b)       # root "." = absolute
    # ... while a changed byte or a renamed file changes it
    (b / "data/tokenized/sub/train.bin").write_bytes(bytes(range(255)) + b"\0")
    assert hash_paths(["data/tokenized"], a) != hash_paths(["data/tokenized"], b)
    (a / "data/tokenized/sub/train.bin").rename(a / "data/tokenized/sub/val.bin")
    shutil.copy(a / "data/tokenized/sub/val.bin", b / "data/tokenized/sub/train.bin")
    assert hash_paths(["data/tokenized"], a) != hash_paths(["data/tokenized"], b)


def test_a_stage_reads_only_the_params_sections_and_paths_it_declares(tmp_path):
    params = validate_params(TINY_PARAMS)
    ctx = context("tasks", params, tmp_path)
    assert ctx.params.contamination.threshold == TINY_PARAMS["contamination"]["threshold"]
    assert ctx.inputs.crawl == tmp_path.resolve() / "data/crawl" and ctx.outputs.tasks.name == "tasks"
    with pytest.raises(StageError, match=r"stage tasks reads params section 'dedup', which it does not declare"):
        _ = ctx.params.dedup
    with pytest.raises(StageError, match=r"stage tasks reads input 'tokenized'"):
        _ = ctx.inputs.tokenized
    with pytest.raises(StageError, match=r"stage tasks reads output 'model'"):
        _ = ctx.outputs["model"]
    # and what each stage's own code reads of ctx.params is what the registry declares for it
    for stage, path in _stage_sources():
        tree = ast.parse(path.read_text())
        read = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute) and node.value.attr == "params"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "ctx"}
        assert read and read <= set(stage.params), (stage.name, read - set(stage.params))


def test_no_stage_module_names_a_path_of_its_own():
    """Paths come from the registry (ctx.inputs / ctx.outputs) or from params, never from a constant in
    any module a stage runs."""
    offenders = []
    for path in sorted({PACKAGE.parent / f for stage in STAGES for f in stage.code} - {PACKAGE / "config.py"}):
        # (config.py is the params schema: the defaults of path-valued params are params, not constants)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and PATH_LITERAL.match(node.value):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}")
    assert not offenders, "\n".join(offenders)


def test_each_stage_reruns_on_a_change_to_any_module_it_really_imports():
    """Independent of the registry's own import scan: import each stage's entry module in a fresh
    interpreter and list the hatchling modules that loaded."""
    script = ("import importlib, json, sys\n"
              "importlib.import_module(sys.argv[1])\n"
              "print(json.dumps(sorted(m.__file__ for n, m in list(sys.modules.items())\n"
              "                        if n.split('.')[0] == 'hatchling' and getattr(m, '__file__', None))))")
    for stage in STAGES:
        out = subprocess.run([sys.executable, "-c", script, stage.module], cwd=REPO, capture_output=True,
                             text=True, check=True, timeout=120).stdout
        loaded = {str(Path(f).resolve().relative_to(PACKAGE.parent)) for f in json.loads(out)}
        missing = loaded - set(stage.code)
        assert not missing, f"stage {stage.name}: code misses {sorted(missing)}"
    eval_code = set(next(s for s in STAGES if s.name == "eval").code)
    assert "hatchling/data/chat.py" in eval_code            # the drift the hand-kept lists had


DATA_STAGES = ("crawl", "tasks", "dedup", "tokenize")


def test_the_data_stages_start_without_torch():
    """A stage process imports the CLI, the params schema, MLflow's tracking and its entry module: for
    the stages that train nothing, none of it may load torch (~2 s of every such process)."""
    script = ("import json, sys\n"
              "import hatchling.cli, hatchling.tracking, mlflow.entities, mlflow.tracking\n"
              "from hatchling.stages import get_stage\n"
              "for name in sys.argv[1:]:\n"
              "    get_stage(name).function()\n"
              "print(json.dumps(sorted(n for n in sys.modules if n == 'torch' or n.startswith('torch.'))))\n")
    proc = subprocess.run([sys.executable, "-c", script, *DATA_STAGES], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=True)
    assert json.loads(proc.stdout) == []


def test_a_dedup_setting_does_not_rerun_the_tasks_stage(tmp_path):
    from flows.pipeline import stage_cache_key

    tasks = next(s for s in STAGES if s.name == "tasks")
    assert "dedup" not in dvc_params(tasks) and "run.seed" in dvc_params(tasks)
    (tmp_path / "data/crawl").mkdir(parents=True)
    base = validate_params(TINY_PARAMS)
    other_dedup = validate_params({**TINY_PARAMS, "dedup": {**TINY_PARAMS["dedup"], "threshold": 0.5}})
    other_check = validate_params({**TINY_PARAMS, "contamination": {**TINY_PARAMS["contamination"], "ngram": 8}})
    key = stage_cache_key(tasks, base, tmp_path)
    assert stage_cache_key(tasks, other_dedup, tmp_path) == key
    assert stage_cache_key(tasks, other_check, tmp_path) != key
    assert input_hash(tasks, tmp_path) == input_hash(tasks, tmp_path.resolve())


def test_the_flows_cache_key_follows_the_files_params_name_as_dvc_does(tmp_path):
    from flows.pipeline import stage_cache_key
    from hatchling.stages import get_stage, param_deps

    sft = get_stage("sft")
    chats = tmp_path / "my/chats.jsonl"
    chats.parent.mkdir()
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    params = validate_params({**TINY_PARAMS, "sft": {**TINY_PARAMS["sft"], "data": ["my/chats.jsonl"]}})
    assert param_deps(sft, params) == ["my/chats.jsonl"] and param_deps(sft, validate_params(TINY_PARAMS)) == []
    key = stage_cache_key(sft, params, tmp_path)
    chats.write_text('{"messages": [{"role": "user", "content": "hello"}]}\n')     # an edit DVC reruns sft for
    assert stage_cache_key(sft, params, tmp_path) != key


def test_a_stage_that_does_not_write_a_declared_output_fails_before_its_report(tmp_path, monkeypatch, own_tracking):
    from hatchling.stages import Stage, run_stage

    write_params(tmp_path, TINY_PARAMS)
    monkeypatch.setattr(Stage, "function", lambda self: lambda ctx: {"kept": 0, "characters": 0})
    with pytest.raises(StageError, match=r"^stage crawl did not write data/crawl, which hatchling/stages.py declares"):
        run_stage("crawl", root=tmp_path)
    assert not (tmp_path / "reports/crawl.json").exists()


def test_a_run_is_described_against_the_committed_params_and_without_git_as_well(tmp_path, monkeypatch):
    """The MLflow run's overrides are the keys that differ from HEAD's params.yaml; a machine without git
    (doctor: optional) describes the run without them instead of failing the stage."""
    from hatchling.stages import describe_run

    write_params(tmp_path, TINY_PARAMS)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    for args in (["init", "-q"], ["add", "params.yaml"], ["commit", "-qm", "params"]):
        subprocess.run(git + args, check=True)
    params = validate_params({**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "lr": 0.5}})
    with_git = describe_run(params, tmp_path)
    assert with_git["overrides"] == ["pretrain.lr=0.5"]
    # a project in a folder of its repository (dvc init --subdir): its own params.yaml, not the root's
    (tmp_path / "sub").mkdir()
    write_params(tmp_path / "sub", {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "lr": 0.25}})
    for args in (["add", "sub/params.yaml"], ["commit", "-qm", "sub"]):
        subprocess.run(git + args, check=True)
    assert describe_run(params, tmp_path / "sub")["overrides"] == ["pretrain.lr=0.5"]
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    without = describe_run(params, tmp_path)
    assert without["overrides"] == [] and without["params"] == with_git["params"]


def test_eval_reads_validation_tokens_in_the_dtype_tokenize_wrote(tmp_path):
    """A vocabulary over 65,536 packs uint32 tokens; the needle probe's haystack must read them as such."""
    from hatchling.data.packed import pack, token_dtype
    from hatchling.eval.stage import haystack_tokens

    dtype = token_dtype(70_000)
    tokens = pack([[1, 65_535, 65_536, 69_999], [7, 70_000 - 2]], eot_id=0, dtype=dtype)
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "vocab_size": 70_000}))
    tokens.tofile(tmp_path / "val.bin")
    assert haystack_tokens(tmp_path) == tokens.tolist()


def test_nothing_phones_home(tmp_path):
    """MLflow, Prefect and DVC telemetry are off for every process that imports hatchling, and in the
    project's own Prefect and DVC config for the tools run by hand."""
    from hatchling import TELEMETRY_OFF

    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY_OFF}
    probe = ("import json, os, hatchling, subprocess, sys\n"
             "child = subprocess.run([sys.executable, '-c', 'import json, os; print(json.dumps(dict(os.environ)))'],\n"
             "                       capture_output=True, text=True, check=True).stdout\n"
             "print(json.dumps(json.loads(child)))")
    seen = json.loads(subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                                     text=True, check=True, timeout=60).stdout)
    assert {k: seen.get(k) for k in TELEMETRY_OFF} == TELEMETRY_OFF        # inherited by subprocesses too
    prefect = subprocess.run([sys.executable, "-c", "from prefect.settings import get_current_settings as s; "
                              "print(s().server.analytics_enabled)"], cwd=REPO, env=env, capture_output=True,
                             text=True, check=True, timeout=60).stdout.strip()
    assert prefect == "False"
    dvc = subprocess.run([str(Path(sys.executable).parent / "dvc"), "config", "core.analytics"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert dvc == "false"


def test_a_finished_stage_prints_one_line_of_headline_numbers_and_where_its_metrics_are():
    from hatchling.cli import summary_line
    from hatchling.stages import get_stage

    scores = {"sft": {f"task{i}": {"acc": i / 10} for i in range(10)}}
    assert summary_line(get_stage("eval"), {"scores": scores, "items": list(range(500))}) == (
        "eval: " + ", ".join(f"sft.task{i}.acc={i / 10:.4g}" for i in range(8)) + " and 2 more; every metric in "
        "reports/eval.json")
    assert summary_line(get_stage("pretrain"), {"val_loss": 3.776, "val_bpb": 1.67412, "history": [1, 2]}) == \
        "pretrain: val_loss=3.776, val_bpb=1.674; every metric in reports/pretrain.json"
    assert summary_line(get_stage("tokenize"), {}) == "tokenize: done; every metric in reports/tokenize.json"


@pytest.mark.parametrize("stage, override, why", [
    ("tokenize", {}, "stage tokenize runs in one process (only pretrain and sft train across torchrun's processes): "
                     "run it as `hatchling run tokenize`"),
    ("pretrain", {"batch_size": 3}, "pretrain.batch_size 3 does not divide across torchrun's 2 processes"),
])
def test_torchrun_refuses_what_its_processes_cannot_share_before_any_work(stage, override, why, tmp_path, monkeypatch,
                                                                         capsys):
    """Under torchrun (WORLD_SIZE 2), a stage that does not train across processes would run whole on every rank,
    all but rank 0 without the stage's lock; a batch that does not share out would fail mid-run. Either is one
    error (exit 2) on each rank before anything is read or written."""
    from tests.conftest import hatchling_here

    write_params(tmp_path, {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], **override}})
    for rank in ("0", "1"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        assert hatchling_here(tmp_path, "run", stage) == 2
        assert capsys.readouterr().err.strip() == f"error: {why}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
