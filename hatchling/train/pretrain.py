"""Stage `pretrain`: next-token training of the hybrid LM on the tokenized corpus.

Writes the final model to checkpoints/pretrain (safetensors + sidecar) and keeps a resumable
training checkpoint in checkpoints/pretrain-run: a killed run started again with the same params
and data continues from there and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from hatchling.data.packed import load_split
from hatchling.io import hash_paths
from hatchling.model import build_model
from hatchling.train.checkpoint import TOKENIZER
from hatchling.train.loop import Trainer

DATA = Path("data/tokenized")
OUT = Path("checkpoints/pretrain")
RUN = Path("checkpoints/pretrain-run")
LOG = Path("logs/pretrain.csv")


def fresh_model(params, root: Path = Path(".")) -> tuple:
    """(model seeded for pretraining, sized to the tokenizer's vocabulary; the tokenized meta)."""
    meta = json.loads((Path(root) / DATA / "meta.json").read_text())
    torch.manual_seed(params.pretrain.seed)
    return build_model(params.model.model_copy(update={"vocab_size": meta["vocab_size"]})), meta


def run(params, root: Path = Path("."), log=lambda metrics, step: None) -> dict:
    root = Path(root)
    model, meta = fresh_model(params, root)
    model_cfg = model.config
    data_hash = hash_paths([root / DATA])
    # what makes this run *this* run: a checkpoint from any other run is never resumed
    run_settings = {**params.pretrain.model_dump(mode="json", exclude={"progress", "device"}),
                    "model": model_cfg.model_dump(mode="json"), "data": data_hash}
    fingerprint = hashlib.sha256(json.dumps(run_settings, sort_keys=True).encode()).hexdigest()
    sidecar = {"tokenizer_sha256": meta["tokenizer_sha256"], "data_sha256": data_hash, "stage": "pretrain"}
    trainer = Trainer(model, params.pretrain, load_split(root / DATA, "train"), load_split(root / DATA, "val"),
                      run_dir=root / RUN, out_dir=root / OUT, sidecar=sidecar,
                      val_tokens_per_byte=meta["val"]["tokens"] / meta["val"]["bytes"],
                      log=log, csv_path=root / LOG, fingerprint=fingerprint,
                      files={TOKENIZER: root / DATA / TOKENIZER})
    metrics = trainer.fit()
    metrics["num_params"] = model.num_params()
    return metrics
