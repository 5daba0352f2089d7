"""Typed settings of a token data set (importable without Lightning, for early validation)."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.data.prepare import PrepareConfig
from lmforge.errors import LMForgeError


@dataclass
class DataConfig:
    """Where the tokens are and how batches are cut from them."""

    dir: str  # prepared token set (meta.json, *.bin, tokenizer.json)
    prepare: PrepareConfig | None = None  # if set, `dir` is (re)built from it when missing or stale
    batch_size: int = 12  # sequences per device per micro-batch
    seq_len: int = 64  # tokens per sequence; at most model.block_size
    val_batch_size: int | None = None  # default: batch_size
    max_val_windows: int | None = None  # cap the validation sweep (default: the whole split)
    align_to_documents: bool = (
        False  # start training windows at document starts (default: anywhere)
    )
    num_workers: int = 0  # DataLoader worker processes
    pin_memory: bool = True  # only takes effect on CUDA
    # tokens per optimizer step over all devices; sets trainer.accumulate_grad_batches to
    # global_batch_tokens / (batch_size x seq_len x world size). null: take accumulate as set
    global_batch_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len"):
            if getattr(self, name) <= 0:
                raise LMForgeError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.global_batch_tokens is not None and self.global_batch_tokens <= 0:
            raise LMForgeError(
                f"data.global_batch_tokens must be positive or null, got {self.global_batch_tokens}"
            )
        if self.num_workers < 0:
            raise LMForgeError(f"data.num_workers must be >= 0, got {self.num_workers}")
