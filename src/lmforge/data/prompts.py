"""Prompts for online RL (``task=grpo``): instruction records without responses.

A record is an Alpaca instruction (``instruction``, optional ``input``) or a conversation
(``messages``, up to the last assistant turn), rendered as instruction tuning renders it
(``lmforge.data.instructions.Framing``: the Alpaca prompt or the tokenizer's chat template), so
a policy tuned by ``task=instruction`` sees the prompts it was tuned on. Other fields travel
with the record to the reward function (``answer``: what ``lmforge.rewards.exact_match``
compares with). A prompt that leaves the model no room to answer within its context is an
error naming the record, or skipped and counted (``too_long=skip``).

Training batches are a function of the step alone (``PromptBatches``), like the token streams
of pretraining: a resumed run is handed the prompts the uninterrupted one was. The data module
is ``lmforge.data.datamodule.PromptDataModule``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from lmforge.data.datasets import StepStream
from lmforge.data.instructions import ALPACA, Framing, chat_template_choice
from lmforge.errors import LMForgeError


@dataclass
class PromptDataConfig:
    train: str  # JSON list of records: the prompts sampled during training
    val: str  # held-out records: greedy responses scored at each validation (val/reward)
    prompt: str = ALPACA + "### Input:\n{input}\n\n### Response:\n"
    prompt_no_input: str = ALPACA + "### Response:\n"
    format: str = "auto"  # alpaca | messages | auto (as data=instructions)
    chat_template: str = "auto"  # auto | true | false | a .jinja file (as data=instructions)
    batch_size: int = 8  # prompts per device per micro-batch, each sampled task.group_size times
    val_batch_size: int | None = None  # held-out prompts per validation batch; null: batch_size
    max_val_prompts: int | None = None  # score only the first N held-out prompts; null: all
    too_long: str = "error"  # a prompt leaving no room for a response: error | skip (counted)
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.format not in ("alpaca", "messages", "auto"):
            raise LMForgeError(f"data.format={self.format!r}: use alpaca | messages | auto")
        self.chat_template = chat_template_choice(self.chat_template)
        if self.too_long not in ("error", "skip"):
            raise LMForgeError(f"data.too_long={self.too_long!r}: use error | skip")
        for name in ("batch_size", "val_batch_size", "max_val_prompts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LMForgeError(f"data.{name} must be positive, got {value}")


@dataclass
class Prompt:
    """A prompt's tokens, its text as the reward function reads it, and its record."""

    ids: list[int]
    text: str
    record: dict


def encode_prompts(
    records: list, framing: Framing, block_size: int, too_long: str, where: str
) -> tuple[list[Prompt], Counter]:
    """The prompts of ``records``; a prompt needs at least one position left for a response."""
    out, counts = [], Counter()
    for n, record in enumerate(records, 1):
        ids = framing.prompt_ids(record, n, where)
        if len(ids) >= block_size:
            if too_long == "skip":
                counts["prompt too long, skipped"] += 1
                continue
            raise LMForgeError(
                f"{where} record {n}: its prompt has {len(ids)} tokens, which leaves no room for"
                f" a response in the model's context of {block_size}: shorten the record, or"
                " set data.too_long=skip"
            )
        out.append(Prompt(ids, framing.tokenizer.decode(ids, skip_special_tokens=False), record))
    if not out:
        raise LMForgeError(f"{where} holds no usable prompt")
    return out, counts


class PromptBatches(StepStream):
    """Micro-batch ``step``'s prompt indices on ``rank``: {"indices", "rollout", "micro"}.

    Optimizer step k = step // accumulate takes micro-batch m = step % accumulate of rollout
    r = k // iterations (a rollout is optimised ``iterations`` steps). Rollout r, micro m,
    rank w reads positions (r * accumulate + m) * world + w of a stream of prompt blocks that
    visits every prompt once per epoch, in an order drawn from (seed, epoch).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        accumulate: int,
        iterations: int,
        rank: int,
        world_size: int,
        start_step: int = 0,
    ) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.accumulate, self.iterations = accumulate, iterations
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng((self.seed, epoch)).permutation(self.n)}
        return self._orders[epoch]

    def batch(self, step: int) -> dict:
        k, m = divmod(step, self.accumulate)
        r = k // self.iterations
        block = (r * self.accumulate + m) * self.world_size + self.rank
        first = block * self.batch_size
        indices = [
            int(self._order(p // self.n)[p % self.n]) for p in range(first, first + self.batch_size)
        ]
        return {"indices": indices, "rollout": r, "micro": m}


class PromptIndices(Dataset):
    """Held-out prompt i as {"index", "labels"}; labels -100 marks a rank's blank (RankShard)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"index": torch.tensor(i), "labels": torch.tensor(0)}
