"""One loader for every checkpoint: fp32 (training), bf16 and int8 (exports) load back, for every
architecture, into models whose logits are those of the stored weights."""

import json

import pytest
import torch

from hatchling.checkpoint import SIDECAR, load_model, save_model
from hatchling.errors import InputError
from hatchling.model import build_model
from hatchling.model.int8 import Int8Linear, dequantize_state_dict, quantize_state_dict
from tests.test_kda_ops import rel_err

V = 67
ARCHS = {"hybrid": {"head_dim": 16, "mlp_hidden": 64, "attn_every": 2, "chunk_size": 8},
         "bdh": {"bdh": {"neurons": 32}}, "hope": {"head_dim": 16, "hope": {"hidden": 16, "chunk": 4}}}


def config(arch: str) -> dict:
    return {"arch": arch, "vocab_size": V, "d_model": 32, "n_layers": 2, "n_heads": 2, **ARCHS[arch]}


def logits_with(cfg: dict, state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    model = build_model(cfg).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(ids)


def logits_of(directory, ids: torch.Tensor, **kw) -> torch.Tensor:
    model, _ = load_model(directory, **kw)
    with torch.no_grad():
        return model.eval()(ids)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_format_loads_back_with_the_logits_of_its_stored_weights(arch, tmp_path):
    torch.manual_seed(0)
    cfg = config(arch)
    model = build_model(cfg).eval()
    ids = torch.randint(0, V, (2, 19))

    save_model(model, tmp_path / "fp32", {"step": 3})
    _, meta = load_model(tmp_path / "fp32")
    assert meta["format"] == "fp32" and meta["step"] == 3 and meta["model_config"]["arch"] == arch
    assert torch.equal(logits_of(tmp_path / "fp32", ids), logits_with(cfg, model.state_dict(), ids))

    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_model(model, tmp_path / "bf16", {"format": "bf16"}, weights=bf16)
    rounded = {k: v.float() for k, v in bf16.items()}
    assert torch.equal(logits_of(tmp_path / "bf16", ids), logits_with(cfg, rounded, ids))

    int8 = quantize_state_dict(model)
    save_model(model, tmp_path / "int8", {"format": "int8"}, weights=int8)
    dequantized = logits_with(cfg, dequantize_state_dict(int8), ids)
    assert torch.equal(logits_of(tmp_path / "int8", ids), dequantized)
    kernel, _ = load_model(tmp_path / "int8", compute="int8")
    if arch == "hybrid":                  # the int8 kernel runs the Linear layers (BDH has none)
        assert any(isinstance(m, Int8Linear) for m in kernel.modules())
    with torch.no_grad():
        assert rel_err(kernel.eval()(ids), dequantized) < 1e-3


def test_a_sidecar_that_does_not_describe_its_weights_is_refused_by_name(tmp_path):
    model = build_model(config("hybrid"))
    save_model(model, tmp_path / "ck", {})
    sidecar = tmp_path / "ck" / SIDECAR
    meta = json.loads(sidecar.read_text())
    for content, message in (
            ({k: v for k, v in meta.items() if k != "model_config"}, r"model.json: no model_config object"),
            ({**meta, "model_config": {**meta["model_config"], "n_layers": 1}},
             r"ck: its weights do not fit the model_config of model.json \(Unexpected key\(s\) in state_dict"),
            ({**meta, "model_config": {**meta["model_config"], "rope_scaling": 2}},
             r"model.json: its model_config does not fit the model schema \(rope_scaling: Extra inputs"),
            ([meta], r"corrupted checkpoint sidecar .*model.json: a JSON list, not an object")):
        sidecar.write_text(json.dumps(content))
        with pytest.raises(InputError, match=message):
            load_model(tmp_path / "ck")
    sidecar.write_bytes(b"\xff\xfe{}")
    with pytest.raises(InputError, match=r"model.json: not UTF-8 \(invalid start byte at byte 0\)"):
        load_model(tmp_path / "ck")


def test_an_unknown_format_is_refused_by_name(tmp_path):
    model = build_model(config("hybrid"))
    save_model(model, tmp_path / "ck", {"format": "fp8"})
    with pytest.raises(ValueError, match="unknown checkpoint format 'fp8'"):
        load_model(tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / SIDECAR).read_text())["format"] == "fp8"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_checkpoints_weights_get_the_mode_of_its_other_files(tmp_path, umask):
    """safetensors wrote model.safetensors 0600 whatever the umask, its sidecar beside it 0644."""
    import os

    from hatchling.io import new_file_mode

    before = os.umask(umask)
    try:
        assert new_file_mode() == 0o666 & ~umask
        save_model(build_model(config("hybrid")), tmp_path / "ck", {})
    finally:
        os.umask(before)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "ck").iterdir()}
    assert modes == {"model.safetensors": 0o666 & ~umask, SIDECAR: 0o666 & ~umask}


def test_a_checkpoint_trained_with_flas_kernel_loads_and_runs_off_cuda(tmp_path):
    """model.kda_backend fla (a GPU profile's choice) is how the op is computed, not what: loaded on a CPU the
    checkpoint runs the chunked op, with the logits of the same weights under it (fla off CUDA raised)."""
    torch.manual_seed(0)
    trained = build_model({**config("hybrid"), "n_layers": 4, "kda_backend": "fla"})
    save_model(trained, tmp_path / "ck", {})
    assert json.loads((tmp_path / "ck" / SIDECAR).read_text())["model_config"]["kda_backend"] == "fla"
    model, _ = load_model(tmp_path / "ck")
    assert model.config.kda_backend == "auto"
    ids = torch.randint(0, V, (2, 40))
    reference = logits_with({**config("hybrid"), "n_layers": 4, "kda_backend": "chunked"}, trained.state_dict(), ids)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), reference)
    with pytest.raises(ValueError, match="backend 'fla'"):                  # as saved, off CUDA: the kernel's error
        with torch.no_grad():
            trained.eval()(ids)
