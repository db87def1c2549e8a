"""Stage `export`: INT8 and bf16 artifacts of the trained model, measured against fp32.

Writes checkpoints/export/int8 and checkpoints/export/bf16 (each safetensors + model.json +
tokenizer.json, loadable by :func:`hatchling.checkpoint.load_for_inference` in a fresh process), with
``export.hf`` also checkpoints/export/hf (a transformers directory: :mod:`hatchling.export.hf`), and
reports file sizes, CPU prefill and per-token decode latency (the best of ``latency_repeats`` rounds after
an untimed warm-up round, each round timing every variant in turn, so that a burst of load hits all
alike), validation loss /
bits per byte and greedy-generation agreement of each against the fp32 source.

With the ``onnx`` extra installed, int8/ also holds model.onnx: the decode step as an onnxruntime
int8 graph (:mod:`hatchling.export.onnx`), the fast path `hatchling generate` takes for it, measured
here as ``int8_onnx`` (its size is that file's); without the extra, or for an arch the graph cannot
carry, the report's ``int8_onnx`` says why it was not written.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from hatchling.checkpoint import WEIGHTS, load_for_inference, save_model
from hatchling.data.packed import check_same_tokenizer, load_split, read_meta
from hatchling.data.tokenizer import TOKENIZER
from hatchling.export.onnx import ONNX_FILE, ONNX_QUANTIZATION, onnx_installed, onnx_unsupported, write_int8_onnx
from hatchling.export.onnx_runtime import load_decoder
from hatchling.io import atomic_path, file_sha256
from hatchling.model.generate import step_function
from hatchling.model.int8 import quantize_state_dict
from hatchling.model.lm import bits_per_byte, sample_batch, tokens_per_byte, validation_loss


@torch.no_grad()
def latency(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill ms for the prompt, mean ms per decoded token) of one run, batch 1, greedy, each token through
    the path `generate` takes (on the CPU, the model's step path where it has one)."""
    cache = model.new_cache()
    t0 = time.perf_counter()
    logits = model(prompt, cache)[:, -1]
    step = step_function(model, cache, 1, prompt.shape[1] + new_tokens, prompt.device)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        logits = step(logits.argmax(-1))
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / new_tokens


def greedy_agreement(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    """Fraction of generated positions where the candidate picked the reference's token."""
    same = sum(int((a == b).sum()) for a, b in zip(reference, candidate, strict=True))
    return same / sum(a.numel() for a in reference)


def run(ctx) -> dict:
    """Write checkpoints/export (int8/, bf16/ and, with export.hf, hf/) as one atomic swap: measured
    first, in place beside the old export, so a failed or killed export leaves the previous one whole."""
    p, data = ctx.params.export, ctx.inputs.tokenized
    source = ctx.inputs[p.source]
    model, _, meta = load_for_inference(source)
    check_same_tokenizer(data, source, meta.get("tokenizer_sha256"))
    if p.hf:
        from hatchling.export.hf import check_exportable, export_hf

        check_exportable(model.config)              # before any work: one clear error for an arch it cannot carry
    with atomic_path(ctx.outputs.export) as out:
        out.mkdir()
        report = export(ctx, model, meta, source, out, data)
        if p.hf:
            export_hf(model, source / TOKENIZER, out / "hf")
    return report


def write_int8(model, directory: Path, sidecar: dict, files: dict[str, Path]) -> str | None:
    """The INT8 artifact at `directory`: int8 safetensors and, with the onnx extra and an arch its graph
    carries, model.onnx (its sha256 in the sidecar's ``onnx``). Returns why there is no graph (None: there is)."""
    meta = {**sidecar, "format": "int8", "quantization": "symmetric per-output-channel int8 (Linear, embedding)"}
    no_onnx = "the onnx extra is not installed" if not onnx_installed() else onnx_unsupported(model.config)
    with tempfile.TemporaryDirectory() as tmp:
        graph = {}
        if not no_onnx:
            graph[ONNX_FILE] = write_int8_onnx(model, Path(tmp) / ONNX_FILE)
            meta["onnx"] = {"file": ONNX_FILE, "sha256": file_sha256(graph[ONNX_FILE]),
                            "quantization": ONNX_QUANTIZATION}
        save_model(model, directory, meta, files=files | graph, weights=quantize_state_dict(model))
    return no_onnx


def export(ctx, model, meta: dict, source, out, data) -> dict:
    """The int8 and bf16 artifacts written into `out`, and the report comparing them with fp32."""
    p = ctx.params.export
    sidecar = {"provenance": {"source": ctx.relative(source), "source_step": meta.get("step"),
                              "data_sha256": meta.get("data_sha256")},
               "tokenizer_sha256": meta.get("tokenizer_sha256"), "stage": "export"}
    files = {TOKENIZER: source / TOKENIZER}
    no_onnx = write_int8(model, out / "int8", sidecar, files)
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_model(model, out / "bf16", {**sidecar, "format": "bf16"}, files=files, weights=bf16)

    tok_meta = read_meta(data)
    val = load_split(data, "val")
    val_tokens_per_byte = tokens_per_byte(tok_meta["val"]["tokens"], tok_meta["val"]["bytes"])
    prompts = sample_batch(val, p.prompts, p.prompt_len, seed=2024, device="cpu")[0]
    variants = {"fp32": model,
                "int8": load_for_inference(out / "int8")[0],
                "int8_kernel": load_for_inference(out / "int8", compute="int8")[0],
                "bf16": load_for_inference(out / "bf16")[0]}
    if not no_onnx:
        variants["int8_onnx"] = load_decoder(out / "int8")[0]
    fp32_size = (source / WEIGHTS).stat().st_size
    report: dict = {"source": sidecar["provenance"]["source"], "fp32_bytes": fp32_size,
                    "int8_onnx": no_onnx or f"int8/{ONNX_FILE}"}
    reference = [model.generate(prompts[i:i + 1], p.new_tokens)[0, p.prompt_len:] for i in range(p.prompts)]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for round_ in range(1 + p.latency_repeats):  # rounds over the variants (a burst of load hits each alike): the best
        for name, m in variants.items():
            timed = latency(m, prompts[:1], p.new_tokens)
            if round_:                       # the first round warms each variant up (allocations, lazy set-up)
                runs[name].append(timed)
    for name, m in variants.items():
        loss = validation_loss(m, val, p.eval_batches, p.batch_size, p.seq_len)
        prefill, decode = (min(times) for times in zip(*runs[name], strict=True))
        report[f"{name}_val_loss"] = round(loss, 5)
        report[f"{name}_val_bpb"] = round(bits_per_byte(loss, val_tokens_per_byte), 5)
        report[f"{name}_prefill_ms"] = round(prefill, 3)
        report[f"{name}_decode_ms_per_token"] = round(decode, 3)
        if name != "fp32":
            outs = [m.generate(prompts[i:i + 1], p.new_tokens)[0, p.prompt_len:] for i in range(p.prompts)]
            report[f"{name}_greedy_agreement"] = round(greedy_agreement(reference, outs), 4)
            report[f"{name}_val_loss_delta_pct"] = round(100 * (loss / report["fp32_val_loss"] - 1), 3)
            report[f"{name}_decode_latency_ratio"] = round(decode / report["fp32_decode_ms_per_token"], 3)
    sizes = {"int8": out / "int8" / WEIGHTS, "bf16": out / "bf16" / WEIGHTS}
    if not no_onnx:
        sizes["int8_onnx"] = out / "int8" / ONNX_FILE
    for name, path in sizes.items():
        report[f"{name}_bytes"] = path.stat().st_size
        report[f"{name}_size_ratio"] = round(path.stat().st_size / fp32_size, 4)
    # the int8 variant that decodes fastest (the ONNX graph where it exports): what a user of the INT8 export gets
    report["fastest_int8"] = min((name for name in variants if name.startswith("int8")),
                                 key=lambda name: report[f"{name}_decode_latency_ratio"])
    report["goals"] = {"int8_size_ratio<=0.35": report["int8_size_ratio"] <= 0.35,
                       "int8_val_loss_delta<=2%": report["int8_val_loss_delta_pct"] <= 2.0,
                       "fastest_int8_decode_latency_ratio<=0.6":
                           report[f"{report['fastest_int8']}_decode_latency_ratio"] <= 0.6}
    if not no_onnx:           # issue 25's goal for the fast path, on its own artifact
        report["goals"] |= {"int8_onnx_size_ratio<=0.3": report["int8_onnx_size_ratio"] <= 0.3,
                            "int8_onnx_val_loss_delta<=1%": report["int8_onnx_val_loss_delta_pct"] <= 1.0,
                            "int8_onnx_decode_latency_ratio<=0.6": report["int8_onnx_decode_latency_ratio"] <= 0.6}
    return report
