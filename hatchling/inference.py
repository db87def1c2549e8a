"""Text from a model: `generate_text` (a continuation, cut at stop strings or tokens: what RLVR and
the eval answer with), and the `generate` and `chat` commands, streamed as sampled, from any
checkpoint (fp32, bf16 or int8; loading is hatchling.checkpoint's), on the device given (`--device`;
decoding runs under bf16 autocast on CUDA)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch

from hatchling.checkpoint import load_for_inference
from hatchling.data.tokenizer import EOT, prompt_ids
from hatchling.errors import InputError
from hatchling.model.device import resolve_device
from hatchling.model.generate import check_compilable


@torch.no_grad()
def generate_text(model, prompt_ids: list[int], max_new_tokens: int, decode: Callable[[list[int]], str],
                  stop: Sequence[str] = (), max_len: int | None = None, temperature: float = 0.0,
                  seed: int | None = None, stop_ids: tuple[int, ...] = (), *, device: torch.device) -> str:
    """A continuation of a prompt as text (greedy at temperature 0), cut at the first stop string or
    before the first stop token (e.g. the chat template's <|end|>); the model is on `device`."""
    ids = prompt_ids[-max_len:] if max_len else prompt_ids
    new: list[int] = []
    for tok in model.stream(torch.tensor([ids], device=device), max_new_tokens, temperature=temperature, seed=seed):
        if int(tok[0]) in stop_ids:
            break
        new.append(int(tok[0]))
        text = decode(new)
        if any(s in text for s in stop):
            break
    return cut_at_stop(decode(new), stop)


@torch.no_grad()
def generate_texts(model, prompts: list[list[int]], max_new_tokens: int, decode: Callable[[list[int]], str],
                   stop: Sequence[str] = (), max_len: int | None = None, stop_ids: tuple[int, ...] = (),
                   batch_size: int = 32, *, device: torch.device) -> list[str]:
    """Greedy continuations of many prompts, each what `generate_text` gives for it alone: prompts of
    one length decode together, one batch of up to `batch_size` rows, until every row has stopped."""
    prompts = [p[-max_len:] if max_len else p for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    out: list[str] = [""] * len(prompts)
    for same_length in by_length.values():
        for b in range(0, len(same_length), batch_size):
            rows = same_length[b:b + batch_size]
            new: list[list[int]] = [[] for _ in rows]
            done = [False] * len(rows)
            for tok in model.stream(torch.tensor([prompts[i] for i in rows], device=device), max_new_tokens):
                for j, t in enumerate(tok.tolist()):
                    if done[j]:
                        continue
                    if t in stop_ids:
                        done[j] = True
                        continue
                    new[j].append(t)
                    done[j] = any(s in decode(new[j]) for s in stop)
                if all(done):
                    break
            for j, i in enumerate(rows):
                out[i] = cut_at_stop(decode(new[j]), stop)
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.index(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


def stream_text(model, tokenizer, ids: list[int], max_new_tokens: int, stop: tuple[int, ...] = (), *,
                device: torch.device, **decoding):
    """Yield text pieces as tokens come (the model is on `device`; `decoding`: the sampling and other
    arguments of its stream); decodes the running suffix so multi-byte characters stay whole. The pieces
    join to the decoded continuation: bytes of a character the model never completes come at the end."""
    prompt = torch.tensor([ids], device=device)
    new: list[int] = []
    shown = text = ""
    for tok in model.stream(prompt, max_new_tokens, stop_ids=stop, **decoding):
        t = int(tok[0])
        if t in stop:
            break
        new.append(t)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):          # wait for the rest of a split UTF-8 character
            yield text[len(shown):]
            shown = text
    if text != shown:
        yield text[len(shown):]


def generate_cli(args) -> int:
    device = resolve_device(args.device)
    model, tokenizer, _ = load_for_inference(args.checkpoint, args.compute, device)
    if args.compile:
        check_compilable(model, device)              # before the prompt is printed
    return print_continuation(args, model, tokenizer, device, compiled=args.compile)


def print_continuation(args, model, tokenizer, device: torch.device, **decoding) -> int:
    """`generate`'s output: args.prompt, then its continuation by `model` (a module, or anything
    `stream_text` decodes with, such as an ONNX decoder; `decoding`: further arguments of its stream)
    streamed to stdout as it is decoded. Special tokens written in the prompt are the control tokens."""
    ids = prompt_ids(tokenizer, args.prompt)
    if len(ids) == 1:
        raise InputError("--prompt is empty after tokenization")
    sys.stdout.write(args.prompt)
    for piece in stream_text(model, tokenizer, ids, args.max_new_tokens, (tokenizer.token_to_id(EOT),), device=device,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             **decoding):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def chat_cli(args, read=input) -> int:
    """A multi-turn conversation on stdin/stdout; an empty line or EOF ends it."""
    from hatchling.data.chat import render_chat, stop_ids

    device = resolve_device(args.device)
    model, tokenizer, _ = load_for_inference(args.checkpoint, args.compute, device)
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
        for piece in stream_text(model, tokenizer, ids, args.max_new_tokens, stop_ids(tokenizer), device=device,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed):
            reply += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
    return 0
