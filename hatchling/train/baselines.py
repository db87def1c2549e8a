"""What pretraining is measured against: n-gram models of the same tokens, fitted on the training
split and scored on the validation split, in nats per token (bits per byte via tokens_per_byte).

Add-k smoothing (Lidstone): p(b | a) = (count(a, b) + k) / (count(a) + k V). k is chosen on the last
tenth of the training split, with counts from the rest, then the counts are taken on all of it: the
validation split never picks a setting.
"""

from __future__ import annotations

import numpy as np

K_GRID = (1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int, k: float = 1.0) -> float:
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    return float(-np.log((counts[val] + k) / (len(train) + k * vocab_size)).mean())


def bigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int, k: float) -> float:
    """Mean -log p(val[t] | val[t-1]) over t >= 1, add-k smoothed bigram counts of `train`."""
    pairs = train[:-1].astype(np.int64) * vocab_size + train[1:]
    keys, counts = np.unique(pairs, return_counts=True)           # sparse: V^2 may be too big to hold
    context = np.bincount(train[:-1], minlength=vocab_size).astype(np.float64)
    query = val[:-1].astype(np.int64) * vocab_size + val[1:]
    at = np.searchsorted(keys, query).clip(max=len(keys) - 1)
    seen = np.where(keys[at] == query, counts[at], 0)
    return float(-np.log((seen + k) / (context[val[:-1]] + k * vocab_size)).mean())


def ngram_baselines(train: np.ndarray, val: np.ndarray, vocab_size: int) -> dict:
    """{unigram_loss, bigram_loss, bigram_k}: add-k unigram (k = 1) and bigram (k tuned on the
    training split's tail) of `train`, scored on `val`."""
    train, val = np.asarray(train, dtype=np.int64), np.asarray(val, dtype=np.int64)
    cut = len(train) * 9 // 10
    k = min(K_GRID, key=lambda k: bigram_loss(train[:cut], train[cut:], vocab_size, k))
    return {"unigram_loss": unigram_loss(train, val, vocab_size), "bigram_loss": bigram_loss(train, val, vocab_size, k),
            "bigram_k": k}
