"""Stage `pretrain`: next-token training of the hybrid LM on the tokenized corpus.

Writes the final model to checkpoints/pretrain (safetensors + sidecar) and keeps a resumable
training checkpoint in checkpoints/pretrain-run: a killed run started again with the same params
and data continues from there and ends with the same weights as an uninterrupted one.

What it learned is measured on the whole validation split against baselines on the same tokens: the
model at step 0 (its initialisation), a unigram and an add-k bigram model of the training split
(hatchling/train/baselines.py), each in bits per byte.
"""

from __future__ import annotations

import torch

from hatchling.data.packed import load_split, read_meta
from hatchling.data.tokenizer import TOKENIZER
from hatchling.io import hash_paths
from hatchling.model import build_model
from hatchling.model.lm import bits_per_byte, split_loss, tokens_per_byte
from hatchling.train.baselines import ngram_baselines
from hatchling.train.loop import Trainer, run_fingerprint


def fresh_model(ctx) -> tuple:
    """(model seeded for pretraining, sized to the tokenizer's vocabulary; the tokenized meta)."""
    meta = read_meta(ctx.inputs.tokenized)
    torch.manual_seed(ctx.params.pretrain.seed)
    return build_model(ctx.params.model.model_copy(update={"vocab_size": meta["vocab_size"]})), meta


def run(ctx) -> dict:
    p, data = ctx.params.pretrain, ctx.inputs.tokenized
    model, meta = fresh_model(ctx)
    model_cfg = model.config
    data_hash = hash_paths([data], ctx.root)
    fingerprint = run_fingerprint(p, code=ctx.code, model=model_cfg.model_dump(mode="json"), data=data_hash)
    sidecar = {"tokenizer_sha256": meta["tokenizer_sha256"], "data_sha256": data_hash, "stage": "pretrain"}
    trainer = Trainer(model, p, load_split(data, "train"), load_split(data, "val"),
                      run_dir=ctx.outputs.run, out_dir=ctx.outputs.model, sidecar=sidecar,
                      val_tokens_per_byte=tokens_per_byte(meta["val"]["tokens"], meta["val"]["bytes"]),
                      log=ctx.log, csv_path=ctx.outputs.log, eval_csv_path=ctx.outputs.eval_log,
                      fingerprint=fingerprint,
                      files={TOKENIZER: data / TOKENIZER}, eot_id=meta["eot_id"])
    metrics = trainer.fit()
    metrics["num_params"] = model.num_params()
    return metrics | baselines(ctx, model, meta)


def baselines(ctx, model, meta: dict) -> dict:
    """The trained model, the model at step 0 and the n-gram baselines on the whole validation split,
    in bits per byte (the model's windows are sequence-length long and start without context)."""
    p, data = ctx.params.pretrain, ctx.inputs.tokenized
    train, val = load_split(data, "train"), load_split(data, "val")
    per_byte = tokens_per_byte(meta["val"]["tokens"], meta["val"]["bytes"])
    device = next(model.parameters()).device
    eot = meta["eot_id"] if p.isolate_documents else None        # as the trainer's validation reads it

    def bpb(m) -> float:
        return round(bits_per_byte(split_loss(m, val, p.seq_len, p.batch_size, device, eot_id=eot), per_byte), 5)

    ngram = ngram_baselines(train, val, meta["vocab_size"])
    return {"full_val_bpb": bpb(model), "step0_val_bpb": bpb(fresh_model(ctx)[0].to(device)),
            "unigram_val_bpb": round(bits_per_byte(ngram["unigram_loss"], per_byte), 5),
            "bigram_val_bpb": round(bits_per_byte(ngram["bigram_loss"], per_byte), 5),
            "bigram_add_k": ngram["bigram_k"]}
