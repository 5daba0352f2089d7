"""LightningDataModule over a prepared token set: random windows to train, a fixed sweep to validate."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from lmforge.data.config import DataConfig
from lmforge.data.datasets import RandomWindows, SequentialWindows, document_starts, open_split
from lmforge.data.prepare import prepare, read_meta
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import LMForgeError


class TokenDataModule(L.LightningDataModule):
    def __init__(self, config: DataConfig, seed: int = 1337) -> None:
        super().__init__()
        self.config = config
        self.seed = seed
        self.train_set: RandomWindows | None = None
        self.val_set: SequentialWindows | None = None

    def prepare_data(self) -> None:
        if self.config.prepare is not None:
            prepare(self.config.prepare, self.config.dir)

    @functools.cached_property
    def meta(self) -> dict:
        return read_meta(self.config.dir)

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(Path(self.config.dir) / self.meta["tokenizer"]["file"])

    def setup(self, stage: str | None = None) -> None:
        c = self.config
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if stage in ("fit", None):
            starts = document_starts(c.dir, "train") if c.align_to_documents else None
            self.train_set = RandomWindows(
                open_split(c.dir, "train"),
                c.seq_len,
                c.batch_size,
                self.seed,
                rank,
                doc_starts=starts,
            )
        self.val_set = SequentialWindows(open_split(c.dir, "val"), c.seq_len, c.max_val_windows)

    def _pin(self) -> bool:
        return (
            self.config.pin_memory
            and self.trainer is not None
            and self.trainer.strategy.root_device.type == "cuda"
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise LMForgeError("TokenDataModule.setup('fit') must run before train_dataloader()")
        if self.trainer is not None:
            # Restart the stream where a resumed run left off.
            self.train_set.start_step = (
                self.trainer.global_step * self.trainer.accumulate_grad_batches
            )
        return DataLoader(
            self.train_set,
            batch_size=None,
            num_workers=self.config.num_workers,
            pin_memory=self._pin(),
            persistent_workers=self.config.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.config.val_batch_size or self.config.batch_size,
            shuffle=False,
            num_workers=self.config.num_workers,
            pin_memory=self._pin(),
        )
