"""What pretraining is measured against: n-gram baselines and the whole-split loss, each compared
with a direct computation; and the pretrain report's baselines on the tiny project."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hatchling.data.packed import load_split
from hatchling.model import build_model
from hatchling.model.lm import (
    IGNORE,
    bits_per_byte,
    loss_sum,
    sample_batch,
    split_loss,
    tokens_per_byte,
    validation_loss,
)
from hatchling.train.baselines import bigram_loss, ngram_baselines, unigram_loss


def dense_bigram_loss(train, val, vocab, k):
    counts = np.zeros((vocab, vocab))
    for a, b in zip(train[:-1], train[1:], strict=True):
        counts[a, b] += 1
    probs = (counts + k) / (counts.sum(1, keepdims=True) + k * vocab)
    return -np.mean([math.log(probs[a, b]) for a, b in zip(val[:-1], val[1:], strict=True)])


def markov_chain(n, vocab, seed):
    """Tokens where each one mostly picks from two successors of its predecessor (one table; `seed`
    draws the walk)."""
    successors = np.random.default_rng(0).integers(0, vocab, (vocab, 2))
    rng = np.random.default_rng(seed)
    out = [0]
    for _ in range(n - 1):
        out.append(int(successors[out[-1], rng.integers(0, 2)]) if rng.random() < 0.9 else int(rng.integers(vocab)))
    return np.asarray(out)


def test_bigram_matches_dense_counts_and_beats_unigram_on_a_markov_chain():
    train, val = markov_chain(5000, 17, 0), markov_chain(800, 17, 1)
    for k in (0.01, 1.0):
        assert bigram_loss(train, val, 17, k) == pytest.approx(dense_bigram_loss(train, val, 17, k), rel=1e-12)
    counts = np.bincount(train, minlength=17)
    assert unigram_loss(train, val, 17, 1.0) == pytest.approx(-np.mean(np.log((counts[val] + 1) / (5000 + 17))))
    base = ngram_baselines(train, val, 17)
    assert base["bigram_loss"] < base["unigram_loss"] - 0.5


def test_the_bigram_k_is_chosen_on_training_text_only():
    train = markov_chain(5000, 17, 0)
    picks = {ngram_baselines(train, markov_chain(500, 17, seed), 17)["bigram_k"] for seed in (1, 2, 3)}
    assert len(picks) == 1


def test_split_loss_covers_every_token_once():
    """The whole-split loss equals the token-weighted mean of each window's loss taken on its own."""
    torch.manual_seed(0)
    model = build_model({"size": "toddler", "vocab_size": 50, "d_model": 32, "n_layers": 2, "n_heads": 2,
                         "head_dim": 16, "mlp_hidden": 64, "chunk_size": 8}).eval()
    data = np.random.default_rng(0).integers(1, 50, 203)
    total = count = 0.0
    for start in range(0, 202, 16):
        w = torch.from_numpy(data[start:start + 17]).long()[None]
        with torch.no_grad():
            s, n = loss_sum(model, w[:, :-1], w[:, 1:])
        total, count = total + float(s), count + int(n)
    assert count == 202
    assert split_loss(model, data, 16, 5) == pytest.approx(total / count, rel=1e-5)


def test_validation_loss_weighs_every_trained_target_alike():
    """SFT's labels leave most windows without a target: such a window adds nothing (it used to add a loss of 0
    to a mean of per-window means, pulling val_loss, and the early stop on it, down)."""
    torch.manual_seed(0)
    model = build_model({"size": "toddler", "vocab_size": 50, "d_model": 32, "n_layers": 2, "n_heads": 2,
                         "head_dim": 16, "mlp_hidden": 64, "chunk_size": 8}).eval()
    data = np.random.default_rng(0).integers(1, 50, 400)
    labels = np.full(400, IGNORE)
    for start in range(0, 400, 100):                   # trained targets in blocks of 40, gaps of 60
        labels[start:start + 40] = data[start:start + 40]
    total, counts = 0.0, []
    for i in range(20):
        x, y = sample_batch(data, 1, 16, 10**9 + i, "cpu", labels)
        with torch.no_grad():
            s, n = loss_sum(model, x, y)
        total, counts = total + float(s), counts + [int(n)]
    assert min(counts) == 0 and max(counts) > 0        # some windows hold targets, some none
    assert validation_loss(model, data, 20, 1, 16, labels=labels) == pytest.approx(total / sum(counts), rel=1e-6)


def test_pretrain_reports_its_baselines(pretrained_project):
    """The report's baselines are the n-gram models of the project's own token files, in bits per byte."""
    report = json.loads((pretrained_project / "reports/pretrain.json").read_text())
    data = pretrained_project / "data/tokenized"
    meta = json.loads((data / "meta.json").read_text())
    base = ngram_baselines(load_split(data, "train"), load_split(data, "val"), meta["vocab_size"])
    per_byte = tokens_per_byte(meta["val"]["tokens"], meta["val"]["bytes"])
    assert report["bigram_val_bpb"] == pytest.approx(bits_per_byte(base["bigram_loss"], per_byte), abs=1e-5)
    assert report["unigram_val_bpb"] == pytest.approx(bits_per_byte(base["unigram_loss"], per_byte), abs=1e-5)
    assert report["bigram_add_k"] == base["bigram_k"]
    assert report["step0_val_bpb"] > report["full_val_bpb"]      # six steps already beat the initialisation
