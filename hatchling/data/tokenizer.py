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
    return tok


def document_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text` as the start of a document: <|endoftext|>, which precedes every document in the packed
    pretraining stream, then its tokens: how ``hatchling generate``, the MLflow model, the eval's and the
    lm-eval adapter's generation prompt a base model (their log-likelihood requests and the transformers
    export's tokenizer put the same token first)."""
    return [tokenizer.token_to_id(EOT), *tokenizer.encode(text).ids]


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"no tokenizer at {path} (run the tokenize stage first)")
    return Tokenizer.from_file(str(path))
