"""Tokenize and pretrain stages: determinism, resume after SIGKILL, smoke checks, checkpoints."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hatchling.checkpoint import TRAINER, load_model
from hatchling.config import validate_params
from hatchling.data.packed import load_split
from hatchling.data.tokenize import split_documents
from hatchling.data.tokenizer import SPECIAL_TOKENS, load_tokenizer
from hatchling.model import build_model
from hatchling.model.config import for_arch
from hatchling.model.lm import IGNORE, lm_loss, loss_sum, sample_batch
from hatchling.stages import get_stage
from hatchling.train.loop import Trainer, batch_seed, overfit_one_batch, run_fingerprint, seq_len_at
from hatchling.train.optim import lr_multiplier
from tests.conftest import TINY_PARAMS, copy_project, hatchling_cmd, hatchling_here, make_project, run_cmd, write_params


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


def test_compiled_training_equals_eager(tokenized_project, tmp_path):
    """pretrain.compile: the same steps through torch.compile (inductor) give the eager weights."""
    from torch._dynamo.utils import counters

    weights, graphs = {}, {}
    for compiled in (False, True):
        proj = tmp_path / f"compile-{compiled}"
        shutil.copytree(tokenized_project, proj)
        params = {**TINY_PARAMS, "model": {**for_arch("gpt", TINY_PARAMS["model"]), "n_layers": 1},
                  "pretrain": {**TINY_PARAMS["pretrain"], "max_steps": 4, "compile": compiled}}
        write_params(proj, params)
        counters.clear()
        assert hatchling_here(proj, "run", "pretrain") == 0
        weights[compiled], graphs[compiled] = _final_weights(proj), counters["stats"]["unique_graphs"]
    assert graphs == {False: 0, True: graphs[True]} and graphs[True] > 0       # dynamo really traced the model
    assert weights[True].keys() == weights[False].keys()
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("stage", ["pretrain", "sft", "rlvr"])
def test_a_trainer_resumes_only_a_run_of_its_own_code(pretrained_project, tmp_path, own_tracking, stage):
    """DVC reruns a stage whose code changed; the trainer must then train afresh, not finish (or, the
    old run done, merely re-score) the run the old code left. The same code resumes it."""
    proj = copy_project(pretrained_project, tmp_path / "proj")

    def resumed_from() -> int | None:
        return json.loads((proj / f"reports/{stage}.json").read_text())["resumed_from_step"]

    assert hatchling_here(proj, "run", stage) == 0          # the code that made the run (a copy of this one)
    assert resumed_from() == getattr(validate_params(TINY_PARAMS), stage).max_steps
    source = proj / (get_stage(stage).module.replace(".", "/") + ".py")
    source.write_text(source.read_text() + "\n# a changed line\n")
    run_cmd(hatchling_cmd("run", stage), proj)              # the project's own (changed) copy of the code
    assert resumed_from() is None


def _final_weights(project):
    return load_file(str(project / "checkpoints/pretrain/model.safetensors"))


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "adapm"])
def test_a_run_stopped_mid_way_resumes_to_the_weights_and_logs_of_an_uninterrupted_one(tmp_path, optimizer):
    """The trainer's own resume (a stage killed from outside: tests/test_kill.py): weights, every
    optimizer's state, RNG and logs come back, so the run ends bit-identical; another run's checkpoint
    (any param changed) is never resumed."""
    params = validate_params(TINY_PARAMS).pretrain.model_copy(
        update={"optimizer": optimizer, "max_steps": 10, "checkpoint_every": 3, "eval_every": 4})
    data = np.random.default_rng(0).integers(0, 64, 4096).astype(np.uint16)

    def trainer(name: str, params=params, log=lambda metrics, step: None) -> Trainer:
        torch.manual_seed(0)
        model = build_model(validate_params(TINY_PARAMS).model.model_copy(update={"vocab_size": 64}))
        return Trainer(model, params, data, data, run_dir=tmp_path / name / "run", out_dir=tmp_path / name / "out",
                       sidecar={}, val_tokens_per_byte=1.0, log=log, csv_path=tmp_path / name / "steps.csv",
                       eval_csv_path=tmp_path / name / "evals.csv", fingerprint=run_fingerprint(params))

    def stops_at_step_8(metrics, step):
        if step == 8:
            raise RuntimeError("the machine went away")

    straight = trainer("straight").fit()
    with pytest.raises(RuntimeError, match="went away"):
        trainer("stopped", log=stops_at_step_8).fit()
    assert not trainer("stopped", params.model_copy(update={"lr": params.lr * 2})).try_resume()
    resumed = trainer("stopped").fit()
    assert resumed["resumed_from_step"] == 6 and straight["resumed_from_step"] is None
    assert resumed["final_train_loss"] == straight["final_train_loss"]
    a, b = (load_file(str(tmp_path / name / "out/model.safetensors")) for name in ("straight", "stopped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for log in ("steps.csv", "evals.csv"):
        assert (tmp_path / "stopped" / log).read_text() == (tmp_path / "straight" / log).read_text()
    # A finished run asked for again (`dvc repro --force` keeps the persisted run dir and removes the
    # logs): it resumes at its last step and writes its logs and weights again.
    logs = {log: (tmp_path / "straight" / log).read_text() for log in ("steps.csv", "evals.csv")}
    for log in logs:
        (tmp_path / "straight" / log).unlink()
    (tmp_path / "straight/out/model.safetensors").unlink()
    assert trainer("straight").fit()["resumed_from_step"] == params.max_steps
    assert {log: (tmp_path / "straight" / log).read_text() for log in logs} == logs
    again = load_file(str(tmp_path / "straight/out/model.safetensors"))
    assert again.keys() == a.keys() and all(torch.equal(again[k], a[k]) for k in a)


def test_an_unreadable_resume_checkpoint_is_not_resumed_and_says_why(tmp_path, caplog):
    params = validate_params(TINY_PARAMS)
    model = build_model(params.model.model_copy(update={"vocab_size": 64}))
    tokens = np.zeros(256, dtype=np.uint16)
    trainer = Trainer(model, params.pretrain, tokens, tokens, run_dir=tmp_path / "run", out_dir=tmp_path / "out",
                      sidecar={}, val_tokens_per_byte=1.0)
    assert not trainer.try_resume() and caplog.text == ""       # nothing to resume: nothing to say
    trainer.save_checkpoint()
    trained = (tmp_path / "run" / TRAINER).read_bytes()
    (tmp_path / "run" / TRAINER).write_bytes(trained[:len(trained) // 2])    # a file cut short
    assert not trainer.try_resume()
    assert f"not resuming from {tmp_path / 'run'}: its checkpoint is unreadable (RuntimeError: PytorchStreamReader " \
           "failed reading zip archive" in caplog.text and "training starts from step 0" in caplog.text
    # each other way a checkpoint can be unreadable: said, not resumed, never a traceback
    weights = (tmp_path / "run/model.safetensors").read_bytes()
    for name, content, why in ((TRAINER, b"", "EOFError"), (TRAINER, b"garbage" * 10, "UnpicklingError"),
                               ("model.safetensors", weights[:-9] + bytes([weights[-9] ^ 1]) + weights[-8:],
                                "InputError: corrupted checkpoint weights")):
        trainer.save_checkpoint()
        (tmp_path / "run" / name).write_bytes(content)
        caplog.clear()
        assert not trainer.try_resume() and f"its checkpoint is unreadable ({why}" in caplog.text, name
    trainer.save_checkpoint()
    torch.save([1, 2], tmp_path / "run" / TRAINER)
    caplog.clear()
    assert not trainer.try_resume() and "(InputError: trainer.pt holds a list, not a trainer's state)" in caplog.text


def test_checkpoint_loads_and_bad_checkpoints_fail_clearly(tokenized_project, tmp_path):
    proj = make_project(tmp_path / "p")
    shutil.copytree(tokenized_project / "data", proj / "data", dirs_exist_ok=True)
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


@pytest.mark.parametrize("grad_accum", [1, 4, 64, 128, 300])
def test_every_micro_batch_of_a_run_has_its_own_seed(grad_accum):
    """Micro-batch 64 + m of a step used to be micro-batch m of the next one (grad_accum > 64)."""
    seeds = [batch_seed(7, step, micro, grad_accum) for step in range(5) for micro in range(grad_accum)]
    assert len(set(seeds)) == len(seeds)
    if grad_accum <= 64:                       # the seeds every run so far has used, unchanged
        assert batch_seed(7, 1, grad_accum - 1, grad_accum) == (7 * 1_000_003 + 1) * 64 + grad_accum - 1


def test_grad_accum_steps_once_on_the_mean_gradient_of_its_own_micro_batches(tmp_path):
    """grad_accum=4 with batch_size 1: one optimizer step on the gradient of the mean loss over every
    trained target of the four micro-batches the step's seeds draw (batch_seed(seed, 0, micro, 4)),
    computed here by hand. The label masks (as SFT's) leave each micro-batch a different number of
    targets: each target weighs the same, as in one batch of 4. A loop that drew the same micro-batch
    every time, summed rather than averaged, or averaged the micro-batches' own means would not match."""
    import copy

    from hatchling.model.lm import IGNORE, loss_sum
    from hatchling.train.optim import build_optimizers, set_lr

    params = validate_params(TINY_PARAMS).pretrain.model_copy(
        update={"grad_accum": 4, "batch_size": 1, "max_steps": 1, "grad_clip": 0.0, "device": "cpu"})
    rng = np.random.default_rng(0)
    data = rng.integers(0, 64, 4096).astype(np.uint16)
    kept = rng.random(4096) < 0.5 + 0.4 * np.sin(np.arange(4096) / 50)         # masks that differ window to window
    labels = np.where(kept, data.astype(np.int64), IGNORE)
    torch.manual_seed(0)
    model = build_model(validate_params(TINY_PARAMS).model.model_copy(update={"vocab_size": 64}))
    reference = copy.deepcopy(model)
    initial = {n: q.detach().clone() for n, q in model.named_parameters()}
    trainer = Trainer(model, params, data, data, run_dir=tmp_path / "run", out_dir=tmp_path / "out",
                      sidecar={}, val_tokens_per_byte=1.0, train_labels=labels, val_labels=labels)
    seen = {}          # the gradients its optimizer steps on: AdamW's update hides most of their scale
    trainer.optimizers[0].register_step_pre_hook(lambda opt, args, kwargs: seen.update(
        {n: q.grad.clone() for n, q in trainer.model.named_parameters() if q.grad is not None}))
    loss, _, length = trainer.train_step()

    reference.train()
    names = [n for n, q in reference.named_parameters() if q.requires_grad]
    sums, counts, batches = [], [], []
    for micro in range(4):
        x, y = sample_batch(data, 1, length, batch_seed(params.seed, 0, micro, 4), "cpu", labels)
        batches.append(x)
        total, count = loss_sum(reference, x, y)
        sums.append(total)
        counts.append(int(count))
    mean = sum(sums) / sum(counts)
    mean.backward()
    grads = {n: q.grad for n, q in reference.named_parameters() if q.requires_grad}
    assert len({tuple(x.flatten().tolist()) for x in batches}) == 4          # four different windows
    assert len(set(counts)) > 1                                              # ... with different target counts
    assert loss == pytest.approx(mean.item(), rel=1e-6)
    assert loss != pytest.approx(sum(s.item() / c for s, c in zip(sums, counts, strict=True)) / 4, rel=1e-4)
    assert trainer.tokens_seen == sum(counts)
    assert seen.keys() == set(names)
    for n in names:
        torch.testing.assert_close(seen[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)

    optimizers = build_optimizers(reference, params)
    set_lr(optimizers, lr_multiplier(0, params.warmup_steps, params.max_steps, params.min_lr_ratio))
    for opt in optimizers:
        opt.step()
    assert trainer.step == 1
    ours, theirs = dict(trainer.model.named_parameters()), dict(reference.named_parameters())
    for n in names:
        torch.testing.assert_close(ours[n].detach(), theirs[n].detach(), rtol=1e-5, atol=1e-6, msg=n)
    assert all(not torch.equal(ours[n].detach(), initial[n]) for n in names)      # every weight took the step


def test_early_stopping(tokenized_project, tmp_path):
    proj = make_project(tmp_path / "p")
    shutil.copytree(tokenized_project / "data", proj / "data", dirs_exist_ok=True)
    command = hatchling_cmd("run", "pretrain", "--set", "pretrain.max_steps=40", "--set", "pretrain.eval_every=1",
                            "--set", "pretrain.early_stopping_patience=1", "--set", "pretrain.lr=0.9",
                            "--set", "pretrain.warmup_steps=0")
    run_cmd(command, proj)
    report = json.loads((proj / "reports/pretrain.json").read_text())
    assert report["stopped_early"] and report["steps"] < 40
    weights = (proj / "checkpoints/pretrain/model.safetensors").read_bytes()
    run_cmd(command, proj)                # run again (dvc repro --force): resumes the stopped run, trains no further
    again = json.loads((proj / "reports/pretrain.json").read_text())
    assert again["stopped_early"] and again["resumed_from_step"] == again["steps"] == report["steps"]
    assert (proj / "checkpoints/pretrain/model.safetensors").read_bytes() == weights


def test_two_process_ddp_and_fsdp_equal_one_process_with_the_global_batch(tokenized_project, tmp_path):
    """torchrun with gloo, world size 2, each rank half of the global batch, DDP and FSDP: the same
    weights as one process with the whole batch (up to float summation order)."""
    import socket

    from tests.conftest import copy_project

    single = copy_project(tokenized_project, tmp_path / "single")
    overrides = ["--set", "pretrain.batch_size=4", "--set", "pretrain.max_steps=3", "--set", "pretrain.eval_every=3"]
    run_cmd(hatchling_cmd("run", "pretrain", *overrides), single)
    a = load_file(single / "checkpoints/pretrain/model.safetensors")
    ra = json.loads((single / "reports/pretrain.json").read_text())
    for strategy in ("ddp", "fsdp"):      # FSDP2 shards the model; the update must not change
        multi = copy_project(tokenized_project, tmp_path / strategy)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                 "127.0.0.1", "--master_port", str(port), "-m", "hatchling", "run", "pretrain", *overrides,
                 "--set", f"pretrain.parallel={strategy}"], multi, timeout=300)
        b = load_file(multi / "checkpoints/pretrain/model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{strategy}: {key}")
        rb = json.loads((multi / "reports/pretrain.json").read_text())
        assert ra["steps"] == rb["steps"] == 3
        assert rb["final_train_loss"] == pytest.approx(ra["final_train_loss"], rel=1e-5)
        if strategy == "fsdp":            # the training checkpoint holds the whole (gathered) state
            state = torch.load(multi / "checkpoints/pretrain-run/trainer.pt", weights_only=True)
            exp_avg = state["optimizers"][0]["state"]
            assert len(exp_avg) == len(a) and all(v["exp_avg"].shape == a[k].shape
                                                  for k, v in exp_avg.items()), "optimizer state not whole"


def _train_on_two_ranks(rank: int, port: int, strategy: str, config: dict, out: str) -> None:
    """One of two gloo ranks: 3 AdamW steps of `config`'s model on this rank's half of fixed global batches
    (the trainer's loss: the mean next-token loss plus the switches' own), then its whole weights to `out`."""
    import os

    import torch.distributed as dist

    from hatchling.train.distributed import full_state, init_world, wrap_for_training

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    world = init_world(torch.device("cpu"))
    try:
        weights = _three_steps(config, world, wrap_for_training, strategy)
        torch.save(full_state(weights, [], strategy)[0], f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _three_steps(config: dict, world, wrap, strategy: str):
    torch.manual_seed(0)
    model = build_model(config).train()
    module = wrap(model, world, strategy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        x = torch.randint(0, 61, (4, 17), generator=torch.Generator().manual_seed(step))
        x, y = world.shard(x[:, :-1]), world.shard(x[:, 1:])
        loss = torch.nn.functional.cross_entropy(module(x).float().flatten(0, 1), y.flatten())
        (loss + sum(model.aux_losses().values(), torch.zeros(()))).backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("strategy, config", [
    ("ddp", {"vocab_size": 61, "d_model": 32, "n_layers": 2, "n_heads": 2, "head_dim": 8, "mlp_hidden": 64,
             "use_episodic_memory": True}),
    ("fsdp", {"arch": "bdh", "vocab_size": 61, "d_model": 32, "n_layers": 2, "n_heads": 2, "bdh": {"neurons": 64}})])
def test_two_ranks_train_the_research_models(strategy, config, tmp_path):
    """DDP with the episodic memory (its read path idle on the first step, an empty store, and on any step a
    rank reads nothing) and FSDP with BDH (its layers' parameters read without calling them) train on two
    gloo ranks: DDP's ranks end with the same weights; FSDP's equal one process's on the whole batch."""
    import socket

    import torch.multiprocessing as mp

    from hatchling.train.distributed import World

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_train_on_two_ranks, args=(port, strategy, config, str(tmp_path)), nprocs=2, join=True)
    first = torch.load(tmp_path / "rank0.pt", weights_only=True)
    if strategy == "fsdp":                # rank 0 gathers the whole state
        alone = _three_steps(config, World(), lambda model, *_: model, strategy).state_dict()
        assert first.keys() == alone.keys()
        for key in alone:
            torch.testing.assert_close(first[key], alone[key], rtol=1e-4, atol=1e-5, msg=key)
    else:
        second = torch.load(tmp_path / "rank1.pt", weights_only=True)
        for key in first:
            torch.testing.assert_close(second[key], first[key], msg=key)
        initial = (torch.manual_seed(0), build_model(config))[1].state_dict()
        assert any(not torch.equal(first[k], initial[k]) for k in initial if k.startswith("memory."))


def test_rank_losses_average_to_the_global_mean_gradient_with_uneven_masks():
    """Two ranks whose halves hold different numbers of trained (non-IGNORE) targets: averaging
    their gradients (what DDP does) gives the single-process gradient of the global mean."""
    from hatchling.train.distributed import World

    torch.manual_seed(0)
    model = build_model({"size": "toddler", "vocab_size": 50, "d_model": 32, "n_layers": 2, "n_heads": 2,
                         "head_dim": 16, "n_kv_heads": 1, "mlp_hidden": 64, "chunk_size": 16})
    x = torch.randint(0, 50, (4, 12))
    y = torch.randint(0, 50, (4, 12))
    y[:2, :9] = IGNORE                                   # rank 0's rows train far fewer targets
    lm_loss(model, x, y).backward()
    full = [p.grad.clone() for p in model.parameters()]
    count = (y != IGNORE).sum()
    averaged = [torch.zeros_like(g) for g in full]
    for rank in range(2):
        world = World(rank, 2)
        model.zero_grad()
        local, _ = loss_sum(model, world.shard(x), world.shard(y))
        (local * world.size / count).backward()
        averaged = [a + p.grad / 2 for a, p in zip(averaged, model.parameters(), strict=True)]
    for f, a in zip(full, averaged, strict=True):
        torch.testing.assert_close(a, f, rtol=1e-5, atol=1e-7)
    assert World(1, 2).shard(x).tolist() == x[2:].tolist()
    with pytest.raises(ValueError, match="batch_size 4 does not divide across 3 processes"):
        World(0, 3).shard(x)


CONFIG = {"vocab_size": 61, "d_model": 32, "n_layers": 2, "n_heads": 2, "head_dim": 8, "mlp_hidden": 64}


def _step(model, module, opt, world, step: int) -> None:
    x = torch.randint(0, 61, (4, 17), generator=torch.Generator().manual_seed(step))
    x, y = world.shard(x[:, :-1]), world.shard(x[:, 1:])
    torch.nn.functional.cross_entropy(module(x).float().flatten(0, 1), y.flatten()).backward()
    opt.step()
    opt.zero_grad()


def _resume_on_two_ranks(rank: int, port: int, saved: str, out: str) -> None:
    """One of two gloo FSDP ranks: load the state one process saved after a step, take the second step on this
    rank's half of the global batch, then the whole weights to `out`."""
    import os

    import torch.distributed as dist

    from hatchling.train.distributed import full_state, init_world, load_full_state, wrap_for_training

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    world = init_world(torch.device("cpu"))
    try:
        torch.manual_seed(1)                        # other initial weights: the loaded ones must replace them
        model = build_model(CONFIG).train()
        module = wrap_for_training(model, world, "fsdp")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        weights, opt_states = torch.load(saved, weights_only=True)
        load_full_state(model, [opt], weights, opt_states, "fsdp")
        _step(model, module, opt, world, step=1)
        state = full_state(model, [opt], "fsdp")[0]
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def test_a_run_saved_by_one_process_resumes_under_fsdp_on_two(tmp_path):
    """One process saves its optimizer state by parameter position, FSDP's loader reads it by name: a run
    checkpointed by one process (with parallel fsdp, or killed and resumed under torchrun) resumes on two FSDP
    ranks and takes the step one process would."""
    import socket

    import torch.multiprocessing as mp

    from hatchling.train.distributed import World, full_state

    torch.manual_seed(0)
    model = build_model(CONFIG).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, model, opt, World(), step=0)
    torch.save(full_state(model, [opt], "fsdp"), tmp_path / "saved.pt")        # (weights, [by position])
    assert all(isinstance(i, int) for i in torch.load(tmp_path / "saved.pt")[1][0]["state"])
    _step(model, model, opt, World(), step=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_resume_on_two_ranks, args=(port, str(tmp_path / "saved.pt"), str(tmp_path / "resumed.pt")), nprocs=2,
             join=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-5, msg=key)
