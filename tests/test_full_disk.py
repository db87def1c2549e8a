"""A full disk while writing shards, token files, checkpoints or reports: one clear DiskFullError
naming the output, the previous output byte for byte as it was, and no temporary file left behind.

Each writer runs in a child process twice: once under a small file-size limit (RLIMIT_FSIZE, with
SIGXFSZ ignored so that a write past it fails with EFBIG instead of killing the process), and once
on a real tiny tmpfs the child mounts in its own mount namespace (ENOSPC; skipped where mounting is
not allowed). The child writes each previous output, then the new one under pressure, and reports
what was raised and a snapshot of every file before and after.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import hatchling.io
from hatchling.errors import DiskFullError
from hatchling.io import atomic_path
from tests.conftest import REPO, TINY_PARAMS

CONFIG = {"arch": "hybrid", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "head_dim": 16,
          "mlp_hidden": 64, "attn_every": 2, "chunk_size": 8}
SCENARIOS = ("shards", "tokens", "checkpoint", "trainer_state", "report", "cli")
TMPFS_BYTES = 4 << 20


# -- the child ------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str | None]:
    """Every file (its sha256) and directory (None) under root, but the filler."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*")) if p.name != "filler"}


@contextlib.contextmanager
def pressure(mode: str, root: Path, budget: int):
    """Room for about `budget` more bytes: a file-size limit, or a filler that leaves that much free."""
    if mode == "fsize":
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (budget, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        return
    st = os.statvfs(root)
    fd = os.open(root / "filler", os.O_CREAT | os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - budget)
        yield
    finally:
        os.close(fd)
        os.unlink(root / "filler")


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(300)]
    return " ".join(rng.choice(vocab) for _ in range(n))


def child(mode: str, root: Path) -> dict:
    import torch

    from hatchling.checkpoint import save_model
    from hatchling.cli import main as cli_main
    from hatchling.config import validate_params
    from hatchling.data import tokenize
    from hatchling.data.corpus import write_shards
    from hatchling.io import atomic_write_json
    from hatchling.model import build_model
    from hatchling.stages import context
    from tests.conftest import write_params

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    params = validate_params(TINY_PARAMS)
    write_params(root, TINY_PARAMS)
    ctx = context("tokenize", params, root)

    def docs(seed: int, n: int, length: int) -> list[dict]:
        return [{"id": f"{seed}-{i}", "text": words(seed * 1000 + i, length)} for i in range(n)]

    def tokenized_then_new_input():
        write_shards(docs(3, 2, 400), ctx.inputs.dedup, 1000)
        tokenize.run(ctx)
        write_shards(docs(4, 30, 400), ctx.inputs.dedup, 1000)      # what the new run reads

    torch.manual_seed(0)
    model = build_model(CONFIG)
    cli_out = {}

    def cli():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli_out["rc"] = cli_main(["dvc-yaml", "--params", str(root / "params.yaml"),
                                      "--path", str(root / "dvc.yaml")])
        cli_out["stderr"] = err.getvalue()

    # name: (output, write its previous version, write the new one, room for the new one)
    cases = {
        "shards": (root / "data/crawl", lambda: write_shards(docs(1, 4, 20), root / "data/crawl", 2),
                   lambda: write_shards(docs(2, 40, 200), root / "data/crawl", 20), 8192),
        "tokens": (ctx.outputs.tokenized, tokenized_then_new_input, lambda: tokenize.run(ctx),
                   24576),                                   # room for the tokenizer, not for train.bin
        "checkpoint": (root / "ckpt", lambda: save_model(model, root / "ckpt", {"step": 1}),
                       lambda: save_model(model, root / "ckpt", {"step": 2}), 8192),
        "trainer_state": (root / "run", lambda: save_model(model, root / "run", {"step": 1}, {"x": torch.ones(3)}),
                          lambda: save_model(model, root / "run", {"step": 2}, {"x": torch.ones(100_000)}), 131072),
        "report": (root / "reports/pretrain.json", lambda: atomic_write_json(root / "reports/pretrain.json", {"a": 1}),
                   lambda: atomic_write_json(root / "reports/pretrain.json", {"a": "x" * 100_000}), 8192),
        "cli": (root / "dvc.yaml", lambda: (root / "dvc.yaml").write_text("previous\n"), cli, 1024),
    }

    def free() -> int:
        return os.statvfs(root).f_bavail

    results = {}
    for name, (output, previous, new, budget) in cases.items():
        previous()
        before, free_before = snapshot(root), free()
        error = None
        with pressure(mode, root, budget):
            try:
                new()
            except Exception as e:
                error = {"type": type(e).__name__, "message": str(e), "errno": getattr(e, "errno", None),
                         "cause": repr(e.__cause__)}
        if name == "cli":
            error = cli_out
        results[name] = {"output": str(output), "error": error, "same": before == snapshot(root),
                         "before": before, "after": snapshot(root), "space_back": free() >= free_before}
    return results


if __name__ == "__main__":          # MODE ROOT [MODE ROOT]: the results of each mode, as one JSON object
    args = sys.argv[1:]
    print(json.dumps({mode: child(mode, Path(root)) for mode, root in zip(args[::2], args[1::2], strict=True)}))


# -- the tests ------------------------------------------------------------------------------------
def run_child(modes: dict[str, Path]) -> subprocess.CompletedProcess:
    """One child for all modes (the imports cost most of its time); the tmpfs is mounted in its own
    mount namespace, so it goes when the child ends."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [sys.executable, str(Path(__file__).resolve()), *(str(x) for item in modes.items() for x in item)]
    if "tmpfs" in modes:
        mount = f"mount -t tmpfs -o size={TMPFS_BYTES} tmpfs {modes['tmpfs']} || exit 77; exec \"$@\""
        command = ["unshare", "--mount", *(["--map-root-user"] if os.geteuid() else []),
                   "sh", "-c", mount, "sh", *command]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict:
    """mode -> the child's results, or the reason the mode could not run."""
    modes = {mode: tmp_path_factory.mktemp(f"full-disk-{mode}") for mode in ("fsize", "tmpfs")}
    proc = run_child(modes) if shutil.which("unshare") else None
    if proc is None or proc.returncode == 77 or (proc.returncode != 0 and "unshare:" in proc.stderr):
        why = "no unshare" if proc is None else proc.stderr.strip()[-200:]
        proc = run_child({"fsize": modes["fsize"]})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "tmpfs": f"cannot mount a tmpfs here: {why}"}
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(params=["fsize", "tmpfs"])
def outcome(request, outcomes):
    if isinstance(outcomes[request.param], str):
        pytest.skip(outcomes[request.param])
    return request.param, outcomes[request.param]


def test_a_full_disk_raises_one_clear_error_keeps_the_previous_output_and_leaves_no_temp_file(outcome):
    mode, results = outcome
    code, label = (errno.EFBIG, "EFBIG") if mode == "fsize" else (errno.ENOSPC, "ENOSPC")
    for name in SCENARIOS:
        r = results[name]
        assert r["same"], f"{name}: the files changed:\n{r['before']}\n{r['after']}"
        if mode == "tmpfs":      # no temp file is held open either: its space is free again at once
            assert r["space_back"], name
        if name == "cli":        # `hatchling dvc-yaml`: the CLI's one-line error, exit 2, no traceback
            assert r["error"]["rc"] == 2, r["error"]
            assert r["error"]["stderr"].splitlines() == [r["error"]["stderr"].strip()], r["error"]["stderr"]
            assert r["error"]["stderr"].startswith(f"error: cannot write {r['output']}: "), r["error"]["stderr"]
            assert f"({label})" in r["error"]["stderr"]
            continue
        e = r["error"]
        assert e is not None and e["type"] == "DiskFullError", f"{name}: {e}"
        assert e["errno"] == code, f"{name}: {e}"
        assert e["message"].startswith(f"cannot write {r['output']}: "), f"{name}: {e['message']}"
        assert f"({label})" in e["message"] and "kept as it was and no partial file is left" in e["message"]
    # the writers that hide the errno (numpy's tofile, torch.save) are recognised too
    assert "written" in results["tokens"]["error"]["cause"], results["tokens"]["error"]
    assert "RuntimeError" in results["trainer_state"]["error"]["cause"], results["trainer_state"]["error"]


@pytest.mark.parametrize("exchange", ["fails", "unsupported"])
def test_a_directory_swap_that_fails_puts_the_previous_directory_back(tmp_path, monkeypatch, exchange):
    """The one-call exchange failing, or (where the system cannot exchange) the second of the two
    renames that replace it failing."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("previous")
    real_rename = Path.rename

    def rename(self, target):
        if Path(target) == out and Path(self).name == "out" and Path(self).parent != tmp_path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_rename(self, target)

    def fails(a, b):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hatchling.io, "exchange", fails if exchange == "fails" else lambda a, b: False)
    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(DiskFullError, match=rf"^cannot write {out}: no space left on the device \(ENOSPC\); "
                                            r"the previous out is kept as it was"):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "a.txt").read_text() == "previous"


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(ValueError, match="^not a disk$"):
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("half")
            raise ValueError("not a disk")
    assert list(tmp_path.iterdir()) == []
