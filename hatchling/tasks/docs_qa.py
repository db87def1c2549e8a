"""Docs QA: question/answer chats derived from crawled documents, for SFT (train only). A page's
title asks what it covers, and its opening sentences answer. Real text, so SFT keeps the model's
prose anchored in the corpus; there is no verifier, so these chats are not RLVR or eval items."""

from __future__ import annotations


def chats(docs: list[dict], limit: int) -> list[dict]:
    """At most `limit` chats ({"messages": [...]}), one per usable document, in the documents' order."""
    out = []
    for doc in docs:
        if len(out) >= limit:
            break
        lines = [ln.strip() for ln in doc["text"].splitlines() if ln.strip()]
        if len(lines) < 2:
            continue
        title = lines[0].rstrip("¶").strip()
        sentences = " ".join(lines[1:4]).split(". ")
        answer = ". ".join(sentences[:2]).strip()
        if len(title) < 3 or len(answer) < 40:
            continue
        out.append({"messages": [{"role": "user", "content": f"What does the page \"{title}\" cover?"},
                                 {"role": "assistant", "content": answer if answer.endswith(".") else answer + "."}]})
    return out
