"""Labelled text for classification fine-tuning: TSV / CSV / JSONL files, tokenized in memory.

The label set is discovered from the training file (sorted) and travels with the checkpoint.
Texts longer than ``max_len`` tokens are truncated by ``truncation`` (or refused), empty texts
refused or skipped, unknown labels in the validation and test files refused or skipped; what
was truncated or skipped is counted and reported.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.errors import LMForgeError


@dataclass
class ClassificationDataConfig:
    """Where the labelled examples are and how batches are made of them."""

    train: str
    val: str
    test: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    columns: list[str] | None = None  # TSV/CSV without a header row: the column names, in order
    max_len: int = 128  # tokens per example, special tokens included
    truncation: str = "tail"  # tail: keep the start | head: keep the end | error
    on_empty: str = "error"  # an empty text: error | skip
    on_unknown_label: str = "error"  # a val/test label absent from training: error | skip
    balance: str = "none"  # none | weights (loss weights 1/frequency) | sampling (balanced batches)
    batch_size: int = 32
    val_batch_size: int | None = None
    num_workers: int = 0
    label_names: dict[str, str] = field(default_factory=dict)  # display names, e.g. {spam: SPAM}

    def __post_init__(self) -> None:
        choices = {
            "truncation": ("tail", "head", "error"),
            "on_empty": ("error", "skip"),
            "on_unknown_label": ("error", "skip"),
            "balance": ("none", "weights", "sampling"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LMForgeError(
                    f"data.{name}={getattr(self, name)!r}: use {' | '.join(allowed)}"
                )
        for name in ("max_len", "batch_size"):
            if getattr(self, name) <= 0:
                raise LMForgeError(f"data.{name} must be positive, got {getattr(self, name)}")


def read_examples(path: str | Path, cfg: ClassificationDataConfig) -> list[tuple[str, str]]:
    """(text, label) pairs of a .tsv, .csv, .jsonl or .json file."""
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"{path} not found: check data.train / data.val / data.test")
    rows: list[dict]
    if path.suffix in (".tsv", ".csv", ".txt") or path.suffix == "":
        delimiter = "," if path.suffix == ".csv" else "\t"
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(
                f,
                delimiter=delimiter,
                quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL,
            )
            lines = list(reader)
        header = cfg.columns or (lines.pop(0) if lines else [])
        rows = [dict(zip(header, line, strict=False)) for line in lines if line]
    elif path.suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        try:
            rows = (
                json.loads(text)
                if path.suffix == ".json"
                else [json.loads(line) for line in text.splitlines() if line.strip()]
            )
        except json.JSONDecodeError as e:
            raise LMForgeError(f"{path}:{e.lineno} is not valid JSON ({e.msg})") from None
    else:
        raise LMForgeError(f"{path}: use a .tsv, .csv, .jsonl or .json file")
    out = []
    for i, row in enumerate(rows, 1):
        if cfg.text_field not in row or cfg.label_field not in row:
            raise LMForgeError(
                f"{path} record {i} lacks {cfg.text_field!r} or {cfg.label_field!r} (fields:"
                f" {', '.join(row)}): set data.text_field / data.label_field or data.columns"
            )
        out.append((str(row[cfg.text_field]), str(row[cfg.label_field])))
    return out


class Encoded(torch.utils.data.Dataset):
    """Token ids and label indices of one split."""

    def __init__(self, ids: list[list[int]], labels: list[int]) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.ids[i], self.labels[i]


def encode(
    examples: list[tuple[str, str]],
    labels: list[str],
    tokenizer,
    frame,
    cfg: ClassificationDataConfig,
    where: str,
) -> tuple[Encoded, Counter]:
    """Tokenize each text framed as the model's family frames it (``frame``, a
    ``models.registry.TextFrame``: a GPT's text then <|endoftext|>, whose last token reads the
    whole text; a BERT's [CLS] text [SEP]); returns the split and counts of what was truncated
    or skipped."""
    index = {label: i for i, label in enumerate(labels)}
    counts: Counter = Counter()
    first, last = (
        [i for i in (tokenizer.token_to_id(t) for t in tokens) if i is not None]
        for tokens in (frame.prefix, frame.suffix)
    )
    budget = cfg.max_len - len(first) - len(last)
    texts = [t for t, _ in examples]
    encodings = tokenizer.encode_batch(texts)
    ids, ys = [], []
    for n, ((text, label), enc) in enumerate(zip(examples, encodings, strict=True), 1):
        if label not in index:
            if cfg.on_unknown_label == "skip":
                counts["unknown label"] += 1
                continue
            raise LMForgeError(
                f"{where} example {n} has the label {label!r}, which the training file does not"
                f" have ({', '.join(labels)}): fix it or set data.on_unknown_label=skip"
            )
        if not text.strip() or not enc.ids:
            if cfg.on_empty == "skip":
                counts["empty"] += 1
                continue
            what = "an empty text" if not text.strip() else "a text the tokenizer has no tokens for"
            raise LMForgeError(
                f"{where} example {n} has {what}: remove it or set data.on_empty=skip"
            )
        tokens = enc.ids
        if len(tokens) > budget:
            if cfg.truncation == "error":
                raise LMForgeError(
                    f"{where} example {n} has {len(tokens)} tokens, more than data.max_len="
                    f"{cfg.max_len} allows: raise it or set data.truncation=tail|head"
                )
            tokens = tokens[:budget] if cfg.truncation == "tail" else tokens[-budget:]
            counts["truncated"] += 1
        ids.append(first + tokens + last)
        ys.append(index[label])
    if not ids:
        raise LMForgeError(f"{where} holds no usable example")
    return Encoded(ids, ys), counts


def collate(batch: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, the attention mask, each example's length and its label."""
    longest = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, (ids, _) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "lengths": mask.sum(1),
        "labels": torch.tensor([y for _, y in batch]),
    }
