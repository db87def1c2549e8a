"""One device for the run: every stage that runs a model puts it, and its inputs, on the device its
params name (`run.device`, or the stage's own `device`).

These machines have only a CPU, so a stage that ignored the setting would run on the CPU unnoticed.
The tests therefore give each stage `cuda` and have the one device helper the stage resolves it
with answer torch's "meta" device: the stage's model must land there, and its first forward pass
(recorded and stopped: a meta tensor holds no numbers to go on with) must get inputs there too. A
stage that loads on the CPU, or builds its inputs there, fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import random
import shutil

import numpy as np
import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from hatchling.config import validate_params
from hatchling.errors import ConfigError
from hatchling.eval.continual import Memorizer, forgetting
from hatchling.eval.harness import Evaluator
from hatchling.eval.probes import Alphabet, palindrome, probe_accuracy
from hatchling.eval.scoring import loglikelihoods
from hatchling.model import build_model
from hatchling.model.base import LanguageModel
from hatchling.model.device import autocast, resolve_device
from hatchling.stages import context
from hatchling.tasks.math import Math
from hatchling.train.rl import KLController, RLConfig, rl_step
from tests.conftest import TINY_PARAMS, copy_project
from tests.test_eval import CharTokenizer, cfg

META = torch.device("meta")


class FirstForward(Exception):
    """Raised at a model's first forward pass, once its devices are recorded."""


@pytest.fixture
def first_forward():
    """{"weights": device, "inputs": {devices}} of the first forward pass of any LanguageModel,
    which it stops with FirstForward."""
    seen: dict = {}

    def hook(module, args):
        if isinstance(module, LanguageModel):
            seen["weights"] = next(module.parameters()).device
            seen["inputs"] = {a.device for a in args if isinstance(a, torch.Tensor)}
            raise FirstForward

    handle = register_module_forward_pre_hook(hook)
    yield seen
    handle.remove()


def cuda_is_meta(monkeypatch, module: str) -> None:
    """`module` resolves the device name `cuda` (and only that) to the meta device."""
    def resolve(name):
        assert name == "cuda", f"{module} resolved {name!r}, not the device its params name"
        return META

    monkeypatch.setattr(importlib.import_module(module), "resolve_device", resolve)


def params_on_cuda():
    return validate_params({**copy.deepcopy(TINY_PARAMS), "run": {**TINY_PARAMS["run"], "device": "cuda"}})


def tiny_model():
    return build_model({"size": "toddler", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2,
                        "head_dim": 16, "n_kv_heads": 1, "mlp_hidden": 64, "chunk_size": 16})


# -- the helper --------------------------------------------------------------------------------------

def test_auto_is_cuda_when_available_and_autocast_is_bf16_on_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"device 'cuda': torch .* sees no CUDA device on this machine \(use auto"):
        resolve_device("cuda")                  # torch's own: an AssertionError deep in the first copy
    assert isinstance(autocast(torch.device("cpu")), contextlib.nullcontext)
    with pytest.warns(UserWarning, match="CUDA is not available"):      # built here, it cannot switch on
        on_cuda = autocast(torch.device("cuda"))
    assert isinstance(on_cuda, torch.autocast) and on_cuda.device == "cuda" and on_cuda.fast_dtype == torch.bfloat16


def test_rlvr_and_eval_sections_inherit_the_run_device_and_may_override_it():
    params = params_on_cuda()
    assert params.rlvr.device == params.eval.device == params.pretrain.device == params.sft.device == "cuda"
    own = validate_params({**copy.deepcopy(TINY_PARAMS), "eval": {**TINY_PARAMS["eval"], "device": "cpu"}})
    assert own.eval.device == "cpu" and own.rlvr.device == TINY_PARAMS["run"]["device"]


# -- each stage that runs a model ------------------------------------------------------------------------

@pytest.mark.parametrize("stage, module, resolver", [
    ("pretrain", "hatchling.train.pretrain", "hatchling.train.loop"),     # the trainer resolves for both
    ("sft", "hatchling.train.sft", "hatchling.train.loop"),
    ("rlvr", "hatchling.train.rlvr", "hatchling.train.rlvr"),
    ("eval", "hatchling.eval.stage", "hatchling.eval.stage")])
def test_each_stage_runs_its_model_on_the_run_device(stage, module, resolver, pretrained_project, tmp_path,
                                                     monkeypatch, first_forward):
    proj = copy_project(pretrained_project, tmp_path / "proj")          # the stages may start writing
    shutil.rmtree(proj / f"checkpoints/{stage}-run", ignore_errors=True)  # a trainer starts afresh, not resumes
    cuda_is_meta(monkeypatch, resolver)
    with pytest.raises(FirstForward):
        importlib.import_module(module).run(context(stage, params_on_cuda(), proj))
    assert first_forward == {"weights": META, "inputs": {META}}


def test_generate_and_chat_run_on_their_device_option(pretrained_project, monkeypatch, first_forward):
    from hatchling.cli import main
    from hatchling.inference import chat_cli, generate_cli

    cuda_is_meta(monkeypatch, "hatchling.inference")
    checkpoint = str(pretrained_project / "checkpoints/sft")
    common = dict(checkpoint=checkpoint, max_new_tokens=4, temperature=0.0, top_k=None, top_p=None, seed=None,
                  compute="fp32", device="cuda")
    with pytest.raises(FirstForward):
        generate_cli(argparse.Namespace(prompt="def f(", compile=False, **common))
    assert first_forward == {"weights": META, "inputs": {META}}
    first_forward.clear()
    with pytest.raises(FirstForward):
        chat_cli(argparse.Namespace(system="", **common), read=lambda prompt: "hello")
    assert first_forward == {"weights": META, "inputs": {META}}
    with pytest.raises(SystemExit):             # the option exists and takes only the run's device names
        main(["chat", "--checkpoint", checkpoint, "--device", "tpu"])


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--max-new-tokens", "-3"], "argument --max-new-tokens: -3 is not in [0, inf]"),
    (["generate", "--prompt", "x", "--temperature", "nan"], "argument --temperature: nan is not in [0, inf]"),
    (["chat", "--top-p", "0"], "argument --top-p: 0 is not in (0, 1]"),
    (["chat", "--top-k", "many"], "argument --top-k: 'many' is not a whole number"),
    (["gridworld", "--iterations", "0"], "argument --iterations: 0 is not in [1, inf]"),
    (["gridworld", "--size", "1"], "argument --size: 1 is not in [2, inf]"),
])
def test_bad_decoding_and_gridworld_options_are_one_line_before_any_work(argv, message, tmp_path, capsys):
    """They were tracebacks from inside the sampler (and --iterations 0 emptied the previous CSV first)."""
    from hatchling.cli import main

    out = tmp_path / "g.csv"
    out.write_text("kept\n")
    extra = ["--out", str(out)] if argv[0] == "gridworld" else ["--checkpoint", str(tmp_path / "none")]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, *extra])
    assert exit_.value.code == 2 and message in capsys.readouterr().err and out.read_text() == "kept\n"


# -- what the stages call, on the device they are handed ---------------------------------------------------

def _scoring(model, device):
    loglikelihoods(model, lambda text: [ord(c) % 64 for c in text], [("Q:", " x")], 64, device=device)


def _generation(model, device):
    Evaluator(model, CharTokenizer(), cfg(), device=device).answer(Math(), {"question": "1 + 1?"}, 4)


def _probes(model, device):
    probe_accuracy(model, [palindrome(random.Random(0), Alphabet(list(range(2, 34)), 0, 1), 4)], device=device)


def _memorization(model, device):
    Memorizer(model, 1, 0.1, device=device)([5, 6, 7])


def _forgetting(model, device):
    forgetting(model, np.arange(400) % 60, 2, 1, 0.1, 2, 16, device=device)


def _rl_sampling(model, device):
    rl_step(model, copy.deepcopy(model), torch.optim.SGD(model.parameters(), lr=0.0), [[1, 2, 3]], lambda i, c: 0.0,
            RLConfig(2, 3, 1.0, 0.2, 2.0, 1), KLController(0.05, 0.1, 10), [0], torch.Generator(), device=device)


@pytest.mark.parametrize("call", [_scoring, _generation, _probes, _memorization, _forgetting, _rl_sampling])
def test_eval_and_rl_put_their_inputs_on_the_device_they_are_given(call, first_forward):
    with pytest.raises(FirstForward):
        call(tiny_model().to(META), META)
    assert first_forward == {"weights": META, "inputs": {META}}
