"""Stage `sft`: chat supervised fine-tuning of the pretrained model, with loss on assistant tokens only.

Conversations from the JSONL files in params.sft.data ({"messages": [...]}) are rendered with the
chat template and packed end to end (each followed by end-of-text), with a label stream that is
IGNORE everywhere except the assistant's turns; training windows are then sampled exactly as in
pretraining, by the same Trainer (resume, checkpoints, CSV log, MLflow metrics).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from hatchling.data.chat import render_chat_with_mask
from hatchling.data.tokenizer import EOT, load_tokenizer
from hatchling.errors import InputError, MissingInputError
from hatchling.io import hash_paths, read_jsonl
from hatchling.train.checkpoint import TOKENIZER, load_model, read_sidecar
from hatchling.train.loop import IGNORE, Trainer

INIT = Path("checkpoints/pretrain")
OUT = Path("checkpoints/sft")
RUN = Path("checkpoints/sft-run")
LOG = Path("logs/sft.csv")


def read_chats(paths: list[Path]) -> list[list[dict]]:
    chats = []
    for path in paths:
        if not path.is_file():
            raise MissingInputError(f"sft data: no such file {path}")
        for i, record in enumerate(read_jsonl(path), 1):
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not any(m.get("role") == "assistant" for m in messages
                                                         if isinstance(m, dict)):
                raise InputError(f"{path}:{i}: expected {{\"messages\": [...]}} with at least one assistant turn")
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
        assistant_bytes += sum(len(m.get("content", "").encode()) + 1 for m in chat if m["role"] == "assistant")
    return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), assistant_bytes


def run(params, root: Path = Path("."), log=lambda metrics, step: None) -> dict:
    p, root = params.sft, Path(root)
    init = read_sidecar(root / INIT)
    tokenizer = load_tokenizer(root / INIT / TOKENIZER)
    train_files, val_files = [root / f for f in p.data], [root / f for f in p.val_data]
    chats = read_chats(train_files)
    train_ids, train_labels, _ = pack_chats(tokenizer, chats)
    val_ids, val_labels, val_bytes = pack_chats(tokenizer, read_chats(val_files))
    model, _ = load_model(root / INIT)
    data_hash = hash_paths([*train_files, *val_files, root / INIT])
    run_settings = {**p.model_dump(mode="json", exclude={"progress", "device"}), "data": data_hash}
    fingerprint = hashlib.sha256(json.dumps(run_settings, sort_keys=True).encode()).hexdigest()
    sidecar = {"tokenizer_sha256": init["tokenizer_sha256"], "data_sha256": data_hash, "stage": "sft",
               "init_step": init.get("step")}
    trainer = Trainer(model, p, train_ids, val_ids, run_dir=root / RUN, out_dir=root / OUT, sidecar=sidecar,
                      val_tokens_per_byte=int((val_labels != IGNORE).sum()) / max(val_bytes, 1), log=log,
                      csv_path=root / LOG, fingerprint=fingerprint, files={TOKENIZER: root / INIT / TOKENIZER},
                      train_labels=train_labels, val_labels=val_labels)
    metrics = trainer.fit()
    metrics.update(conversations=len(chats), trained_tokens_per_epoch=int((train_labels != IGNORE).sum()))
    return metrics
