"""SFT: the chat template's loss mask, packing, the masked loss, the verifiable task data, the stage."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from hatchling.data.chat import render_chat, render_chat_with_mask
from hatchling.data.tasks import code_items, math_items, split_items, to_messages
from hatchling.data.tokenizer import END_OF_TURN, EOT, ROLE_TOKENS, load_tokenizer
from hatchling.eval.generation import gsm8k_correct, humaneval_passes
from hatchling.model import build_model
from hatchling.train.loop import IGNORE, lm_loss, sample_batch
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


def test_tasks_are_seeded_verifiable_and_split_disjointly():
    math = math_items(200, seed=0)
    assert math == math_items(200, seed=0) and math != math_items(200, seed=1)
    train, heldout = split_items(math, 0.2)
    assert heldout and not {m["question"] for m in train} & {m["question"] for m in heldout}
    for item in math[:20]:
        assert gsm8k_correct(item["answer"], item["answer"])
    for item in code_items(seed=0):
        assert humaneval_passes(item, item["canonical_solution"])[0], item["task_id"]
        assert not humaneval_passes(item, "    return None\n")[0], item["task_id"]
    chat = to_messages(code_items(0)[0])["messages"]
    assert chat[0]["role"] == "user" and chat[1]["content"].startswith("def ")


def test_bad_sft_data_is_named(tmp_path):
    bad = tmp_path / "chats.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"chats.jsonl:1: expected .*at least one assistant turn"):
        read_chats([bad])
    with pytest.raises(FileNotFoundError, match="sft data: no such file"):
        read_chats([tmp_path / "absent.jsonl"])


def test_sft_stage_lowers_the_heldout_assistant_loss(pretrained_project):
    report = json.loads((pretrained_project / "reports/sft.json").read_text())
    sidecar = json.loads((pretrained_project / "checkpoints/sft/model.json").read_text())
    assert sidecar["stage"] == "sft" and report["steps"] == 4 and report["conversations"] > 0
    history = list(csv.DictReader((pretrained_project / "logs/sft.csv").open()))
    assert float(history[-1]["val_loss"]) < float(history[0]["val_loss"])


def test_sft_with_bad_data_fails_and_keeps_the_previous_checkpoint(pretrained_project, tmp_path):
    proj = copy_project(pretrained_project, tmp_path / "proj")
    before = (proj / "checkpoints/sft/model.safetensors").read_bytes()
    (proj / "chats.jsonl").write_text('{"text": "not a chat"}\n')
    proc = run_cmd(hatchling_cmd("run", "sft", "--set", "sft.data=[chats.jsonl]"), proj, check=False)
    assert proc.returncode == 2 and "chats.jsonl:1: expected" in proc.stderr
    assert (proj / "checkpoints/sft/model.safetensors").read_bytes() == before


def test_training_tasks_are_checked_against_the_eval_sets(tmp_path):
    """A generated training problem that also sits in an eval set is dropped from the SFT/RL data."""
    from hatchling.config import validate_params
    from hatchling.data import tasks_stage
    from hatchling.io import read_jsonl, write_jsonl
    from tests.conftest import TINY_PARAMS

    tree = {**TINY_PARAMS, "tasks": {**TINY_PARAMS["tasks"], "math_items": 40}}
    train, _ = split_items(math_items(40, seed=0), tree["tasks"]["heldout_fraction"])
    leaked = train[0]
    write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": leaked["question"], "answer": leaked["answer"]}])
    (tmp_path / "data/crawl").mkdir(parents=True)
    write_jsonl(tmp_path / "data/crawl/shard-00000.jsonl", [{"id": "d", "text": "Title\nSome body text. " * 5}])
    tree["benchmarks"] = {"gsm8k": str(tmp_path / "gsm8k.jsonl"), "hatchling_math": "data/tasks/math_heldout.jsonl"}
    report = tasks_stage.run(validate_params(tree), tmp_path)
    kept = [x["question"] for x in read_jsonl(tmp_path / "data/tasks/math_train.jsonl")]
    assert report["contaminated_training_items"] == {"gsm8k": 1} and leaked["question"] not in kept
    assert len(kept) == len(train) - 1
