"""Stage `pretrain`: next-token training of the hybrid LM on the tokenized corpus.

Writes the final model to checkpoints/pretrain (safetensors + sidecar) and keeps a resumable
training checkpoint in checkpoints/pretrain-run: a killed run started again with the same params
and data continues from there and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json

import torch

from hatchling.data.packed import load_split
from hatchling.data.tokenizer import TOKENIZER
from hatchling.io import hash_paths
from hatchling.model import build_model
from hatchling.model.lm import tokens_per_byte
from hatchling.train.loop import Trainer, run_fingerprint


def fresh_model(ctx) -> tuple:
    """(model seeded for pretraining, sized to the tokenizer's vocabulary; the tokenized meta)."""
    meta = json.loads((ctx.inputs.tokenized / "meta.json").read_text())
    torch.manual_seed(ctx.params.pretrain.seed)
    return build_model(ctx.params.model.model_copy(update={"vocab_size": meta["vocab_size"]})), meta


def run(ctx) -> dict:
    p, data = ctx.params.pretrain, ctx.inputs.tokenized
    model, meta = fresh_model(ctx)
    model_cfg = model.config
    data_hash = hash_paths([data], ctx.root)
    fingerprint = run_fingerprint(p, model=model_cfg.model_dump(mode="json"), data=data_hash)
    sidecar = {"tokenizer_sha256": meta["tokenizer_sha256"], "data_sha256": data_hash, "stage": "pretrain"}
    trainer = Trainer(model, p, load_split(data, "train"), load_split(data, "val"),
                      run_dir=ctx.outputs.run, out_dir=ctx.outputs.model, sidecar=sidecar,
                      val_tokens_per_byte=tokens_per_byte(meta["val"]["tokens"], meta["val"]["bytes"]),
                      log=ctx.log, csv_path=ctx.outputs.log, eval_csv_path=ctx.outputs.eval_log,
                      fingerprint=fingerprint,
                      files={TOKENIZER: data / TOKENIZER}, eot_id=meta["eot_id"])
    metrics = trainer.fit()
    metrics["num_params"] = model.num_params()
    return metrics
