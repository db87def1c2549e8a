"""Episodic memory: a SQLite store of surprising moments and a FAISS index over their contexts.

Write: when the model meets a token it predicted badly (surprise = -log p(token | context) above a
threshold that tracks the batch's top ``memory_write_fraction``), it stores the context's hidden
state as a key (FAISS, inner product of unit vectors) and the token that followed, the step and the
surrounding token span as metadata (SQLite). Beyond ``memory_capacity`` entries the oldest go.

Read: on tokens where the model is unsure (the entropy of its prediction feeds a learned access
score a_t), the context's top-k neighbours are fetched and their tokens' embeddings averaged by
similarity; a learned gate fuses the result into the hidden state, scaled by a_t. Reads are hard
(a_t > 1/2) but a_t multiplies what is read, so it learns from the language-model loss, and a
differentiable penalty, (mean a_t - budget)_+^2, keeps the share of reading tokens within budget.

A forward pass searches before it writes, so no token ever reads what its own sequence stored in
that pass: outputs at t depend on tokens <= t and on what earlier passes stored. Validation and
evaluation pass ``model.eval()``: they read but never write.

Concurrency: one writer. The process that owns the model writes; with ``model.memory_path`` the store
is a file that mirrors it, in WAL mode, so other processes (a notebook, a dashboard) can read it while
it trains. The file starts empty with the model (a new run, or one resuming, which then loads its
checkpoint's memory into it); a model loaded from a checkpoint (eval, generation, SFT's start) keeps
its memory in its own process and never opens that file. DataLoader workers never
touch the memory (the trainer draws batches in the main process). Under DDP each rank keeps its own.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hatchling.errors import InputError, MissingInputError

SPAN = 8              # tokens of context stored with each entry (metadata for inspection)
SIMILARITY_TEMPERATURE = 0.1
STORE_FILE, INDEX_FILE = "memory.sqlite", "memory.faiss"


class EpisodicStore:
    """Entries (id, step, token, surprise, span) in SQLite; their keys in a FAISS ID map.

    Ids grow by one per write and eviction removes the oldest, so the live ids are one contiguous
    range and a ring buffer maps an id to its token without a database query on the read path.
    """

    def __init__(self, dim: int, capacity: int, path: str | Path | None = None):
        self.dim, self.capacity = dim, capacity
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False)
        if path:
            self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY, step INTEGER, "
                        "token INTEGER, surprise REAL, span TEXT)")
        self.db.execute("DELETE FROM entries")          # a file mirrors this store, which starts empty
        self.db.commit()
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.tokens = np.full(capacity, -1, dtype=np.int64)
        self.next_id = 0
        self.evicted = 0

    def __deepcopy__(self, memo) -> EpisodicStore:
        """A private in-memory copy (e.g. RL's frozen reference policy): same entries, own files."""
        twin = EpisodicStore(self.dim, self.capacity)
        with self.lock:
            self.db.backup(twin.db)
            twin.index = faiss.clone_index(self.index)
            twin.tokens, twin.next_id, twin.evicted = self.tokens.copy(), self.next_id, self.evicted
        return twin

    def __len__(self) -> int:
        return self.index.ntotal

    def write(self, keys: np.ndarray, tokens: np.ndarray, surprise: np.ndarray, spans: list[str], step: int) -> None:
        """keys [N, dim] (unit vectors), tokens [N]: append, then evict the oldest beyond capacity."""
        if len(keys) == 0:
            return
        with self.lock:
            ids = np.arange(self.next_id, self.next_id + len(keys), dtype=np.int64)
            self.next_id += len(keys)
            self.db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?)",
                                zip(ids.tolist(), [step] * len(ids), tokens.tolist(), surprise.tolist(), spans,
                                    strict=True))
            self.index.add_with_ids(np.ascontiguousarray(keys, dtype=np.float32), ids)
            self.tokens[ids % self.capacity] = tokens
            self._evict()
            self.db.commit()

    def _evict(self) -> None:
        excess = self.index.ntotal - self.capacity
        if excess <= 0:
            return
        oldest = self.next_id - self.index.ntotal
        gone = np.arange(oldest, oldest + excess, dtype=np.int64)
        self.index.remove_ids(gone)
        self.db.execute("DELETE FROM entries WHERE id < ?", (int(gone[-1]) + 1,))
        self.evicted += excess

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities [N, k], tokens [N, k]); token -1 where fewer than k entries exist."""
        with self.lock:
            scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        tokens = np.where(ids >= 0, self.tokens[ids % self.capacity], -1)
        return scores, tokens

    def entries(self) -> list[tuple]:
        """All stored rows (id, step, token, surprise, span), oldest first."""
        return self.db.execute("SELECT id, step, token, surprise, span FROM entries ORDER BY id").fetchall()

    def save(self, directory: Path) -> None:
        """Write memory.sqlite and memory.faiss into `directory` (a checkpoint being written)."""
        with self.lock:
            target = sqlite3.connect(str(Path(directory) / STORE_FILE))
            self.db.backup(target)
            target.close()
            faiss.write_index(self.index, str(Path(directory) / INDEX_FILE))

    def load(self, directory: Path) -> None:
        """Replace the contents with a saved memory (read only: the checkpoint is left as it is); one clear
        error for a file that is missing, not what it should be, or disagreeing with the other."""
        directory = Path(directory)
        store, vectors = directory / STORE_FILE, directory / INDEX_FILE
        for path in (store, vectors):
            if not path.is_file():
                raise MissingInputError(f"no episodic memory file {path} (saved with every checkpoint of a model "
                                        "with use_episodic_memory)")
        source = sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True)
        try:
            try:
                rows = source.execute("SELECT id, token FROM entries ORDER BY id").fetchall()
            except sqlite3.DatabaseError as e:
                raise InputError(f"corrupted episodic memory {store}: {e}") from None
            try:
                index = faiss.read_index(str(vectors))
            except RuntimeError as e:
                raise InputError(f"corrupted episodic memory index {vectors}: "
                                 f"{str(e).strip().splitlines()[-1][:200]}") from None
            if index.ntotal != len(rows) or index.d != self.dim:
                raise InputError(f"episodic memory in {directory} is inconsistent: {len(rows)} rows, "
                                 f"{index.ntotal} vectors of dim {index.d} (expected dim {self.dim})")
            with self.lock:
                source.backup(self.db)
                self.index = index
                self.tokens[:] = -1
                if rows:
                    ids, tokens = np.array(rows, dtype=np.int64).T
                    self.tokens[ids % self.capacity] = tokens
                    self.next_id = int(ids[-1]) + 1
                else:
                    self.next_id = 0
        finally:
            source.close()


class EpisodicMemory(nn.Module):
    """Reads and writes the store around the top hidden state: h [B, T, d] -> h' [B, T, d]."""

    def __init__(self, d_model: int, capacity: int, topk: int, write_fraction: float, budget: float,
                 penalty: float, path: str | None = None):
        super().__init__()
        self.topk, self.write_fraction = topk, write_fraction
        self.budget, self.penalty = budget, penalty
        self.store = EpisodicStore(d_model, capacity, path)
        self.access = nn.Linear(d_model + 1, 1)        # [h, normalised entropy] -> access logit
        self.gate = nn.Linear(d_model, d_model)
        self.read_proj = nn.Linear(d_model, d_model, bias=False)
        nn.init.constant_(self.access.bias, 0.5)        # start reading (a ~ 0.62); the budget pulls it down
        # the write threshold in nats: the running top-write_fraction quantile of training surprise
        self.register_buffer("surprise_threshold", torch.tensor(math.inf))
        self.write_in_eval = False                     # let generation store its surprises too
        self.writes_paused = False                     # see paused_writes
        self.step = 0                                  # the trainer's step, recorded with each entry
        self.last_aux: dict[str, torch.Tensor] = {}
        self.last_stats: dict[str, float] = {}

    def forward(self, h: torch.Tensor, input_ids: torch.Tensor, logits: torch.Tensor, embedding: torch.Tensor,
                cache: dict | None = None) -> torch.Tensor:
        """h: top hidden states; logits: the predictions made from h before reading; embedding: the
        token embedding matrix (a recalled token is read as its current embedding)."""
        logp = logits.float().log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])               # [B, T] in [0, 1]
        a = torch.sigmoid(self.access(torch.cat([h, entropy[..., None].to(h.dtype)], -1))).squeeze(-1)
        reads = (a > 0.5) & (len(self.store) > 0)
        self.last_stats = {"memory_read_fraction": float(reads.float().mean()),
                           "memory_access_mean": float(a.detach().mean())}
        out = h + (self._read(h, reads, a, embedding) if bool(reads.any()) else self._idle(a))
        self.last_aux = {"memory_penalty": self.penalty * F.relu(a.mean() - self.budget) ** 2} if self.training else {}
        if (self.training or self.write_in_eval) and not self.writes_paused:
            self._write(h.detach(), input_ids, logp.detach(), cache)
        self.last_stats["memory_size"] = float(len(self.store))
        return out

    def _idle(self, a: torch.Tensor) -> torch.Tensor:
        """Nothing read (an empty store, no token asking): a zero that passes through the read path's
        parameters, so each step's graph holds every parameter, as DistributedDataParallel requires."""
        return 0.0 * (a.sum() + sum(p.sum() for p in (*self.gate.parameters(), *self.read_proj.parameters())))

    def _read(self, h: torch.Tensor, reads: torch.Tensor, a: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """The gated recall for the reading tokens, zero elsewhere: [B, T, d]."""
        hq = h[reads]                                                                     # [N, d]
        scores, tokens = self.store.search(F.normalize(hq.detach().float(), dim=-1).cpu().numpy(), self.topk)
        valid = torch.from_numpy(tokens >= 0).to(h.device)
        weights = torch.from_numpy(scores).to(h.device).float() / SIMILARITY_TEMPERATURE
        weights = weights.masked_fill(~valid, -math.inf).softmax(-1).nan_to_num(0.0)      # no hit: nothing read
        recalled = (weights[..., None] * embedding[torch.from_numpy(np.maximum(tokens, 0)).to(h.device)].float()).sum(1)
        gate = torch.sigmoid(self.gate(hq))
        self.last_stats["memory_gate_mean"] = float(gate.mean().detach())
        fused = gate * self.read_proj(recalled.to(h.dtype)) * a[reads][:, None]
        return h.new_zeros(h.shape).masked_scatter(reads[..., None].expand_as(h), fused)

    def _write(self, h: torch.Tensor, input_ids: torch.Tensor, logp: torch.Tensor, cache: dict | None) -> None:
        """Store (context state h_{t-1}, token x_t) where the surprise -log p(x_t) is above the threshold.
        With a cache, the last state of the previous call is the context of this call's first token."""
        ctx_h, ctx_logp, tokens = h[:, :-1], logp[:, :-1], input_ids[:, 1:]
        if cache is not None:
            if "memory_h" in cache:
                ctx_h = torch.cat([cache["memory_h"], h[:, :-1]], 1)
                ctx_logp, tokens = torch.cat([cache["memory_logp"], logp[:, :-1]], 1), input_ids
            cache["memory_h"], cache["memory_logp"] = h[:, -1:], logp[:, -1:]
        if tokens.shape[1] == 0:
            return
        surprise = -ctx_logp.gather(-1, tokens[..., None]).squeeze(-1)                     # [B, T']
        if self.training:
            batch_threshold = float(torch.quantile(surprise.flatten(), 1 - self.write_fraction))
            old = float(self.surprise_threshold)
            self.surprise_threshold.fill_(batch_threshold if math.isinf(old) else 0.9 * old + 0.1 * batch_threshold)
            threshold = batch_threshold
        else:
            threshold = float(self.surprise_threshold)
        b, t = (surprise >= threshold).nonzero(as_tuple=True)
        if len(b) == 0:
            return
        history = tokens.cpu().numpy()
        spans = [" ".join(map(str, history[i, max(0, j - SPAN + 1):j + 1]))
                 for i, j in zip(b.tolist(), t.tolist(), strict=True)]
        self.store.write(F.normalize(ctx_h[b, t].float(), dim=-1).cpu().numpy(), tokens[b, t].cpu().numpy(),
                         surprise[b, t].cpu().numpy(), spans, self.step)
        self.last_stats["memory_writes"] = float(len(b))


@contextlib.contextmanager
def paused_writes(model: nn.Module, paused: bool = True) -> Iterator[None]:
    """No episodic memory in `model` stores anything (nor moves its write threshold) inside the block.

    For passes that revisit text already stored: RL's second and later PPO epochs train on the very
    samples the first epoch wrote, and would otherwise store each episode once per epoch.
    """
    memories = [m for m in model.modules() if isinstance(m, EpisodicMemory)]
    before = [m.writes_paused for m in memories]
    for m in memories:
        m.writes_paused = paused
    try:
        yield
    finally:
        for m, was in zip(memories, before, strict=True):
            m.writes_paused = was
