"""LightningDataModule over a prepared token set: random windows to train, a fixed sweep to validate.

With ``masking`` set, batches are masked-LM batches (``[CLS] ... [SEP]``, dynamic 80/10/10
masking) for BERT-style pretraining; otherwise (x, y) next-token pairs for GPT-style models.
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lmforge.data.classification import collate
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


class ClassificationDataModule(L.LightningDataModule):
    """Labelled examples for classification fine-tuning, tokenized with the model's tokenizer.

    ``labels``: the label set (discovered from the training file when not given, e.g. when a
    checkpoint brings its own).
    """

    def __init__(
        self,
        config,
        tokenizer,
        family: str,
        seed: int = 1337,
        labels: list[str] | None = None,
    ) -> None:
        super().__init__()
        from lmforge.data.classification import read_examples

        self.config, self.tokenizer, self.family, self.seed = config, tokenizer, family, seed
        self.examples = {"train": read_examples(config.train, config)}
        self.labels = labels or sorted({label for _, label in self.examples["train"]})
        if len(self.labels) < 2:
            raise LMForgeError(
                f"{config.train} has a single label ({self.labels[0]!r}): nothing to classify"
            )
        pad = "[PAD]" if family == "bert" else "<|endoftext|>"
        self.pad_id = tokenizer.token_to_id(pad) or 0
        self.sets: dict = {}

    def setup(self, stage: str | None = None) -> None:
        from lmforge.data.classification import encode, read_examples

        c = self.config
        if self.sets:
            return
        files = {"train": c.train, "val": c.val} | ({"test": c.test} if c.test else {})
        for split, path in files.items():
            examples = self.examples.get(split) or read_examples(path, c)
            self.sets[split], counts = encode(
                examples, self.labels, self.tokenizer, self.family, c, f"{path}"
            )
            if counts:
                done = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
                rank_zero_info(f"{split}: {len(self.sets[split])} examples ({done})")
        self.class_counts = torch.bincount(
            torch.tensor(self.sets["train"].labels), minlength=len(self.labels)
        )

    def class_weights(self) -> torch.Tensor:
        """Loss weights inverse to class frequency, averaging 1 over the training examples."""
        counts = self.class_counts.float().clamp(min=1)
        return counts.sum() / (len(counts) * counts)

    def _loader(self, split: str, train: bool) -> DataLoader:
        c = self.config
        data = self.sets[split]
        sampler = None
        if train and c.balance == "sampling":
            weights = self.class_weights()[torch.tensor(data.labels)]
            sampler = torch.utils.data.WeightedRandomSampler(
                weights, len(data), generator=torch.Generator().manual_seed(self.seed)
            )
        return DataLoader(
            data,
            batch_size=c.batch_size if train else (c.val_batch_size or c.batch_size),
            shuffle=train and sampler is None,
            sampler=sampler,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            collate_fn=functools.partial(collate, pad_id=self.pad_id),
            num_workers=c.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.sets:
            raise LMForgeError("no test split: set data.test")
        return self._loader("test", False)


class InstructionDataModule(L.LightningDataModule):
    """Instruction records tokenized with the model's tokenizer: padded (or packed) batches of
    ``input_ids``, ``labels`` (-100 on prompts and padding) and, packed, ``segments``."""

    def __init__(self, config, tokenizer, seed: int = 1337) -> None:
        super().__init__()
        self.config, self.tokenizer, self.seed = config, tokenizer, seed
        self.pad_id = tokenizer.token_to_id("<|endoftext|>") or 0
        self.sets: dict = {}

    def setup(self, stage: str | None = None) -> None:
        from lmforge.data.instructions import encode_records, pack, read_records

        if self.sets:
            return
        c = self.config
        self.val_records = read_records(c.val)
        for split, path, records in (
            ("train", c.train, read_records(c.train)),
            ("val", c.val, self.val_records),
        ):
            examples, counts = encode_records(records, self.tokenizer, c, str(path))
            done = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
            rank_zero_info(f"{split}: {len(examples)} examples" + (f" ({done})" if done else ""))
            self.sets[split] = (
                pack(examples, c.max_len, self.pad_id) if c.pack and split == "train" else examples
            )

    def train_dataloader(self) -> DataLoader:
        from lmforge.data.instructions import pad_batch

        c = self.config
        collate_fn = (
            torch.utils.data.default_collate
            if c.pack
            else functools.partial(pad_batch, pad_id=self.pad_id)
        )
        return DataLoader(
            self.sets["train"],
            batch_size=c.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=collate_fn,
            num_workers=c.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        from lmforge.data.instructions import pad_batch

        c = self.config
        return DataLoader(
            self.sets["val"],
            batch_size=c.val_batch_size or c.batch_size,
            collate_fn=functools.partial(pad_batch, pad_id=self.pad_id),
            num_workers=c.num_workers,
        )
