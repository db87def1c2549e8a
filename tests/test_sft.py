"""SFT: the chat template's loss mask, packing, the masked loss, the stage."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch
import torch.nn.functional as F

from hatchling.data.chat import render_chat, render_chat_with_mask
from hatchling.data.tokenizer import END_OF_TURN, EOT, ROLE_TOKENS, load_tokenizer
from hatchling.model import build_model
from hatchling.model.lm import IGNORE, lm_loss, sample_batch
from hatchling.train.sft import pack_chats, read_chats
from tests.conftest import copy_project, hatchling_cmd, run_cmd

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3 + 3?"},
        {"role": "assistant", "content": "6"}]


@pytest.fixture(scope="module")
def tokenizer(tokenized_project):
    return load_tokenizer(tokenized_project / "data/tokenized/tokenizer.json")


def test_only_assistant_turns_and_their_end_are_trained(tokenizer):
    ids, trained = render_chat_with_mask(tokenizer, CHAT)
    assert ids == render_chat(tokenizer, CHAT)
    end = tokenizer.token_to_id(END_OF_TURN)
    kept = [t for t, k in zip(ids, trained, strict=True) if k]
    assert kept == tokenizer.encode("4").ids + [end] + tokenizer.encode("6").ids + [end]
    roles = {tokenizer.token_to_id(t) for t in ROLE_TOKENS.values()}
    assert not any(k for t, k in zip(ids, trained, strict=True) if t in roles)
    with pytest.raises(ValueError, match="message 0: role must be one of"):
        render_chat_with_mask(tokenizer, [{"role": "robot", "content": "x"}])


def test_packing_and_the_masked_loss(tokenizer):
    ids, labels, assistant_bytes = pack_chats(tokenizer, [CHAT, CHAT[1:3]])
    eot = tokenizer.token_to_id(EOT)
    assert (ids == eot).sum() == 2 and labels[ids == eot].tolist() == [IGNORE, IGNORE]
    assert assistant_bytes == len("4") + 1 + len("6") + 1 + len("4") + 1
    trained = labels != IGNORE
    assert (labels[trained] == ids[trained]).all()
    torch.manual_seed(0)
    model = build_model({"size": "toddler", "vocab_size": tokenizer.get_vocab_size(), "d_model": 32, "n_layers": 2,
                         "n_heads": 2, "head_dim": 16, "n_kv_heads": 1, "mlp_hidden": 64, "chunk_size": 16})
    x, y = sample_batch(ids, 2, len(ids) - 2, seed=0, device="cpu", labels=labels)
    logits = model(x)
    mask = y != IGNORE
    by_hand = F.cross_entropy(logits[mask], y[mask])        # mean over the assistant's tokens only
    assert mask.any() and lm_loss(model, x, y).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_bad_sft_data_is_named(tmp_path):
    bad = tmp_path / "chats.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"chats.jsonl:1: expected .*at least one assistant turn"):
        read_chats([bad])
    with pytest.raises(FileNotFoundError, match="sft data: no such file"):
        read_chats([tmp_path / "absent.jsonl"])
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    for message, what in [({"role": "user", "content": None}, '"content": null'),
                          ({"role": "bot", "content": "x"}, '"role": "bot"'), ("hi", '"hi"')]:
        chat = {"messages": [message, *good["messages"]]}
        bad.write_text(json.dumps(good) + "\n\n" + json.dumps(chat) + "\n")          # line 3, after a blank one
        with pytest.raises(ValueError, match=rf"chats.jsonl:3: message 0 must be .*got .*{re.escape(what)}"):
            read_chats([bad])


def test_sft_stage_lowers_the_heldout_assistant_loss(pretrained_project):
    report = json.loads((pretrained_project / "reports/sft.json").read_text())
    sidecar = json.loads((pretrained_project / "checkpoints/sft/model.json").read_text())
    assert sidecar["stage"] == "sft" and report["steps"] == 4 and report["conversations"] > 0
    history = list(csv.DictReader((pretrained_project / "logs/sft_eval.csv").open()))
    assert float(history[-1]["val_loss"]) < float(history[0]["val_loss"])


def test_sft_with_bad_data_fails_and_keeps_the_previous_checkpoint(pretrained_project, tmp_path):
    proj = copy_project(pretrained_project, tmp_path / "proj")
    before = (proj / "checkpoints/sft/model.safetensors").read_bytes()
    (proj / "chats.jsonl").write_text('{"text": "not a chat"}\n')
    proc = run_cmd(hatchling_cmd("run", "sft", "--set", "sft.data=[chats.jsonl]"), proj, check=False)
    assert proc.returncode == 2 and "chats.jsonl:1: expected" in proc.stderr
    assert (proj / "checkpoints/sft/model.safetensors").read_bytes() == before

