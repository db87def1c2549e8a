"""Every alternative architecture flows through the stages after tokenize unchanged."""

from __future__ import annotations

import json

import pytest

from tests.conftest import copy_project, hatchling_cmd, run_cmd

ARCHS = {"bdh": ["model.bdh_neurons=32"], "hope": ["model.hope_hidden=16", "model.hope_chunk=8"]}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_stage_after_tokenize_runs(arch, tokenized_project, tmp_path):
    proj = copy_project(tokenized_project, tmp_path / arch)
    overrides = [x for kv in [f"model.arch={arch}", *ARCHS[arch]] for x in ("--set", kv)]
    for stage in ("pretrain", "sft", "rlvr", "eval", "export"):
        run_cmd(hatchling_cmd("run", stage, *overrides), proj)
    assert json.loads((proj / "checkpoints/rlvr/model.json").read_text())["model_config"]["arch"] == arch
    assert json.loads((proj / "reports/export.json").read_text())["int8_greedy_agreement"] >= 0.5
    if arch == "bdh":
        history = (proj / "logs/pretrain.csv").read_text().splitlines()
        assert history[0].endswith("active_fraction") and 0 < float(history[-1].rsplit(",", 1)[1]) < 1
