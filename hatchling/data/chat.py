"""The chat template: role tokens around each turn, shared by SFT, RL, eval and `hatchling chat`.

    <|system|>{content}<|end|><|user|>{content}<|end|><|assistant|>{content}<|end|>...

With ``add_generation_prompt`` the ids end in ``<|assistant|>``, ready for the model to answer;
generation stops at ``<|end|>`` (or end-of-text).
"""

from __future__ import annotations

from hatchling.data.tokenizer import END_OF_TURN, EOT, ROLE_TOKENS
from hatchling.errors import InputError


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation; each message is {"role": system|user|assistant, "content": str}."""
    ids, _ = render_chat_with_mask(tokenizer, messages)
    if add_generation_prompt:
        ids.append(tokenizer.token_to_id(ROLE_TOKENS["assistant"]))
    return ids


def render_chat_with_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(ids, trained): trained marks the tokens the model must learn to produce — the content of
    each assistant turn and the <|end|> that closes it (so it learns to stop); never the role tokens
    or what the user and system say."""
    ids: list[int] = []
    trained: list[bool] = []
    end = tokenizer.token_to_id(END_OF_TURN)
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLE_TOKENS:
            raise InputError(f"message {i}: role must be one of {sorted(ROLE_TOKENS)}, got {role!r}")
        content = tokenizer.encode(str(message.get("content", ""))).ids + [end]
        ids += [tokenizer.token_to_id(ROLE_TOKENS[role]), *content]
        trained += [False] + [role == "assistant"] * len(content)
    return ids, trained


def stop_ids(tokenizer) -> tuple[int, ...]:
    return tokenizer.token_to_id(END_OF_TURN), tokenizer.token_to_id(EOT)
