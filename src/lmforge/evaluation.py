"""Token-weighted loss, perplexity and bits per byte of a causal LM over token streams.

Every token of a stream but the first is scored exactly once. Windows hold ``seq_len`` input
tokens and start every ``stride`` tokens; each window scores only the targets the previous one
did not, so with ``stride < seq_len`` every token after the first window is predicted with at
least ``seq_len - stride`` tokens of context (the sliding-window recipe of Hugging Face's
perplexity guide); ``stride = seq_len`` gives non-overlapping windows.

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes of the scored text, which
makes models with different tokenizers comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.tasks.base import token_loss


@dataclass
class EvalResult:
    loss_sum: float = 0.0  # nats, summed over scored tokens
    tokens: int = 0  # scored tokens
    bytes: int = 0  # UTF-8 bytes of the scored tokens' text

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float | None:
        return self.loss_sum / math.log(2) / self.bytes if self.bytes else None


def windows(n: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first) for a stream of ``n`` tokens: inputs are tokens [begin, end), targets
    [begin + 1, end + 1), and targets from index ``first`` on are scored."""
    scored_to = 0  # the last target index scored so far
    begin = 0
    while scored_to < n - 1:
        end = min(begin + seq_len, n - 1)
        yield begin, end, scored_to + 1
        scored_to = end
        begin += stride


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    streams: list[np.ndarray],
    seq_len: int,
    stride: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    """Loss sums over every stream; ``dtype``: autocast to it (bf16 on a GPU); ``on_batch(n)``
    is told the windows done (for a progress bar)."""
    result = EvalResult()
    device = torch.device(device)
    pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # by window length

    def run(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        x = torch.stack([b[0] for b in batch]).to(device)
        y = torch.stack([b[1] for b in batch]).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        s, n = token_loss(logits, y)
        result.loss_sum += s.item()
        result.tokens += int(n)
        if on_batch is not None:
            on_batch(len(batch))

    for ids in streams:
        for begin, end, first in windows(len(ids), seq_len, stride):
            t = torch.from_numpy(np.asarray(ids[begin : end + 1], dtype=np.int64))
            x, y = t[:-1], t[1:].clone()
            y[: first - begin - 1] = -100  # targets scored by an earlier window
            group = pending.setdefault(len(x), [])
            group.append((x, y))
            if len(group) == batch_size:
                run(group)
                pending[len(x)] = []
    for group in pending.values():
        if group:
            run(group)
    return result


def count_windows(lengths: list[int], seq_len: int, stride: int) -> int:
    return sum(sum(1 for _ in windows(n, seq_len, stride)) for n in lengths)
