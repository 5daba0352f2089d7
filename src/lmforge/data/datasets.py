"""Datasets over memory-mapped token shards.

Training draws random windows. Micro-batch ``s`` of every rank is a slice of one global batch
drawn from ``(seed, s)`` alone: the data order is reproducible, a run can restart at any step, and
W ranks of batch B see exactly the samples one process of batch W x B sees.
Windows run across document boundaries (as nanoGPT's) or, as an option, start at a document's
first token. Validation sweeps fixed, non-overlapping windows in order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from lmforge.data.prepare import read_meta
from lmforge.errors import LMForgeError


def open_split(data_dir: str | Path, split: str) -> list[np.memmap]:
    """Memory-map every shard of ``split``, checking sizes against ``meta.json``."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise LMForgeError(f"{data_dir}/meta.json has no split {split!r}: re-run lmforge-prepare")
    dtype = np.dtype(meta["dtype"])
    shards = []
    for s in meta["splits"][split]["shards"]:
        path = data_dir / s["file"]
        if not path.is_file():
            raise LMForgeError(f"shard {path} is missing: re-run lmforge-prepare for {data_dir}")
        size = path.stat().st_size
        if size != s["tokens"] * dtype.itemsize:
            raise LMForgeError(
                f"shard {path} holds {size // dtype.itemsize} tokens but meta.json says {s['tokens']}:"
                " the shard is truncated or stale, re-run lmforge-prepare"
            )
        if s["tokens"]:
            shards.append(np.memmap(path, dtype=dtype, mode="r"))
    return shards


def document_starts(data_dir: str | Path, split: str) -> np.ndarray:
    """Offsets of each document's first token in the concatenated split."""
    data_dir = Path(data_dir)
    info = read_meta(data_dir)["splits"][split]
    path = data_dir / info["index"]
    if not path.is_file() or path.stat().st_size != 8 * info["documents"]:
        raise LMForgeError(
            f"document index {path} is missing or truncated: re-run lmforge-prepare for {data_dir}"
        )
    return np.fromfile(path, dtype=np.uint64).astype(np.int64)


class StepStream(IterableDataset):
    """An endless stream of batches, ``batch(step)`` for step = start_step, start_step + 1, ...

    With DataLoader workers, worker w yields steps w, w + n, ...; the loader interleaves them
    back into order.
    """

    start_step: int = 0

    def batch(self, step: int):
        raise NotImplementedError

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        step = self.start_step + worker
        while True:
            yield self.batch(step)
            step += n_workers


class RandomWindows(StepStream):
    """An endless stream of (x, y) batches of random windows, ``y`` shifted by one token.

    Yields whole batches (use ``DataLoader(batch_size=None)``). Windows never cross shard
    boundaries. Every valid start position in every shard is equally likely, or, with
    ``doc_starts`` (offsets into the concatenated shards), every document start that fits.
    """

    def __init__(
        self,
        shards: list[np.memmap],
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        doc_starts: np.ndarray | None = None,
    ) -> None:
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.start_step = seed, rank, world_size, start_step
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size} processes")
        n_starts = np.array([max(len(s) - seq_len, 0) for s in shards], dtype=np.int64)
        self.cum_starts = np.cumsum(n_starts)
        self.starts = None  # (shard, offset) of every allowed start when aligned to documents
        if doc_starts is not None:
            bounds = np.cumsum([0] + [len(s) for s in shards])
            shard = np.searchsorted(bounds, doc_starts, side="right") - 1
            off = doc_starts - bounds[shard]
            fits = off < n_starts[shard]
            self.starts = (shard[fits], off[fits])
        if (
            not shards
            or self.cum_starts[-1] == 0
            or (self.starts is not None and not self.starts[0].size)
        ):
            raise LMForgeError(
                f"no training window of seq_len={seq_len} + 1 tokens fits in the data: lower data.seq_len"
                " or prepare more data"
            )

    @property
    def first_row(self) -> int:
        """This rank's first row in the global batch."""
        return self.rank * self.batch_size

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Draw the global batch's starts (cheap: integers), keep this rank's rows.
        rng = np.random.default_rng([self.seed, step])
        rows = slice(self.first_row, self.first_row + self.batch_size)
        if self.starts is not None:
            pick = rng.integers(0, self.starts[0].size, size=self.batch_size * self.world_size)[
                rows
            ]
            shard_ids, offs = self.starts[0][pick], self.starts[1][pick]
        else:
            pos = rng.integers(0, self.cum_starts[-1], size=self.batch_size * self.world_size)[rows]
            shard_ids = np.searchsorted(self.cum_starts, pos, side="right")
            offs = pos - np.concatenate([[0], self.cum_starts[:-1]])[shard_ids]
        window = np.arange(self.seq_len + 1)
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for sid in np.unique(shard_ids):
            sel = shard_ids == sid
            rows[sel] = self.shards[sid][offs[sel, None] + window]  # (n, seq_len + 1)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


class SequentialWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens in order, sharing one token at each seam."""

    def __init__(
        self, shards: list[np.memmap], seq_len: int, max_windows: int | None = None
    ) -> None:
        self.shards, self.seq_len = shards, seq_len
        self.index = [
            (i, j * seq_len) for i, s in enumerate(shards) for j in range((len(s) - 1) // seq_len)
        ]
        if max_windows is not None:
            self.index = self.index[:max_windows]
        if not self.index:
            raise LMForgeError(
                f"validation split is shorter than seq_len={seq_len} + 1 tokens:"
                " lower data.seq_len or raise data.prepare.val_fraction"
            )

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard, off = self.index[i]
        t = torch.from_numpy(self.shards[shard][off : off + self.seq_len + 1].astype(np.int64))
        return t[:-1], t[1:]


class RankShard(Dataset):
    """Rank ``rank``'s share of a validation set: items rank, rank + W, rank + 2W, ...

    Every item goes to exactly one rank. Ranks short of ``ceil(N / W)`` items get blank ones
    (every target ignored) so that all ranks run the same number of forward passes (sharded
    models all-gather in each); blanks add nothing to token-weighted sums. Lightning's
    DistributedSampler would instead repeat real items, counting them twice.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.n = len(dataset)

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def __getitem__(self, i: int):
        j = self.rank + i * self.world_size
        if j < self.n:
            return self.dataset[j]
        return blank(self.dataset[0])


def blank(sample):
    """``sample`` with every target ignored (-100): a dict's ``labels``, or the target of an
    (input, target) pair, a tensor, a list of token labels or a class index; an object with a
    ``blank`` method (a preference pair) makes its own."""
    if hasattr(sample, "blank"):
        return sample.blank()
    if isinstance(sample, dict):
        return sample | {"labels": torch.full_like(sample["labels"], -100)}
    x, y = sample
    if isinstance(y, int):
        return x, -100
    if isinstance(y, list):
        return x, [-100] * len(y)
    return x, torch.full_like(y, -100)


def step_generator(*key: int) -> torch.Generator:
    """A torch generator seeded from a tuple of integers (seed, rank, step, ...)."""
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1)
    )


class MLMBatches(StepStream):
    """Endless masked-LM batches: ``[CLS] window [SEP]`` packed from consecutive documents.

    Yields dicts of ``input_ids``, ``labels`` (-100 where not selected) and ``token_type_ids``;
    the mask of each row of the global batch is drawn from ``(seed, s, row)``, so masks, like
    windows, do not depend on how the global batch is split across ranks.
    """

    def __init__(self, windows: RandomWindows, masker, cls_id: int, sep_id: int) -> None:
        self.windows, self.masker, self.cls_id, self.sep_id = windows, masker, cls_id, sep_id
        self.start_step = windows.start_step

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        x, _ = self.windows.batch(step)
        w = self.windows
        rows = [step_generator(w.seed, step, w.first_row + i) for i in range(x.size(0))]
        return mlm_sample(x, self.masker, self.cls_id, self.sep_id, rows)


class MLMValWindows(Dataset):
    """The validation sweep for masked LM: fixed windows with fixed masks (seeded by index)."""

    def __init__(
        self, windows: SequentialWindows, masker, cls_id: int, sep_id: int, seed: int
    ) -> None:
        self.windows, self.masker, self.cls_id, self.sep_id, self.seed = (
            windows,
            masker,
            cls_id,
            sep_id,
            seed,
        )

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, _ = self.windows[i]
        sample = mlm_sample(
            x[None], self.masker, self.cls_id, self.sep_id, step_generator(self.seed, i)
        )
        return {k: v[0] for k, v in sample.items()}


def mlm_sample(
    x: torch.Tensor,
    masker,
    cls_id: int,
    sep_id: int,
    generator: torch.Generator | list[torch.Generator],
) -> dict:
    B = x.size(0)
    ids = torch.cat([torch.full((B, 1), cls_id), x, torch.full((B, 1), sep_id)], dim=1)  # (B, T)
    token_types = torch.zeros_like(ids)
    if masker.cfg.two_segments:
        seps = (ids == sep_id).long().cumsum(1)
        token_types = ((seps - (ids == sep_id).long()) > 0).long()  # after the first [SEP]
    input_ids, labels = masker(ids, generator)
    return {"input_ids": input_ids, "labels": labels, "token_type_ids": token_types}
