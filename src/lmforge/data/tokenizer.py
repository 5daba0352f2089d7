"""Tokenizers built with Hugging Face ``tokenizers`` and saved as ``tokenizer.json``.

- ``char``: one token per character of the training text (a BPE with no merges), as in
  nanoGPT's ``shakespeare_char``; ids follow the sorted alphabet.
- ``bpe``: byte-level BPE as in GPT-2; every string encodes, none maps to an unknown token.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.errors import LMForgeError

EOT = "<|endoftext|>"
KINDS = ("char", "bpe")


def train_tokenizer(
    texts: Iterable[str] | Iterator[str], kind: str, vocab_size: int = 8192
) -> Tokenizer:
    """Train a tokenizer of ``kind`` on ``texts``."""
    if kind == "char":
        tok = Tokenizer(models.BPE())
        tok.decoder = decoders.Fuse()
        # vocab_size=1 keeps the initial alphabet and learns no merges.
        trainer = trainers.BpeTrainer(vocab_size=1, show_progress=False)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        raise LMForgeError(f"unknown tokenizer kind {kind!r}: use one of {', '.join(KINDS)}")
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(
            f"tokenizer file {path} not found: prepare the data first (lmforge-prepare)"
        )
    return Tokenizer.from_file(str(path))
