"""Stage `sft`: chat supervised fine-tuning of the pretrained model, with loss on assistant tokens only.

Conversations from the JSONL files in params.sft.data ({"messages": [...]}) are rendered with the
chat template and packed end to end (each followed by end-of-text), with a label stream that is
IGNORE everywhere except the assistant's turns; training windows are then sampled exactly as in
pretraining, by the same Trainer (resume, checkpoints, CSV log, MLflow metrics). With
``sft.isolate_documents`` (the default) no conversation sees the one before it in a window: each
begins after an end-of-text, where attention is masked and the KDA state restarts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hatchling.checkpoint import load_checkpoint_tokenizer, load_model, read_sidecar
from hatchling.data.chat import render_chat_with_mask
from hatchling.data.tokenizer import EOT, ROLE_TOKENS, TOKENIZER
from hatchling.errors import InputError, MissingInputError
from hatchling.io import hash_paths, numbered_jsonl
from hatchling.model.lm import IGNORE, tokens_per_byte
from hatchling.train.loop import Trainer, run_fingerprint


def read_chats(paths: list[Path]) -> list[list[dict]]:
    """The conversations of JSONL files, each checked: a bad one is named by file and line."""
    chats = []
    for path in paths:
        if not path.is_file():
            raise MissingInputError(f"sft data: no such file {path}")
        for line, record in numbered_jsonl(path):
            messages = record.get("messages")
            if not isinstance(messages, list) or not any(isinstance(m, dict) and m.get("role") == "assistant"
                                                         for m in messages):
                raise InputError(f"{path}:{line}: expected {{\"messages\": [...]}} with at least one assistant turn")
            for i, m in enumerate(messages):
                if not (isinstance(m, dict) and m.get("role") in ROLE_TOKENS and isinstance(m.get("content"), str)):
                    raise InputError(f"{path}:{line}: message {i} must be {{\"role\": one of {sorted(ROLE_TOKENS)}, "
                                     f"\"content\": a string}}, got {json.dumps(m)[:120]}")
            chats.append(messages)
    if not chats:
        raise InputError(f"sft data: no conversations in {', '.join(map(str, paths))}")
    return chats


def pack_chats(tokenizer, chats: list[list[dict]]) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, labels, assistant bytes): conversations end to end, each followed by end-of-text;
    labels hold the token where it is trained and IGNORE elsewhere."""
    eot = tokenizer.token_to_id(EOT)
    ids: list[int] = []
    labels: list[int] = []
    assistant_bytes = 0
    for chat in chats:
        chat_ids, trained = render_chat_with_mask(tokenizer, chat)
        ids += [*chat_ids, eot]
        labels += [t if keep else IGNORE for t, keep in zip(chat_ids, trained, strict=True)] + [IGNORE]
        assistant_bytes += sum(len(m["content"].encode()) + 1 for m in chat if m["role"] == "assistant")
    return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), assistant_bytes


def run(ctx) -> dict:
    p, init_dir = ctx.params.sft, ctx.inputs.init
    init = read_sidecar(init_dir)
    tokenizer = load_checkpoint_tokenizer(init_dir, init)
    train_files, val_files = [ctx.root / f for f in p.data], [ctx.root / f for f in p.val_data]
    chats = read_chats(train_files)
    train_ids, train_labels, _ = pack_chats(tokenizer, chats)
    val_ids, val_labels, val_bytes = pack_chats(tokenizer, read_chats(val_files))
    model, _ = load_model(init_dir)
    data_hash = hash_paths([*train_files, *val_files, init_dir], ctx.root)
    fingerprint = run_fingerprint(p, code=ctx.code, data=data_hash)
    sidecar = {"tokenizer_sha256": init["tokenizer_sha256"], "data_sha256": data_hash, "stage": "sft",
               "init_step": init.get("step")}
    val_tokens = int((val_labels != IGNORE).sum())
    trainer = Trainer(model, p, train_ids, val_ids, run_dir=ctx.outputs.run, out_dir=ctx.outputs.model,
                      sidecar=sidecar, val_tokens_per_byte=tokens_per_byte(val_tokens, val_bytes),
                      log=ctx.log, csv_path=ctx.outputs.log, eval_csv_path=ctx.outputs.eval_log,
                      fingerprint=fingerprint,
                      files={TOKENIZER: init_dir / TOKENIZER},
                      train_labels=train_labels, val_labels=val_labels, eot_id=tokenizer.token_to_id(EOT))
    metrics = trainer.fit()
    metrics.update(conversations=len(chats), trained_tokens_per_epoch=int((train_labels != IGNORE).sum()))
    return metrics
