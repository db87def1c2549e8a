"""Data tools: corpora, tokenizer, packed token files."""
