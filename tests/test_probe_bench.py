"""The probe bench: its tasks' invariants, held-out items kept out of training, seeded results,
equal parameter counts across archs, and a model that learns from it."""

from __future__ import annotations

import json
import random

import pytest
import torch

from hatchling.cli import main
from hatchling.eval.probe_bench import (
    ALPHABET,
    MQAR_KEYS,
    MQAR_VALUES,
    chance,
    held_out,
    make_item,
    markdown,
    model_configs,
    no_recall,
    run_bench,
    train_and_score,
    training_items,
)
from hatchling.eval.probe_grid import ARCHS, ProbeBenchConfig
from hatchling.model import ModelConfig, build_model
from hatchling.model.sizing import count_params, matched

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (and the results are seeded per thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("length", [16, 32, 128, 512])
def test_mqar_answers_are_the_values_bound_to_the_queried_keys(length):
    pairs = length // 8
    for item in held_out("mqar", length, 8, seed=0):
        assert len(item.tokens) == length and item.tokens[2 * pairs] == ALPHABET.sep
        context = item.tokens[:2 * pairs]
        keys, values = context[0::2], context[1::2]
        assert len(set(keys)) == pairs and set(keys) <= set(MQAR_KEYS)     # distinct: every query has one answer
        assert set(values) <= set(MQAR_VALUES)
        bound = dict(zip(keys, values, strict=True))
        assert sorted(item.tokens[t - 1] for t in item.targets) == sorted(keys)     # each key asked once
        assert all(item.tokens[t] == bound[item.tokens[t - 1]] for t in item.targets)
        rest = set(range(2 * pairs, len(item.tokens))) - set(item.targets) - {t - 1 for t in item.targets}
        assert {item.tokens[i] for i in rest} == {ALPHABET.sep}             # the filler between queries


def test_palindrome_targets_are_the_reversal_and_stack_pops_are_lifo():
    rng = random.Random(0)
    for length in (64, 128):
        item = make_item("palindrome", rng, length)
        half = (length - 1) // 2
        assert item.tokens[half] == ALPHABET.sep and item.tokens[half + 1:] == item.tokens[:half][::-1]
        assert item.targets == list(range(half + 1, len(item.tokens)))
        item = make_item("stack", rng, length)
        assert len(item.tokens) <= length and item.targets
        held = []
        for i, tok in enumerate(item.tokens):
            if i in item.targets:
                assert tok == held.pop()
            elif tok != ALPHABET.pop:
                held.append(tok)
        assert not held                                     # everything pushed is popped by the end


def test_the_no_recall_baseline_is_the_commonest_values_share():
    item = make_item("mqar", random.Random(0), 32)                        # 4 pairs
    values = item.tokens[1:8:2]
    assert no_recall([item]) == max(values.count(v) for v in values) / 4
    assert 0.25 < no_recall(held_out("mqar", 32, 64, seed=0)) < 0.45 and no_recall(held_out("mqar", 512, 8, 0)) < 0.25


def test_training_never_sees_a_held_out_item():
    """Drawn from the same stream as the held-out items, training skips exactly those."""
    test = [make_item("mqar", random.Random(7), 64)] + [make_item("mqar", random.Random(8), 64)]
    exclude = {tuple(it.tokens) for it in test}
    stream = random.Random(7)
    skipped, expected = make_item("mqar", stream, 64), [make_item("mqar", stream, 64) for _ in range(3)]
    assert tuple(skipped.tokens) in exclude
    assert training_items("mqar", random.Random(7), 64, 3, exclude) == expected
    assert held_out("mqar", 64, 4, seed=1) == held_out("mqar", 64, 4, seed=1) != held_out("mqar", 64, 4, seed=2)


def test_the_default_hybrid_has_one_attention_layer_and_batches_hold_a_fixed_token_count():
    cfg = ProbeBenchConfig()
    assert ModelConfig(**model_configs(cfg)["hybrid"]).layer_kinds() == ["kda", "attn"]
    assert [cfg.batch(n) for n in (32, 128, 2048)] == [32, 8, 1]
    assert ProbeBenchConfig(batch_size=5).batch(128) == 5
    with pytest.raises(ValueError, match="lengths must be"):
        ProbeBenchConfig(lengths=[1024])                                  # more pairs than keys


def test_parameter_counts_match_across_archs():
    for reference in (model_configs(ProbeBenchConfig(archs=["hybrid"]))["hybrid"], {"size": "toddler"}):
        target = build_model(reference).num_params()
        assert count_params(reference) == target
        for arch in ARCHS:
            n = count_params(matched(arch, reference))
            assert abs(n - target) / target < 0.01, (arch, n, target)
    assert matched("gpt", {"size": "toddler"}, multiple=64)["mlp_hidden"] % 64 == 0


def test_same_seed_same_result_and_a_bad_config_fails():
    cfg = ProbeBenchConfig(archs=["hybrid", "gpt"], probes=["mqar", "stack"], lengths=[16], steps=3, batch_size=4,
                           d_model=32, eval_items=8)
    first, again = run_bench(cfg), run_bench(cfg)
    assert first["accuracy"] == again["accuracy"] and set(first["accuracy"]["stack"]) == {"hybrid", "gpt"}
    assert first["chance"] == {"mqar": 1 / 8, "stack": 1 / 128} and set(first["no_recall"]) == {"mqar"}
    with pytest.raises(ValueError, match="unknown archs"):
        ProbeBenchConfig(archs=["rnn"])


@pytest.mark.parametrize("arch", ["gpt", "hybrid"])
def test_the_default_recipe_recalls_on_the_short_mqar(arch):
    """The pipeline's bench is a measurement only if this holds: ~10 s of training takes gpt and the
    hybrid past both chance (1/8) and the no-recall baseline (the context's commonest value) at 32 tokens."""
    cfg = ProbeBenchConfig(archs=[arch], lengths=[32])
    baseline = no_recall(held_out("mqar", 32, cfg.eval_items, cfg.seed))
    accuracy = train_and_score(model_configs(cfg)[arch], "mqar", 32, cfg, CPU)
    assert accuracy > max(4 * chance("mqar"), baseline + 0.1), (accuracy, baseline)   # gpt 0.703, hybrid 0.574: 0.391


def test_the_cli_writes_the_result_table_and_plot(tmp_path, capsys):
    out, png = tmp_path / "probes.json", tmp_path / "probes.png"
    assert main(["bench", "probes", "--archs", "gpt", "--probes", "palindrome", "--lengths", "16", "32",
                 "--steps", "2", "--batch-size", "4", "--out", str(out), "--plot", str(png)]) == 0
    result = json.loads(out.read_text())
    assert set(result["accuracy"]["palindrome"]["gpt"]) == {"16", "32"} and result["steps"] == 2
    assert markdown(result)[2].startswith("| palindrome | 16 | 0.008 | – |")
    assert "| palindrome | 32 |" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "probes", "--lengths", "8", "--out", str(out)]) == 2          # too short: one line


@pytest.mark.parametrize("args, why", [
    (["--device", "gpu"], "argument --device: invalid choice: 'gpu' (choose from 'auto', 'cpu', 'cuda')"),
    (["--threads", "-1"], "argument --threads: -1 is not in [1, inf]"),
    (["--lengths", "16", "x"], "argument --lengths: invalid int value: 'x'"),
    (["--steps", "0"], "bench probes: --steps: Input should be greater than or equal to 1"),
])
def test_bad_bench_arguments_are_one_line_naming_the_option(args, why, tmp_path, capsys):
    """argparse's own line after the usage, or the params' one line; no traceback, nothing written."""
    if why.startswith("argument"):
        with pytest.raises(SystemExit):
            main(["bench", "probes", *args, "--out", str(tmp_path / "p.json")])
        assert capsys.readouterr().err.splitlines()[-1] == f"hatchling bench probes: error: {why}"
    else:
        assert main(["bench", "probes", *args, "--out", str(tmp_path / "p.json")]) == 2
        assert capsys.readouterr().err == f"error: {why}\n"
    assert not (tmp_path / "p.json").exists()


def test_with_the_bench_off_the_figure_says_so_and_the_card_does_not_link_it(tmp_path):
    from hatchling.eval.probe_bench import plot
    from hatchling.eval.report import markdown as card

    png = tmp_path / "probes.png"
    plot({}, png)                          # the eval stage writes its declared figure whatever eval.probe_bench says
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = {"checkpoints": ["pretrain"], "rows": [], "not_run": {}, "probe_bench": {}}
    assert "eval_probes.png" not in card(report) and "## Probe bench" not in card(report)
