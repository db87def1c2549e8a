"""Byte-level BPE (HF ``tokenizers``) with end-of-text and chat-role special tokens."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hatchling.errors import MissingInputError

TOKENIZER = "tokenizer.json"     # its file, in the tokenized data and in every checkpoint
EOT = "<|endoftext|>"
PAD = "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = [EOT, PAD, *ROLE_TOKENS.values(), END_OF_TURN]


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE; every byte is in the base alphabet, so any text round-trips."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return literal_specials(tok)


def literal_specials(tok: Tokenizer) -> Tokenizer:
    """`tok`, encoding the special tokens' strings in a text as text: a page that quotes <|endoftext|>, a
    chat message that writes <|assistant|>, gets their bytes' tokens, never the control ids, which only
    the tokenize stage's packing, document_ids and the chat template place (by id). (A setting of the
    tokenizer object, not of its file: every load sets it again.)"""
    tok.encode_special_tokens = True
    return tok


def document_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text` as the start of a document: <|endoftext|>, which precedes every document in the packed
    pretraining stream, then its tokens: how ``hatchling generate``, the MLflow model, the eval's and the
    lm-eval adapter's generation prompt a base model (their log-likelihood requests and the transformers
    export's tokenizer put the same token first)."""
    return [tokenizer.token_to_id(EOT), *tokenizer.encode(text).ids]


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """A prompt a person typed (``hatchling generate --prompt``) as :func:`document_ids` gives it, except
    that the special tokens' strings in it are the control tokens, as a transformers tokenizer reads them:
    a chat template written by hand (``<|user|>...<|end|><|assistant|>``) prompts a chat checkpoint.
    (Texts the pipeline reads, pages and chat messages, keep them as text: :func:`literal_specials`.)"""
    parsing = Tokenizer.from_str(tokenizer.to_str())          # a fresh object: encode_special_tokens off
    return [tokenizer.token_to_id(EOT), *parsing.encode(text).ids]


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"no tokenizer at {path} (run the tokenize stage first)")
    return literal_specials(Tokenizer.from_file(str(path)))
