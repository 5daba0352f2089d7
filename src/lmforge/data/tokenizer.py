"""Tokenizers built with Hugging Face ``tokenizers`` and saved as ``tokenizer.json``.

- ``char``: one token per character of the training text (a BPE with no merges), ids in the
  order of the sorted alphabet as in nanoGPT's ``shakespeare_char``; ``<|endoftext|>`` last.
- ``bpe``: byte-level BPE as in GPT-2: every string encodes, nothing maps to an unknown token.
- ``wordpiece``: BERT-style, with ``[PAD] [UNK] [CLS] [SEP] [MASK]``; CJK characters split apart.
- ``unigram``: SentencePiece-style Unigram over Metaspace pieces, with byte fallback.
- ``gpt2``: GPT-2's published vocabulary and merges (``data/gpt2_bpe``), id for id.
- ``file``: an existing ``tokenizer.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from lmforge.errors import LMForgeError

EOT = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
KINDS = ("char", "bpe", "wordpiece", "unigram", "gpt2", "file")
TRAINED = ("char", "bpe", "wordpiece", "unigram")


@dataclass
class TokenizerConfig:
    """Which tokenizer turns text into ids, and how it is trained."""

    kind: str = "char"  # char | bpe | wordpiece | unigram | gpt2 | file
    vocab_size: int = 8192  # bpe / wordpiece / unigram
    path: str | None = (
        None  # file: the tokenizer.json; gpt2: the folder with encoder.json and vocab.bpe
    )
    sample_bytes: int = 50_000_000  # train on the first this-many bytes of the training documents
    lowercase: bool = False  # wordpiece: lowercase and strip accents (an "uncased" vocabulary)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LMForgeError(
                f"data.prepare.tokenizer.kind={self.kind!r}: use one of {', '.join(KINDS)}"
            )
        if self.kind in ("file", "gpt2") and not self.path:
            what = (
                "a tokenizer.json"
                if self.kind == "file"
                else "the folder of encoder.json and vocab.bpe"
            )
            raise LMForgeError(
                f"data.prepare.tokenizer.kind={self.kind} needs data.prepare.tokenizer.path ({what})"
            )
        if self.kind in ("bpe", "wordpiece", "unigram") and self.vocab_size < 300:
            raise LMForgeError(
                f"data.prepare.tokenizer.vocab_size={self.vocab_size} is too small for {self.kind}: use at least 300"
            )
        if self.sample_bytes <= 0:
            raise LMForgeError(
                f"data.prepare.tokenizer.sample_bytes must be positive, got {self.sample_bytes}"
            )


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train a tokenizer of ``cfg.kind`` (one of TRAINED) on ``texts``."""
    kind = cfg.kind
    if kind == "char":
        tok = Tokenizer(models.BPE())
        tok.decoder = decoders.Fuse()
        trainer = trainers.BpeTrainer(vocab_size=1, show_progress=False)  # the alphabet, no merges
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True,
            handle_chinese_chars=True,
            strip_accents=cfg.lowercase,
            lowercase=cfg.lowercase,
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size, special_tokens=BERT_SPECIALS, show_progress=False
        )
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram(byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
        byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.UnigramTrainer(
            vocab_size=cfg.vocab_size,
            special_tokens=["<unk>", EOT, *byte_tokens],
            unk_token="<unk>",
            show_progress=False,
        )
    else:
        raise LMForgeError(
            f"tokenizer kind {kind!r} is not trained: use one of {', '.join(TRAINED)}"
        )
    tok.train_from_iterator(texts, trainer)
    if kind == "unigram":
        # Training builds a new model: switch byte fallback back on, and make the byte pieces
        # ordinary vocabulary (special tokens would be dropped when decoding).
        spec = json.loads(tok.to_str())
        spec["model"]["byte_fallback"] = True
        spec["added_tokens"] = [
            t for t in spec["added_tokens"] if not t["content"].startswith("<0x")
        ]
        tok = Tokenizer.from_str(json.dumps(spec))
    if kind == "char":
        tok.add_special_tokens([EOT])  # after training: ids of the characters stay in sorted order
    return tok


def gpt2_tokenizer(folder: str | Path) -> Tokenizer:
    """GPT-2's byte-level BPE from its published ``encoder.json`` and ``vocab.bpe``."""
    folder = Path(folder)
    vocab, merges = folder / "encoder.json", folder / "vocab.bpe"
    for f in (vocab, merges):
        if not f.is_file():
            raise LMForgeError(
                f"{f} not found: data.prepare.tokenizer.path must hold GPT-2's encoder.json and vocab.bpe"
            )
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([EOT])
    return tok


def plain(tok: Tokenizer) -> Tokenizer:
    """``tok`` with its padding, truncation and post-processor switched off, in place.

    A ``tokenizer.json`` saved by transformers carries its pipeline's settings: sentence-
    transformers files pad and truncate every encoding to a fixed length, BERT files wrap it in
    ``[CLS] ... [SEP]``. lmforge adds special tokens itself and never wants a document cut or
    padded by the tokenizer, so the files are used without them.
    """
    tok.no_padding()
    tok.no_truncation()
    tok.post_processor = None
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a ``tokenizer.json``, made :func:`plain`."""
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(
            f"tokenizer file {path} not found: prepare the data first (lmforge-prepare)"
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise LMForgeError(
            f"{path} is not a tokenizer.json of Hugging Face tokenizers ({e})"
        ) from None
    return plain(tok)


def document_separator(tok: Tokenizer) -> int | None:
    """The id appended after each document: ``<|endoftext|>``, else ``[SEP]``, else None."""
    for token in (EOT, "[SEP]"):
        i = tok.token_to_id(token)
        if i is not None:
            return i
    return None


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """The special (added) tokens of ``tok`` and their ids."""
    added = json.loads(tok.to_str()).get("added_tokens", [])
    return {t["content"]: t["id"] for t in added if t.get("special")}


def check_same_tokenizer(policy: Tokenizer, reward: Tokenizer, where: str) -> None:
    """Refuse a reward model whose tokenizer is not the policy's: it would score token ids that
    mean other text to it. Same vocabulary (ids and added tokens) and same split of a probe."""
    a, b = policy.get_vocab(with_added_tokens=True), reward.get_vocab(with_added_tokens=True)
    probe = "The quick brown fox, 1234 times: <|endoftext|> naïve café\n\tdone."
    if len(a) != len(b):
        why = f"a vocabulary of {len(b):,} tokens, the policy's {len(a):,}"
    elif a != b:
        differ = sum(b.get(t) != i for t, i in a.items())
        why = f"{differ:,} of its {len(a):,} tokens have other ids"
    elif policy.encode(probe).ids != reward.encode(probe).ids:
        why = "the same vocabulary, but it splits text differently"
    else:
        return
    raise LMForgeError(
        f"{where}: the reward model's tokenizer is not the policy's ({why}): it would score ids"
        " that mean other text to it; use a reward model trained from a checkpoint with the"
        " policy's tokenizer (lmforge-train experiment=rm_gpt init_from=<the policy's checkpoint>)"
    )
