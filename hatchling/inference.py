"""Loading any checkpoint for inference, and the `generate` / `chat` commands.

A checkpoint directory holds model.safetensors, model.json (config + provenance) and
tokenizer.json. Its sidecar's ``format`` says how the weights are stored: ``fp32`` (training
checkpoints), ``int8`` or ``bf16`` (exports). Nothing else is needed: no params.yaml, no run state.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from hatchling.errors import InputError
from hatchling.export.int8 import dequantize_state_dict, use_int8_linears
from hatchling.model import HatchlingLM, build_model
from hatchling.train.checkpoint import TOKENIZER, load_weights, read_sidecar


def load_for_inference(directory: str | Path, compute: str = "fp32") -> tuple[HatchlingLM, object, dict]:
    """(model in eval mode on CPU, tokenizer, sidecar). compute: fp32, or int8 for INT8 artifacts."""
    from hatchling.data.tokenizer import load_tokenizer

    directory = Path(directory)
    meta = read_sidecar(directory)
    fmt = meta.get("format", "fp32")
    sd = load_weights(directory)
    model = build_model(meta["model_config"])
    if fmt == "int8":
        model.load_state_dict(dequantize_state_dict(sd))
        if compute == "int8":
            use_int8_linears(model, sd)
    elif fmt in ("fp32", "bf16"):
        model.load_state_dict({k: v.float() for k, v in sd.items()})
    else:
        raise InputError(f"{directory}: unknown checkpoint format {fmt!r}")
    if hasattr(model, "load_state_files"):
        model.load_state_files(directory)
    tokenizer = load_tokenizer(directory / TOKENIZER)
    return model.eval(), tokenizer, meta


def stream_text(model, tokenizer, ids: list[int], max_new_tokens: int, stop: tuple[int, ...] = (), **sampling):
    """Yield text pieces as tokens come; decodes the running suffix so multi-byte characters stay whole."""
    prompt = torch.tensor([ids])
    new: list[int] = []
    shown = ""
    for tok in model.stream(prompt, max_new_tokens, stop_ids=stop, **sampling):
        t = int(tok[0])
        if t in stop:
            break
        new.append(t)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):          # wait for the rest of a split UTF-8 character
            yield text[len(shown):]
            shown = text


def generate_cli(args) -> int:
    from hatchling.data.tokenizer import EOT

    model, tokenizer, _ = load_for_inference(args.checkpoint, args.compute)
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise InputError("--prompt is empty after tokenization")
    sys.stdout.write(args.prompt)
    for piece in stream_text(model, tokenizer, ids, args.max_new_tokens, (tokenizer.token_to_id(EOT),),
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def chat_cli(args, read=input) -> int:
    """A multi-turn conversation on stdin/stdout; an empty line or EOF ends it."""
    from hatchling.data.chat import render_chat, stop_ids

    model, tokenizer, _ = load_for_inference(args.checkpoint, args.compute)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            line = read("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = render_chat(tokenizer, messages, add_generation_prompt=True)
        sys.stdout.write("hatchling> ")
        reply = ""
        for piece in stream_text(model, tokenizer, ids, args.max_new_tokens, stop_ids(tokenizer),
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed):
            reply += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
    return 0
