"""LightningDataModule over a prepared token set: random windows to train, a fixed sweep to validate.

With ``masking`` set, batches are masked-LM batches (``[CLS] ... [SEP]``, dynamic 80/10/10
masking) for BERT-style pretraining; otherwise (x, y) next-token pairs for GPT-style models.
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lmforge.data.config import DataConfig
from lmforge.data.datasets import (
    MLMBatches,
    MLMValWindows,
    RandomWindows,
    RankShard,
    SequentialWindows,
    document_starts,
    open_split,
)
from lmforge.data.masking import Masker, MaskingConfig
from lmforge.data.prepare import prepare, read_meta
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import LMForgeError


class TokenDataModule(L.LightningDataModule):
    def __init__(
        self, config: DataConfig, seed: int = 1337, masking: MaskingConfig | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.seed = seed
        self.masking = masking
        self.train_set: RandomWindows | MLMBatches | None = None
        self.val_set: SequentialWindows | MLMValWindows | None = None

    def prepare_data(self) -> None:
        if self.config.prepare is not None:
            prepare(self.config.prepare, self.config.dir)

    @functools.cached_property
    def meta(self) -> dict:
        return read_meta(self.config.dir)

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(Path(self.config.dir) / self.meta["tokenizer"]["file"])

    def masker(self) -> tuple[Masker, int, int]:
        """The masker and the [CLS] / [SEP] ids, from the tokenizer's special tokens."""
        tok = self.tokenizer
        ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]", "[PAD]")}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise LMForgeError(
                f"the tokenizer of {self.config.dir} lacks {', '.join(missing)}: masked-LM data needs a"
                " WordPiece tokenizer (data.prepare.tokenizer.kind=wordpiece)"
            )
        vocab = tok.get_vocab()
        continuation = torch.zeros(tok.get_vocab_size(), dtype=torch.bool)
        continuation[[i for t, i in vocab.items() if t.startswith("##")]] = True
        specials = list(self.meta["special_tokens"].values())
        masker = Masker(self.masking, tok.get_vocab_size(), ids["[MASK]"], specials, continuation)
        return masker, ids["[CLS]"], ids["[SEP]"]

    def setup(self, stage: str | None = None) -> None:
        c = self.config
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        )
        # Masked-LM sequences hold [CLS] and [SEP] around the window.
        window = c.seq_len - 2 if self.masking else c.seq_len
        if stage in ("fit", None):
            starts = document_starts(c.dir, "train") if c.align_to_documents else None
            self.train_set = RandomWindows(
                open_split(c.dir, "train"),
                window,
                c.batch_size,
                self.seed,
                rank,
                world,
                doc_starts=starts,
            )
        self.val_set = SequentialWindows(open_split(c.dir, "val"), window, c.max_val_windows)
        if self.masking:
            masker, cls_id, sep_id = self.masker()
            if self.train_set is not None and not isinstance(self.train_set, MLMBatches):
                self.train_set = MLMBatches(self.train_set, masker, cls_id, sep_id)
            self.val_set = MLMValWindows(self.val_set, masker, cls_id, sep_id, self.seed)
        if world > 1:
            self.val_set = RankShard(self.val_set, rank, world)  # each window on one rank

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
