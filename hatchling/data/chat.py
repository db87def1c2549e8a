"""The chat template: role tokens around each turn, shared by SFT, RL, eval and `hatchling chat`.

    <|system|>{content}<|end|><|user|>{content}<|end|><|assistant|>{content}<|end|>...

With ``add_generation_prompt`` the ids end in ``<|assistant|>``, ready for the model to answer;
generation stops at ``<|end|>`` (or end-of-text).
"""

from __future__ import annotations

from hatchling.data.tokenizer import END_OF_TURN, EOT, ROLE_TOKENS


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation; each message is {"role": system|user|assistant, "content": str}."""
    ids: list[int] = []
    end = tokenizer.token_to_id(END_OF_TURN)
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLE_TOKENS:
            raise ValueError(f"message {i}: role must be one of {sorted(ROLE_TOKENS)}, got {role!r}")
        ids.append(tokenizer.token_to_id(ROLE_TOKENS[role]))
        ids += tokenizer.encode(str(message.get("content", ""))).ids
        ids.append(end)
    if add_generation_prompt:
        ids.append(tokenizer.token_to_id(ROLE_TOKENS["assistant"]))
    return ids


def stop_ids(tokenizer) -> tuple[int, ...]:
    return tokenizer.token_to_id(END_OF_TURN), tokenizer.token_to_id(EOT)
