"""Tokenize and pretrain stages: determinism, resume after SIGKILL, smoke checks, checkpoints."""

import json
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hatchling.config import validate_params
from hatchling.data.packed import load_split
from hatchling.data.tokenize import split_documents
from hatchling.data.tokenizer import SPECIAL_TOKENS, load_tokenizer
from hatchling.model import build_model
from hatchling.train.checkpoint import load_model
from hatchling.train.loop import lm_loss, overfit_one_batch, sample_batch, seq_len_at
from hatchling.train.optim import lr_multiplier
from tests.conftest import TINY_PARAMS, hatchling_cmd, make_project, project_env, run_cmd, write_params


def test_tokenize_outputs(tokenized_project):
    tok = load_tokenizer(tokenized_project / "data/tokenized/tokenizer.json")
    meta = json.loads((tokenized_project / "data/tokenized/meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.get_vocab_size() <= 320
    assert all(tok.token_to_id(t) is not None for t in SPECIAL_TOKENS)
    train, val = (load_split(tokenized_project / "data/tokenized", s) for s in ("train", "val"))
    assert len(train) == meta["train"]["tokens"] and len(val) == meta["val"]["tokens"]
    assert int(val[-1]) == meta["eot_id"] == tok.token_to_id("<|endoftext|>")
    text = "def f(x):\n    return {'ü': x}  # naïve"
    assert tok.decode(tok.encode(text).ids) == text                       # byte-level: lossless
    report = json.loads((tokenized_project / "reports/tokenize.json").read_text())
    assert report["train_tokens"] == meta["train"]["tokens"] and report["bytes_per_token"] > 1


def test_tokenize_is_deterministic(tokenized_project, tmp_path):
    other = make_project(tmp_path / "again")
    shutil.copytree(tokenized_project / "data/dedup", other / "data/dedup")
    run_cmd(hatchling_cmd("run", "tokenize"), other)
    for name in ("tokenizer.json", "train.bin", "val.bin", "meta.json"):
        ours, theirs = other / "data/tokenized" / name, tokenized_project / "data/tokenized" / name
        assert ours.read_bytes() == theirs.read_bytes()


def test_split_is_by_document_and_stable():
    docs = [f"document number {i} " * 5 for i in range(200)]
    train, val = split_documents(docs, 0.1, seed=0)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 200 and 5 < len(val) < 40
    train2, val2 = split_documents(docs + ["a new document"], 0.1, seed=0)
    assert set(val) <= set(val2)                                          # adding docs never moves old ones


def test_schedule_and_curriculum():
    assert lr_multiplier(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert [seq_len_at(s, 128, [(0, 32), (10, 64)]) for s in (0, 9, 10, 50)] == [32, 32, 64, 64]
    data = np.arange(1000, dtype=np.uint16)
    x, y = sample_batch(data, 4, 16, seed=3, device="cpu")
    assert torch.equal(x[:, 1:], y[:, :-1])                               # labels are inputs shifted by one
    assert torch.equal(sample_batch(data, 4, 16, seed=3, device="cpu")[0], x)


def test_overfit_one_batch_falls_below_bound():
    torch.manual_seed(0)
    model = build_model(validate_params(TINY_PARAMS).model.model_copy(update={"vocab_size": 64}))
    batch = sample_batch(np.random.default_rng(0).integers(0, 64, 500).astype(np.uint16), 2, 32, 0, "cpu")
    losses = overfit_one_batch(model, batch, steps=120, lr=3e-3)
    assert losses[0] > 3.5 and losses[-1] < 0.5
    # miswired labels (targets not aligned with inputs) cannot be fitted the same way
    x, y = batch
    assert lm_loss(model, x, y).item() < lm_loss(model, x, y.roll(7, dims=1)).item()


def test_overfit_mode_of_cli(tokenized_project):
    proc = run_cmd(hatchling_cmd("run", "pretrain", "--overfit-one-batch", "--overfit-steps", "120"), tokenized_project)
    assert "overfit one batch" in proc.stdout


def _final_weights(project):
    return load_file(str(project / "checkpoints/pretrain/model.safetensors"))


def test_killed_run_resumes_to_bitwise_identical_weights(tokenized_project, tmp_path):
    params = {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "max_steps": 16, "checkpoint_every": 3,
                                           "eval_every": 4, "optimizer": "muon"}}
    runs = {}
    for name in ("straight", "killed"):
        proj = make_project(tmp_path / name, params)
        shutil.copytree(tokenized_project / "data", proj / "data")
        runs[name] = proj
    run_cmd(hatchling_cmd("run", "pretrain"), runs["straight"])

    proj = runs["killed"]
    proc = subprocess.Popen(hatchling_cmd("run", "pretrain"), cwd=proj, env=project_env(proj),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sidecar = proj / "checkpoints/pretrain-run/model.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if sidecar.exists() and json.loads(sidecar.read_text())["step"] >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(sidecar.read_text())["step"]
    assert 6 <= killed_at < 16 and not (proj / "checkpoints/pretrain/model.safetensors").exists()

    run_cmd(hatchling_cmd("run", "pretrain"), proj)
    report = json.loads((proj / "reports/pretrain.json").read_text())
    assert report["resumed_from_step"] == killed_at and report["steps"] == 16
    a, b = _final_weights(runs["straight"]), _final_weights(proj)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    csv_a = (runs["straight"] / "logs/pretrain.csv").read_text()
    assert (proj / "logs/pretrain.csv").read_text() == csv_a


def test_changed_params_never_resume_a_foreign_checkpoint(tokenized_project, tmp_path):
    proj = make_project(tmp_path / "p")
    shutil.copytree(tokenized_project / "data", proj / "data")
    run_cmd(hatchling_cmd("run", "pretrain"), proj)
    params = {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "lr": 0.001}}
    write_params(proj, params)
    run_cmd(hatchling_cmd("run", "pretrain"), proj)
    assert json.loads((proj / "reports/pretrain.json").read_text())["resumed_from_step"] is None


def test_checkpoint_loads_and_bad_checkpoints_fail_clearly(tokenized_project, tmp_path):
    proj = make_project(tmp_path / "p")
    shutil.copytree(tokenized_project / "data", proj / "data")
    run_cmd(hatchling_cmd("run", "pretrain", "--set", "pretrain.max_steps=2"), proj)
    model, meta = load_model(proj / "checkpoints/pretrain")
    assert meta["step"] == 2 and meta["model_config"]["d_model"] == 32 and len(meta["tokenizer_sha256"]) == 64
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_model(tmp_path / "missing")
    bad = tmp_path / "bad"
    shutil.copytree(proj / "checkpoints/pretrain", bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupted checkpoint weights"):
        load_model(bad)


def test_early_stopping(tokenized_project, tmp_path):
    proj = make_project(tmp_path / "p")
    shutil.copytree(tokenized_project / "data", proj / "data")
    run_cmd(hatchling_cmd("run", "pretrain", "--set", "pretrain.max_steps=40", "--set", "pretrain.eval_every=1",
                          "--set", "pretrain.early_stopping_patience=1", "--set", "pretrain.lr=0.9",
                          "--set", "pretrain.warmup_steps=0"), proj)
    report = json.loads((proj / "reports/pretrain.json").read_text())
    assert report["stopped_early"] and report["steps"] < 40
