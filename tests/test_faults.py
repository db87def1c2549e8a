"""Corrupt or mismatched inputs fail before any work with one error naming the file (and line) and
what is wrong; a training run whose loss turns NaN stops at that step and keeps its last good
checkpoint. Each case on tiny files the test makes itself."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hatchling.checkpoint import SIDECAR, TRAINER, WEIGHTS, load_for_inference, load_model, load_weights, save_model
from hatchling.config import validate_params
from hatchling.data.benchmarks import load_records, read_raw
from hatchling.data.corpus import iter_documents
from hatchling.data.packed import check_same_tokenizer, load_split, pack
from hatchling.data.tokenizer import TOKENIZER, train_tokenizer
from hatchling.errors import InputError, StageError
from hatchling.model import build_model
from hatchling.train.loop import Trainer
from tests.conftest import REPO, TINY_PARAMS, hatchling_here, make_project

CONFIG = {"arch": "hybrid", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "head_dim": 16,
          "mlp_hidden": 64, "attn_every": 2, "chunk_size": 8}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_truncated_or_tampered_checkpoint_is_refused_naming_the_file(tmp_path):
    ck = tmp_path / "ck"
    save_model(build_model(CONFIG), ck, {"step": 1})
    weights, sidecar = ck / WEIGHTS, (ck / SIDECAR).read_text()
    good = weights.read_bytes()
    assert json.loads(sidecar)["weights_sha256"] == sha256(weights)
    flipped = bytearray(good)
    flipped[-5] ^= 0x01               # one bit of the last tensor: the safetensors header still parses
    for bad in (bytes(flipped), good[:len(good) // 2]):
        weights.write_bytes(bad)
        with pytest.raises(InputError, match=rf"corrupted checkpoint weights {weights}: sha256 [0-9a-f]{{64}} is "
                                             rf"not the {json.loads(sidecar)['weights_sha256']} recorded in "
                                             rf"{ck / SIDECAR}"):
            load_model(ck)
        assert weights.read_bytes() == bad and (ck / SIDECAR).read_text() == sidecar    # nothing rewritten
    weights.write_bytes(good[:len(good) // 2])
    (ck / SIDECAR).write_text(json.dumps({k: v for k, v in json.loads(sidecar).items() if k != "weights_sha256"}))
    with pytest.raises(InputError, match=rf"corrupted checkpoint weights {weights}: .*incomplete metadata"):
        load_model(ck)                # a checkpoint from before the hash: the format's own check still names it
    weights.write_bytes(good)
    assert load_model(ck)[1]["step"] == 1


def test_a_shard_line_that_is_not_a_json_object_is_named_by_file_and_line(tmp_path):
    shard = tmp_path / "crawl" / "shard-00000.jsonl"
    shard.parent.mkdir()
    good = "".join(json.dumps({"id": str(i), "text": f"doc {i}"}) + "\n" for i in range(2))
    for line, message in ((b"{bad json", "not valid JSON"), (b'{"text": "caf\xe9"}', "not valid UTF-8"),
                          (b'["text"]', "expected a JSON object, got list")):
        shard.write_bytes(good.encode() + b"\n" + line + b"\n")       # a blank line 3 is skipped, not miscounted
        with pytest.raises(InputError, match=rf"^{shard}:4: {message}"):
            list(iter_documents(shard.parent))
        own = tmp_path / "own_eval_set.jsonl"                           # an eval set of one's own: the same errors
        own.write_bytes(shard.read_bytes())
        with pytest.raises(InputError, match=rf"^{own}:4: {message}"):
            read_raw(own)


def tokenized(directory: Path, train: np.ndarray, vocab_size: int = 64, tokenizer_sha256: str = "a" * 64) -> Path:
    directory.mkdir()
    train.tofile(directory / "train.bin")
    meta = {"dtype": train.dtype.name, "vocab_size": vocab_size, "eot_id": 0, "tokenizer_sha256": tokenizer_sha256,
            "train": {"tokens": int(train.size), "bytes": int(train.size)}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def test_token_files_that_do_not_fit_the_vocabulary_or_are_cut_short_are_refused(tmp_path):
    ok = tokenized(tmp_path / "ok", pack([[1, 2, 63], [5]], eot_id=0, dtype=np.uint16))
    assert load_split(ok, "train").tolist() == [1, 2, 63, 0, 5, 0]
    foreign = tokenized(tmp_path / "foreign", pack([[1, 2, 64], [300]], eot_id=0, dtype=np.uint16))
    with pytest.raises(InputError, match=rf"^{foreign / 'train.bin'}: token id 300 is outside the tokenizer's "
                                         rf"vocabulary of 64 \({foreign / 'meta.json'}\)"):
        load_split(foreign, "train")
    cut = foreign / "train.bin"
    cut.write_bytes(cut.read_bytes()[:7])
    with pytest.raises(InputError, match=rf"^{cut}: 7 bytes, not the 6 uint16 tokens that {foreign / 'meta.json'} "
                                         "records"):
        load_split(foreign, "train")


class Inputs(dict):
    """A stage context's inputs: by name, as an attribute or an item."""
    __getattr__ = dict.__getitem__


def test_a_checkpoint_whose_tokenizer_is_not_the_datas_is_refused(tmp_path):
    data = tokenized(tmp_path / "tokenized", pack([[1, 2]], eot_id=0, dtype=np.uint16), tokenizer_sha256="a" * 64)
    check_same_tokenizer(data, tmp_path / "ck", "a" * 64)
    with pytest.raises(InputError, match=rf"^{tmp_path / 'ck'}: its tokenizer \(sha256 b{{64}}\) is not the one of "
                                         rf"the token files in {data} \(sha256 a{{64}}\)"):
        check_same_tokenizer(data, tmp_path / "ck", "b" * 64)

    # the export stage checks it before any work; a checkpoint's own tokenizer must match its sidecar
    tok = tmp_path / TOKENIZER
    train_tokenizer(["hello world, hello hatchling"] * 4, 300).save(str(tok))
    ck = tmp_path / "ck"
    save_model(build_model(CONFIG), ck, {"tokenizer_sha256": "b" * 64}, files={TOKENIZER: tok})
    with pytest.raises(InputError, match=rf"^corrupted checkpoint file {ck / TOKENIZER}: sha256 {sha256(tok)} is not "
                                         rf"the b{{64}} recorded in {ck / SIDECAR}"):
        load_for_inference(ck)
    from hatchling.train import rlvr, sft

    for stage in (sft, rlvr):             # the stages that train on from a checkpoint check it before any work
        ctx = SimpleNamespace(params=SimpleNamespace(sft=None, rlvr=None), inputs=Inputs(init=ck),
                              outputs=SimpleNamespace(run=tmp_path / "run"))
        with pytest.raises(InputError, match=rf"^corrupted checkpoint file {ck / TOKENIZER}: sha256"):
            stage.run(ctx)
    save_model(build_model(CONFIG), ck, {"tokenizer_sha256": sha256(tok)}, files={TOKENIZER: tok})
    from hatchling.export import stage as export_stage

    ctx = SimpleNamespace(params=SimpleNamespace(export=SimpleNamespace(source="pretrain", hf=False)),
                          inputs=Inputs(pretrain=ck, tokenized=data), outputs=SimpleNamespace(export=tmp_path / "ex"))
    with pytest.raises(InputError, match=rf"^{ck}: its tokenizer \(sha256 {sha256(tok)}\) is not the one"):
        export_stage.run(ctx)


def test_tokenized_data_without_a_readable_meta_json_is_named(tmp_path, capsys):
    proj = make_project(tmp_path / "p")
    (proj / "data/tokenized").mkdir(parents=True)
    assert hatchling_here(proj, "run", "pretrain") == 2
    assert f"no tokenized data at {proj / 'data/tokenized'} (run the tokenize stage first)" in capsys.readouterr().err
    (proj / "data/tokenized/meta.json").write_text('{"dtype": "uint16", ')
    assert hatchling_here(proj, "run", "pretrain") == 2
    assert f"{proj / 'data/tokenized/meta.json'}: not valid JSON" in capsys.readouterr().err
    (proj / "data/tokenized/meta.json").write_text('["uint16"]')
    assert hatchling_here(proj, "run", "pretrain") == 2
    assert f"{proj / 'data/tokenized/meta.json'}: expected a JSON object, got list" in capsys.readouterr().err


def test_a_benchmark_file_cut_short_is_refused_naming_it(tmp_path):
    shutil.copy(REPO / "data/benchmarks/SOURCES.md", tmp_path)
    path = tmp_path / "piqa_valid.jsonl.gz"
    data = (REPO / "data/benchmarks" / path.name).read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match=rf"^{path}: not a readable gzip file .*corrupt or truncated"):
        load_records("piqa", str(path))
    with gzip.open(path, "wb") as f:                 # readable, but not the published bytes
        f.write(gzip.decompress(data)[:-200])
    with pytest.raises(InputError, match=rf"^{path}: sha256 of its content is [0-9a-f]{{64}}, not the published"):
        load_records("piqa", str(path))


def tiny_trainer(tmp_path):
    """A two-layer model and its trainer for a few steps, checkpointed every 2, on random tokens."""
    params = validate_params({**TINY_PARAMS, "model": {**TINY_PARAMS["model"], "n_layers": 2},
                              "pretrain": {**TINY_PARAMS["pretrain"], "max_steps": 6, "checkpoint_every": 2,
                                           "eval_every": 100}})
    torch.manual_seed(0)
    model = build_model(params.model.model_copy(update={"vocab_size": 64}))
    tokens = np.random.default_rng(0).integers(0, 64, 512).astype(np.uint16)
    return model, Trainer(model, params.pretrain, tokens, tokens, run_dir=tmp_path / "run", out_dir=tmp_path / "out",
                          sidecar={}, val_tokens_per_byte=1.0)


@pytest.mark.parametrize("update", [{"seq_len": 600}, {"seq_len": 32, "seq_len_curriculum": [[0, 16], [3, 511]]}])
def test_training_data_too_short_for_one_window_is_refused_naming_the_key(tmp_path, update):
    """A seq_len (or a curriculum's longest) that no window of the data can hold: one error naming the
    stage's key, before any step (it used to fail at the step that first drew such a window)."""
    params = validate_params(TINY_PARAMS).pretrain.model_copy(update=update)
    model = build_model(validate_params(TINY_PARAMS).model.model_copy(update={"vocab_size": 64}))
    tokens = np.zeros(512, dtype=np.uint16)
    longest = max([update["seq_len"], *(n for _, n in update.get("seq_len_curriculum", []))])
    with pytest.raises(InputError) as err:
        Trainer(model, params, tokens, tokens, run_dir=tmp_path / "run", out_dir=tmp_path / "out",
                sidecar={"stage": "pretrain"}, val_tokens_per_byte=1.0)
    assert str(err.value) == (f"pretrain: the training data holds 512 tokens, too few for one window of seq_len "
                              f"{longest} (a window takes seq_len + 2): lower pretrain.seq_len (and "
                              "seq_len_curriculum) or give it more data")
    assert not (tmp_path / "run").exists()
    fits = params.model_copy(update={"seq_len": 510, "seq_len_curriculum": []})
    Trainer(model, fits, tokens, tokens, run_dir=tmp_path / "run", out_dir=tmp_path / "out", sidecar={},
            val_tokens_per_byte=1.0)                    # 510 + 2 tokens: the longest window that fits


def test_inputs_with_nothing_to_work_on_are_named(tmp_path):
    from hatchling.data.crawl.mirror import resolve_mirror
    from hatchling.data.tokenize import split_documents
    from hatchling.errors import ConfigError
    from hatchling.train.sft import read_chats

    with pytest.raises(InputError, match=r"^need at least 2 documents to split train/val, got 1$"):
        split_documents(["one page"], 0.1, 0)
    assert split_documents(["a", "b"], 0.0, 0) == (["a"], ["b"])      # two: one on each side, whatever the draw
    (tmp_path / "chats.jsonl").write_text("\n")
    with pytest.raises(InputError, match=rf"^sft data: no conversations in {tmp_path / 'chats.jsonl'}$"):
        read_chats([tmp_path / "chats.jsonl"])
    with pytest.raises(ConfigError, match=rf"^crawl.mirror = '{tmp_path / 'nope'}': no such directory$"):
        resolve_mirror(str(tmp_path / "nope"), [], tmp_path / "scratch")


def test_a_diverging_run_stops_at_that_step_and_keeps_its_last_good_checkpoint(tmp_path):
    model, trainer = tiny_trainer(tmp_path)
    set_train_step = model.set_train_step

    def blow_up(step: int) -> None:     # the weights go NaN just before the 5th step (a blown-up update)
        set_train_step(step)
        if step == 4:
            with torch.no_grad():
                next(model.parameters()).fill_(math.nan)

    model.set_train_step = blow_up
    with pytest.raises(StageError, match=rf"^training diverged at step 5: training loss is nan; stopped before that "
                                         rf"step's update, nothing of it saved \(the last good checkpoint, of step 4, "
                                         rf"stays in {tmp_path / 'run'}\)"):
        trainer.fit()
    assert json.loads((tmp_path / "run" / SIDECAR).read_text())["step"] == 4 and (tmp_path / "run" / TRAINER).is_file()
    assert all(torch.isfinite(v).all() for v in load_weights(tmp_path / "run").values())    # its hash verified, too
    assert len(trainer.steps) == 4 and not (tmp_path / "out").exists()


def test_an_update_that_leaves_weights_not_finite_is_never_saved(tmp_path):
    """The loss of a step can be finite while its update overflows: the checkpoint after it refuses."""
    model, trainer = tiny_trainer(tmp_path)

    def overflow(optimizer, args, kwargs) -> None:      # the 4th update sends one weight to infinity
        if trainer.step == 3:
            with torch.no_grad():
                next(model.parameters())[0].fill_(math.inf)

    trainer.optimizers[0].register_step_post_hook(overflow)
    with pytest.raises(StageError, match=rf"^training diverged at step 4: its update left 1 weight tensors not "
                                         rf"finite \(.*\); not saved \(the last good checkpoint, of step 2, stays in "
                                         rf"{tmp_path / 'run'}\)"):
        trainer.fit()
    assert json.loads((tmp_path / "run" / SIDECAR).read_text())["step"] == 2
    assert all(torch.isfinite(v).all() for v in load_weights(tmp_path / "run").values())


def test_rl_that_diverges_stops_at_that_step_and_keeps_its_last_checkpoint_and_model(pretrained_project, tmp_path,
                                                                                     monkeypatch, capsys):
    from hatchling.train import rlvr
    from tests.conftest import copy_project, hatchling_here, write_params

    proj = copy_project(pretrained_project, tmp_path / "p")
    write_params(proj, {**TINY_PARAMS, "rlvr": {**TINY_PARAMS["rlvr"], "max_steps": 4, "checkpoint_every": 1}})
    before = (proj / "checkpoints/rlvr" / WEIGHTS).read_bytes()
    real, calls = rlvr.rl_step, []

    def third_step_blows_up(*args, **kwargs):
        stats = real(*args, **kwargs)
        calls.append(1)
        return {**stats, "kl": math.nan} if len(calls) == 3 else stats

    monkeypatch.setattr(rlvr, "rl_step", third_step_blows_up)
    assert hatchling_here(proj, "run", "rlvr") == 2
    run = proj / "checkpoints/rlvr-run"
    assert f"error: RL diverged at step 3: kl is nan; the last checkpoint stays in {run.resolve()}" in \
        capsys.readouterr().err
    assert json.loads((run / SIDECAR).read_text())["step"] == 2 and (proj / "checkpoints/rlvr" / WEIGHTS).read_bytes() \
        == before
