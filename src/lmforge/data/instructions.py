"""Instruction records (Alpaca format: instruction, optional input, output) for instruction tuning.

Each record is rendered through the prompt template of the config; the response (``output``
and ``<|endoftext|>``) follows. Labels are the next tokens of the response only: the prompt's
positions carry -100, so the loss is normalised by response tokens. Examples are padded to the
longest in the batch, or packed several to a row with the row's ``segments`` telling the model
where each starts (no attention across examples, positions restarting).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import LMForgeError

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately"
    " completes the request.\n\n### Instruction:\n{instruction}\n\n"
)


@dataclass
class InstructionDataConfig:
    train: str
    val: str
    prompt: str = ALPACA + "### Input:\n{input}\n\n### Response:\n"
    prompt_no_input: str = ALPACA + "### Response:\n"
    max_len: int = 256  # tokens per example (prompt + response + <|endoftext|>)
    too_long: str = "truncate"  # truncate the response | skip | error (counted and reported)
    on_missing_output: str = "error"  # a record without `output`: error | skip
    pack: bool = False  # several examples per row (no attention across them) instead of padding
    batch_size: int = 16
    val_batch_size: int | None = None
    num_workers: int = 0
    sample_prompts: int = 3  # validation records whose generated responses are logged

    def __post_init__(self) -> None:
        if self.too_long not in ("truncate", "skip", "error"):
            raise LMForgeError(f"data.too_long={self.too_long!r}: use truncate | skip | error")
        if self.on_missing_output not in ("error", "skip"):
            raise LMForgeError(f"data.on_missing_output={self.on_missing_output!r}: error | skip")


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"{path} not found: check data.train / data.val")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LMForgeError(f"{path}:{e.lineno} is not valid JSON ({e.msg})") from None
    if not isinstance(records, list):
        raise LMForgeError(f"{path} must hold a JSON list of records")
    return records


def render_prompt(record: dict, cfg: InstructionDataConfig) -> str:
    template = cfg.prompt if record.get("input") else cfg.prompt_no_input
    return template.format(instruction=record.get("instruction", ""), input=record.get("input", ""))


def encode_records(
    records: list[dict], tokenizer, cfg: InstructionDataConfig, where: str
) -> tuple[list[tuple[list[int], list[int]]], Counter]:
    """(input ids, labels) per example; labels -100 on the prompt's positions."""
    eot = tokenizer.token_to_id("<|endoftext|>")
    if eot is None:
        raise LMForgeError("instruction tuning needs a tokenizer with <|endoftext|>")
    counts: Counter = Counter()
    out = []
    for n, record in enumerate(records, 1):
        if not record.get("output"):
            if cfg.on_missing_output == "skip":
                counts["no output"] += 1
                continue
            raise LMForgeError(
                f"{where} record {n} has no 'output': fix it or set data.on_missing_output=skip"
            )
        prompt = tokenizer.encode(render_prompt(record, cfg)).ids
        response = tokenizer.encode(record["output"]).ids + [eot]
        tokens = prompt + response
        if len(tokens) > cfg.max_len + 1:  # inputs are tokens[:-1]: max_len positions
            if cfg.too_long == "error":
                raise LMForgeError(
                    f"{where} record {n} has {len(tokens) - 1} tokens, more than data.max_len="
                    f"{cfg.max_len}: raise it or set data.too_long=truncate|skip"
                )
            if cfg.too_long == "skip" or len(prompt) >= cfg.max_len:
                counts["too long, skipped"] += 1
                continue
            tokens = tokens[: cfg.max_len + 1]
            counts["response truncated"] += 1
        ids, labels = tokens[:-1], tokens[1:]
        labels = [-100] * (len(prompt) - 1) + labels[len(prompt) - 1 :]
        out.append((ids, labels))
    if not out:
        raise LMForgeError(f"{where} holds no usable record")
    return out, counts


def pad_batch(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), torch.tensor(y)
    return {"input_ids": ids, "labels": labels}


def pack(
    examples: list[tuple[list[int], list[int]]], row_len: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Rows of ``row_len`` tokens holding whole examples in order; ``segments`` numbers the
    examples of a row (padding after the last one is a segment of its own, never scored)."""
    rows, current = [], []
    for ex in examples:
        if current and sum(len(x) for x, _ in current) + len(ex[0]) > row_len:
            rows.append(current)
            current = []
        current.append(ex)
    if current:
        rows.append(current)
    packed = []
    for row in rows:
        ids = torch.full((row_len,), pad_id, dtype=torch.long)
        labels = torch.full((row_len,), -100, dtype=torch.long)
        segments = torch.full((row_len,), len(row), dtype=torch.long)
        at = 0
        for k, (x, y) in enumerate(row):
            ids[at : at + len(x)], labels[at : at + len(y)] = torch.tensor(x), torch.tensor(y)
            segments[at : at + len(x)] = k
            at += len(x)
        packed.append({"input_ids": ids, "labels": labels, "segments": segments})
    return packed
