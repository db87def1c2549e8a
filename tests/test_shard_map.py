"""The local process map: results in input order, equal to a plain map, with nothing left behind;
a failure reaches the caller as itself, with the worker's traceback."""

import os
import signal
import tempfile
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest

from hatchling.data.shard_map import WorkerError, map_ordered


def big_result(n: int) -> dict:
    """Several MB per item: more than a pipe holds, as dedup's shard signatures are."""
    rng = np.random.default_rng(n)
    return {"n": n, "values": rng.integers(0, 2**32, size=600_000 + n, dtype=np.uint64).astype(np.uint32),
            "ids": [f"doc{n}-{i}" for i in range(1000)]}


def fails_on_three(n: int) -> int:
    if n == 3:
        raise ValueError(f"item {n} is bad")
    return n


def fails_unpicklably(n: int) -> int:
    if n == 2:
        class PanicException(Exception):    # like pyo3's (tokenizers): its class cannot be imported, nor pickled
            pass

        raise PanicException("the tokenizer panicked on shard-00002.jsonl")
    return n


def dies_on_two(n: int) -> int:
    if n == 2:
        os.kill(os.getpid(), signal.SIGKILL)     # as the out-of-memory killer would
    return n


def test_process_map_equals_plain_map_and_removes_its_spool(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    items = list(range(7))
    got = list(map_ordered(big_result, items, workers=2))
    want = [big_result(n) for n in items]
    assert [g["n"] for g in got] == items
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g["values"], w["values"]) and g["ids"] == w["ids"]
    assert list(tmp_path.iterdir()) == []                    # every spooled result read and deleted


def test_a_failing_item_raises_its_error_and_leaves_no_spool(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    results = []
    with pytest.raises(ValueError, match="item 3 is bad") as failure:
        for r in map_ordered(fails_on_three, range(6), workers=2):
            results.append(r)
    assert results == [0, 1, 2]                              # in order, up to the failing item
    assert 'in fails_on_three\n    raise ValueError(f"item {n} is bad")' in str(failure.value.__cause__)
    assert list(tmp_path.iterdir()) == []


def test_an_error_that_cannot_cross_processes_arrives_as_text():
    with pytest.raises(WorkerError) as failure:
        list(map_ordered(fails_unpicklably, range(4), workers=2))
    summary, traceback_text = str(failure.value).split("\n", 1)
    assert summary.endswith("fails_unpicklably.<locals>.PanicException: the tokenizer panicked on shard-00002.jsonl")
    assert 'in fails_unpicklably\n    raise PanicException("the tokenizer panicked on shard-00002.jsonl")' \
        in traceback_text


def test_a_worker_that_dies_fails_the_map_instead_of_hanging_it():
    with pytest.raises(BrokenProcessPool, match="terminated abruptly"):
        list(map_ordered(dies_on_two, range(4), workers=2))


def test_an_abandoned_map_leaves_no_spool(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    results = map_ordered(big_result, range(6), workers=2)
    assert next(results)["n"] == 0
    results.close()                                          # the consumer stops early
    assert list(tmp_path.iterdir()) == []


def sigterm_handler(n: int) -> str:
    return repr(signal.getsignal(signal.SIGTERM))


def test_workers_do_not_inherit_the_parents_sigterm_handler():
    """Prefect's flow process turns SIGTERM into a TerminationSignal exception; a forked worker that
    kept that handler printed its traceback when the pool shut it down."""
    class TerminationSignal(Exception):
        pass

    def raise_termination(signum, frame):
        raise TerminationSignal

    previous = signal.signal(signal.SIGTERM, raise_termination)
    try:
        handlers = set(map_ordered(sigterm_handler, range(4), 2))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert handlers == {repr(signal.SIG_DFL)}
