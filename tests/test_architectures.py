"""Every alternative architecture flows through the stages after tokenize unchanged."""

from __future__ import annotations

import json

import pytest

from hatchling.model.config import ARCH_FIELDS, for_arch
from tests.conftest import TINY_PARAMS, copy_project, hatchling_here, write_params

# neither keeps packed conversations apart (LanguageModel.packing_unsupported): SFT lets them run together
ARCHS = {"bdh": ["model.bdh.neurons=32", "sft.isolate_documents=false"],
         "hope": ["model.hope.hidden=16", "model.hope.chunk=8", "sft.isolate_documents=false"]}
EVAL_LAST = ["eval.checkpoints=[rlvr]"]           # eval is arch-agnostic: one column is enough here


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_stage_after_tokenize_runs(arch, tokenized_project, tmp_path):
    proj = copy_project(tokenized_project, tmp_path / arch)
    # the test size without the fields this arch does not read (head_dim 16, chunk_size 16, ...: errors if set)
    model = {k: v for k, v in TINY_PARAMS["model"].items() if k in ARCH_FIELDS[arch]}
    write_params(proj, {**TINY_PARAMS, "model": model})
    overrides = [x for kv in [f"model.arch={arch}", *ARCHS[arch], *EVAL_LAST] for x in ("--set", kv)]
    for stage in ("pretrain", "sft", "rlvr", "eval", "export"):
        assert hatchling_here(proj, "run", stage, *overrides) == 0, stage
    assert json.loads((proj / "checkpoints/rlvr/model.json").read_text())["model_config"]["arch"] == arch
    export = json.loads((proj / "reports/export.json").read_text())
    assert export["int8_greedy_agreement"] >= 0.5 and export["int8_size_ratio"] < 0.4      # raw matrices too
    if arch == "bdh":
        history = (proj / "logs/pretrain.csv").read_text().splitlines()
        assert history[0].endswith("active_fraction") and 0 < float(history[-1].rsplit(",", 1)[1]) < 1


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_int8_covers_raw_parameter_matrices_per_output_channel(arch):
    """BDH and HOPE multiply by raw matrices (x @ W): they are quantized per last-dim channel, within
    half a step of the float weights, and the dequantized model's logits stay close."""
    import torch

    from hatchling.model import build_model
    from hatchling.model.int8 import dequantize_state_dict, quantize_state_dict, quantized_names
    from tests.test_kda_ops import rel_err

    torch.manual_seed(0)
    options = {"bdh": {"neurons": 32}, "hope": {"hidden": 16, "chunk": 8}}
    cfg = for_arch(arch, {"vocab_size": 97, "d_model": 32, "n_layers": 2, "n_heads": 2, "head_dim": 16,
                          arch: options[arch]})
    model = build_model(cfg).eval()
    raw = {n for n, last in quantized_names(model).items() if last}
    assert raw == ({"layers.0.encoder", "layers.0.encoder_v", "layers.0.decoder", "layers.1.encoder",
                    "layers.1.encoder_v", "layers.1.decoder", "lm_head"} if arch == "bdh"
                   else {n for n, _ in model.named_parameters() if n.endswith((".w1", ".w2"))})
    sd = quantize_state_dict(model)
    params = dict(model.named_parameters())
    for name in raw:
        w, q, scale = params[name].detach(), sd[f"{name}.int8"], sd[f"{name}.scale"]
        assert q.dtype == torch.int8 and scale.shape == (1,) * (w.dim() - 1) + (w.shape[-1],)
        assert bool(((q.float() * scale - w).abs() <= scale / 2 + 1e-7).all())
    fp32 = {k: v.float() for k, v in sd.items() if not k.endswith((".int8", ".scale"))}
    assert not any(name in fp32 for name in raw)
    again = build_model(cfg).eval()
    again.load_state_dict(dequantize_state_dict(sd))
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        assert rel_err(again(ids), model(ids)) < 0.02
