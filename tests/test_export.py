"""INT8 / bf16 export and inference: error bounds, fresh-process loading, streaming, bad checkpoints."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hatchling.checkpoint import load_for_inference
from hatchling.config import load_params
from hatchling.data.chat import render_chat
from hatchling.data.packed import load_split, read_meta
from hatchling.data.tokenizer import document_ids, load_tokenizer, train_tokenizer
from hatchling.export.onnx import onnx_installed
from hatchling.inference import stream_text
from hatchling.model import build_model
from hatchling.model.int8 import (
    Int8Linear,
    dequantize,
    dequantize_state_dict,
    quantize_per_channel,
    quantize_state_dict,
    use_int8_linears,
)
from hatchling.model.lm import bits_per_byte, tokens_per_byte, validation_loss
from tests.conftest import TINY_PARAMS, copy_project, hatchling_cmd, hatchling_here, project_env, run_cmd

TINY_MODEL = {**TINY_PARAMS["model"], "vocab_size": 320}


def test_per_channel_quantization_error_is_half_a_step():
    w = torch.randn(48, 40) * torch.logspace(-3, 1, 48)[:, None]   # rows of very different scale
    w[5] = 0                                                           # an all-zero channel is safe
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (48,)
    err = (dequantize(q, scale) - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-7)
    assert torch.all(dequantize(q, scale)[5] == 0)


def test_int8_kernel_linear_matches_dequantized_reference():
    lin = torch.nn.Linear(40, 24, bias=True)
    q, scale = quantize_per_channel(lin.weight)
    x = torch.randn(3, 7, 40)
    ref = x @ dequantize(q, scale).T + lin.bias
    torch.testing.assert_close(Int8Linear(q, scale, lin.bias.detach())(x), ref, atol=1e-4, rtol=1e-4)


def test_quantized_logits_close_to_fp32():
    """Stated bound: relative L2 error of logits < 3%, argmax agreement >= 95% (seeded random d=32 model)."""
    torch.manual_seed(0)
    model = build_model(TINY_MODEL).eval()
    sd = quantize_state_dict(model)
    qmodel = build_model(TINY_MODEL).eval()
    qmodel.load_state_dict(dequantize_state_dict(sd))
    kernel = use_int8_linears(build_model(TINY_MODEL).eval(), sd)
    kernel.load_state_dict(dequantize_state_dict(sd), strict=False)
    ids = torch.randint(0, 320, (4, 64))
    with torch.no_grad():
        ref, deq, ker = model(ids), qmodel(ids), kernel(ids)
    rel = ((deq - ref).norm() / ref.norm()).item()
    assert rel < 0.03
    assert (deq.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    torch.testing.assert_close(ker, deq, atol=1e-4, rtol=1e-4)


def test_chat_template(tokenized_project):
    tok = load_tokenizer(tokenized_project / "data/tokenized/tokenizer.json")
    ids = render_chat(tok, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                      add_generation_prompt=True)
    assert tok.decode(ids, skip_special_tokens=False) == "<|system|>be brief<|end|><|user|>hi<|end|><|assistant|>"
    with pytest.raises(ValueError, match="message 0: role must be one of"):
        render_chat(tok, [{"role": "robot", "content": "x"}])


def test_a_typed_prompt_reads_special_token_strings_as_the_control_tokens(tokenized_project):
    """`hatchling generate --prompt "<|user|>...<|end|><|assistant|>"` prompts a chat checkpoint in its
    template (as a transformers tokenizer reads a prompt); the tokenizer it came from still reads them as text."""
    from hatchling.data.tokenizer import EOT, prompt_ids

    tok = load_tokenizer(tokenized_project / "data/tokenized/tokenizer.json")
    ids = prompt_ids(tok, "<|user|>What is 2 + 3?<|end|><|assistant|>")
    chat = render_chat(tok, [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True)
    assert ids == [tok.token_to_id(EOT), *chat] and chat[0] == tok.token_to_id("<|user|>")
    assert prompt_ids(tok, "def loads(") == document_ids(tok, "def loads(")
    assert tok.token_to_id("<|user|>") not in tok.encode("<|user|>").ids           # unchanged by prompt_ids


def test_special_token_strings_in_text_stay_text(tokenized_project):
    """A page that quotes <|endoftext|> does not end its document; a message that writes <|end|><|assistant|>
    does not open a turn: only the packing, document_ids and the chat template place control tokens."""
    from hatchling.data.tokenize import _encode_batch
    from hatchling.data.tokenizer import SPECIAL_TOKENS, train_tokenizer

    text = "GPT-2 ends each document with <|endoftext|>; a chat turn ends with <|end|><|assistant|> here."
    trained = train_tokenizer([text] * 20, 300)
    for tok in (load_tokenizer(tokenized_project / "data/tokenized/tokenizer.json"), trained):
        control = {tok.token_to_id(t) for t in SPECIAL_TOKENS}
        ids = tok.encode(text).ids
        assert not control & set(ids) and tok.decode(ids) == text
        assert _encode_batch((tok.to_str(), [text])) == [ids]          # the tokenize stage's workers
        chat = render_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True)
        assert [i for i in chat if i in control] == [tok.token_to_id("<|user|>"), tok.token_to_id("<|end|>"),
                                                     tok.token_to_id("<|assistant|>")]


@pytest.fixture(scope="module")
def exported(pretrained_project, tmp_path_factory):
    proj = copy_project(pretrained_project, tmp_path_factory.mktemp("export") / "proj")
    run_cmd(hatchling_cmd("run", "export"), proj)
    return proj


def test_export_stage_report_and_artifacts(exported):
    report = json.loads((exported / "reports/export.json").read_text())
    for fmt in ("int8", "bf16"):
        meta = json.loads((exported / f"checkpoints/export/{fmt}/model.json").read_text())
        assert meta["format"] == fmt and meta["provenance"]["source"] == "checkpoints/pretrain"
        assert (exported / f"checkpoints/export/{fmt}/tokenizer.json").is_file()
    assert report["int8_size_ratio"] < 0.4 and 0.49 < report["bf16_size_ratio"] < 0.55
    assert abs(report["int8_val_loss_delta_pct"]) < 2 and report["int8_greedy_agreement"] >= 0.75
    # the artifacts are the source's weights, quantized per channel and cast; each variant's validation loss is
    # that of the directory as the one loader reads it, on the export's own batches of the validation split
    p = load_params(exported / "params.yaml").export
    fp32 = load_for_inference(exported / "checkpoints" / p.source)[0]
    stored = {fmt: load_file(str(exported / f"checkpoints/export/{fmt}/model.safetensors")) for fmt in ("int8", "bf16")}
    expected = {"int8": quantize_state_dict(fp32),
                "bf16": {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in fp32.state_dict().items()}}
    for fmt in ("int8", "bf16"):
        assert stored[fmt].keys() == expected[fmt].keys(), fmt
        assert [k for k in expected[fmt] if not torch.equal(stored[fmt][k], expected[fmt][k])] == [], fmt
    val = load_split(exported / "data/tokenized", "val")
    split = read_meta(exported / "data/tokenized")["val"]
    models = {"fp32": fp32, **{fmt: load_for_inference(exported / f"checkpoints/export/{fmt}")[0] for fmt in stored},
              "int8_kernel": load_for_inference(exported / "checkpoints/export/int8", compute="int8")[0]}
    loss = {name: validation_loss(m, val, p.eval_batches, p.batch_size, p.seq_len) for name, m in models.items()}
    for name in models:
        assert report[f"{name}_val_loss"] == pytest.approx(loss[name], abs=6e-6), name     # to its 5 decimals
        bpb = bits_per_byte(loss[name], tokens_per_byte(split["tokens"], split["bytes"]))
        assert report[f"{name}_val_bpb"] == pytest.approx(bpb, abs=6e-6), name
        if name != "fp32":
            delta = 100 * (loss[name] / loss["fp32"] - 1)
            assert report[f"{name}_val_loss_delta_pct"] == pytest.approx(delta, abs=6e-4), name   # 3 decimals
    assert loss["int8"] != loss["fp32"] and report["int8_val_loss"] != report["fp32_val_loss"]
    goals = {"int8_size_ratio<=0.35", "int8_val_loss_delta<=2%", "fastest_int8_decode_latency_ratio<=0.6"}
    int8 = [name for name in ("int8", "int8_kernel", "int8_onnx") if f"{name}_decode_latency_ratio" in report]
    assert report["fastest_int8"] == min(int8, key=lambda name: report[f"{name}_decode_latency_ratio"])
    # the int8 graph on onnxruntime, measured on its own (the onnx extra is in the dev lock: never left out here)
    assert onnx_installed()
    goals |= {"int8_onnx_size_ratio<=0.3", "int8_onnx_val_loss_delta<=1%", "int8_onnx_decode_latency_ratio<=0.6"}
    assert report["int8_onnx"] == "int8/model.onnx" and abs(report["int8_onnx_val_loss_delta_pct"]) < 2
    assert set(report["goals"]) == goals


def test_each_variants_first_decode_warms_it_up_and_is_not_reported(pretrained_project, tmp_path, monkeypatch):
    """The first run of a model pays its allocations and lazy set-up: with one timed round, fp32 (timed
    first) read 10x slower than the int8 copy of the same float weights. Each variant's reported latency is
    the best of its runs after its first."""
    import hatchling.export.stage as export_stage
    from hatchling.stages import context

    proj = copy_project(pretrained_project, tmp_path / "proj")
    calls: dict[int, int] = {}

    def latency(model, prompt, new_tokens):                 # a variant's n-th run takes 100 / n ms a token
        calls[id(model)] = calls.get(id(model), 0) + 1
        return 1000.0 / calls[id(model)], 100.0 / calls[id(model)]

    monkeypatch.setattr(export_stage, "latency", latency)
    params = load_params(proj / "params.yaml", ["export.latency_repeats=2"])
    report = export_stage.run(context("export", params, proj))
    assert set(calls.values()) == {3}                     # a warm-up and two timed rounds per variant
    names = [k.removesuffix("_decode_ms_per_token") for k in report if k.endswith("_decode_ms_per_token")]
    assert {"fp32", "int8", "int8_kernel", "bf16", "int8_onnx"} <= set(names)
    assert all(report[f"{name}_decode_ms_per_token"] == round(100.0 / 3, 3) for name in names)
    assert all(report[f"{name}_prefill_ms"] == round(1000.0 / 3, 3) for name in names)


def test_artifact_loads_in_a_fresh_process(exported):
    code = ("import sys, torch; from hatchling.checkpoint import load_for_inference;"
            "m, tok, meta = load_for_inference(sys.argv[1]);"
            "print(m(torch.arange(20)[None] % 300)[0, -1].tolist())")
    art = exported / "checkpoints/export/int8"
    proc = subprocess.run([sys.executable, "-c", code, str(art)], cwd="/", env=project_env(exported),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    model, _, _ = load_for_inference(art)
    with torch.no_grad():
        here = model(torch.arange(20)[None] % 300)[0, -1]
    torch.testing.assert_close(torch.tensor(json.loads(proc.stdout)), here)


def test_streaming_equals_non_streaming(exported):
    model, tok, _ = load_for_inference(exported / "checkpoints/export/int8")
    ids = document_ids(tok, "Return the")          # generate gives a base model its prompt as a document's start
    pieces = list(stream_text(model, tok, ids, 25, device=torch.device("cpu"), temperature=0.0))
    full = model.generate(torch.tensor([ids]), 25)[0, len(ids):].tolist()
    assert "".join(pieces) == tok.decode(full) and len(pieces) > 1
    proc = run_cmd(hatchling_cmd("generate", "--checkpoint", "checkpoints/export/int8", "--prompt", "Return the",
                                 "--temperature", "0", "--max-new-tokens", "25", "--runtime", "torch"), exported)
    assert proc.stdout == "Return the" + tok.decode(full) + "\n"
    sampled = [hatchling_cmd("generate", "--checkpoint", "checkpoints/pretrain", "--prompt", "x", "--seed", "3")] * 2
    assert run_cmd(sampled[0], exported).stdout == run_cmd(sampled[1], exported).stdout


def test_stream_pieces_join_to_the_decoded_continuation_even_ending_mid_character():
    """A model's tokens may end inside a UTF-8 character (here the first byte of "é" alone): the stream
    holds a split character back until it is whole, and gives what is left at the end."""
    tok = train_tokenizer(["plain ascii text only"] * 4, 300)
    e1, e2 = (tok.token_to_id(c) for c in ("Ã", "©"))           # byte-level symbols of 0xC3 and 0xA9: "é"
    a, b = tok.token_to_id("a"), tok.token_to_id("b")

    class Replay:                       # plays back fixed tokens through the model interface stream_text uses
        def __init__(self, tokens):
            self.tokens = tokens

        def stream(self, prompt, max_new_tokens, stop_ids=(), **decoding):
            yield from (torch.tensor([t]) for t in self.tokens[:max_new_tokens])

    for tokens, pieces in [([a, e1, e2, b], ["a", "é", "b"]), ([a, e1, e2, e1], ["a", "é", "\ufffd"]),
                           ([e1, a], ["\ufffda"])]:
        got = list(stream_text(Replay(tokens), tok, [a], 8, device=torch.device("cpu")))
        assert got == pieces and "".join(got) == tok.decode(tokens)


def test_chat_command_answers_each_turn(exported):
    proc = subprocess.run(hatchling_cmd("chat", "--checkpoint", "checkpoints/export/bf16", "--max-new-tokens", "5",
                                        "--seed", "0"), cwd=exported, env=project_env(exported),
                          input="hello\nand again\n\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("you> ") == 3 and proc.stdout.count("hatchling> ") == 2


def test_missing_and_corrupted_checkpoints_fail_clearly(exported, tmp_path):
    proc = run_cmd(hatchling_cmd("generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"), exported,
                   check=False)
    assert proc.returncode == 2 and f"no checkpoint at {tmp_path / 'nope'}" in proc.stderr
    bad = tmp_path / "bad"
    shutil.copytree(exported / "checkpoints/export/int8", bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    proc = run_cmd(hatchling_cmd("generate", "--checkpoint", str(bad), "--prompt", "x"), exported, check=False)
    assert proc.returncode == 2 and "corrupted checkpoint weights" in proc.stderr
    (bad / "model.json").write_text("{not json")
    proc = run_cmd(hatchling_cmd("generate", "--checkpoint", str(bad), "--prompt", "x"), exported, check=False)
    assert proc.returncode == 2 and "corrupted checkpoint sidecar" in proc.stderr


def test_the_export_is_replaced_whole_or_not_at_all(exported, tmp_path, monkeypatch):
    """With export.hf on, int8/, bf16/ and hf/ appear together; an export that fails at its last step
    leaves the previous export exactly as it was, with no half-written directory beside it."""
    import hatchling.export.hf as hf

    proj = copy_project(exported, tmp_path / "proj")
    before = {p.relative_to(proj): p.read_bytes() for p in (proj / "checkpoints/export").rglob("*") if p.is_file()}

    def fails(*args):
        raise RuntimeError("disk went away while writing hf/")

    with monkeypatch.context() as m:
        m.setattr(hf, "export_hf", fails)
        assert hatchling_here(proj, "run", "export", "--set", "export.hf=true") == 1
    after = {p.relative_to(proj): p.read_bytes() for p in (proj / "checkpoints/export").rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in (proj / "checkpoints").iterdir()) == [
        "export", "pretrain", "pretrain-run", "rlvr", "rlvr-run", "sft", "sft-run"]
    assert hatchling_here(proj, "run", "export", "--set", "export.hf=true") == 0
    written = {p.name for p in (proj / "checkpoints/export").iterdir()}
    assert written == {"int8", "bf16", "hf"} and (proj / "checkpoints/export/hf/config.json").is_file()
