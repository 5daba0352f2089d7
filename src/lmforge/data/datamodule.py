"""LightningDataModule over a prepared token set: random windows to train, a fixed sweep to validate.

With ``masking`` set, batches are masked-LM batches (``[CLS] ... [SEP]``, dynamic 80/10/10
masking) for BERT-style pretraining; otherwise (x, y) next-token pairs for GPT-style models.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

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
    blank,
    document_starts,
    open_split,
)
from lmforge.data.instructions import Framing, read_records
from lmforge.data.masking import Masker, MaskingConfig
from lmforge.data.prepare import prepare, read_meta
from lmforge.data.prompts import PromptBatches, PromptDataConfig, PromptIndices, encode_prompts
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


class GlobalBatches(torch.utils.data.Sampler):
    """Training batches of a set of examples under data parallelism: one order of the examples
    for every rank, cut into global batches of ``batch_size`` x ``world_size``, of which rank r
    takes rows r*B ... (r+1)*B. A rank left without a row in the last, short global batch gets
    one blank (index -1: its targets ignored), so every rank runs as many steps. Two ranks of
    batch B thus train on exactly the examples one process of batch 2B does, step by step.

    The order is the one ``DataLoader(shuffle=True, generator=generator)`` gives on one process
    (the loader is handed the same generator and draws its workers' base seed from it first;
    torch's RandomSampler then draws a permutation and a second, unused one each pass), or, with
    ``weights``, sampling with replacement as ``WeightedRandomSampler`` with its own generator.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
        weights: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.rank, self.world_size, self.weights = rank, world_size, weights
        self.weights_generator = torch.Generator().manual_seed(seed)
        self.skip = 0  # batches of the next pass already trained on (a resumed run)

    def resume(self, epochs: int, batches: int) -> None:
        """Continue a run that trained ``epochs`` whole passes and ``batches`` batches of the
        next: the generators move past what those passes drew (the loader's base seed, then
        this sampler's draws) and the next pass starts at its batch ``batches``."""
        for _ in range(epochs):
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # base seed
            if self.weights is not None:
                torch.multinomial(self.weights, self.n, True, generator=self.weights_generator)
            else:
                torch.randperm(self.n, generator=self.generator)
                torch.randperm(self.n, generator=self.generator)
        self.skip = batches

    def __len__(self) -> int:
        return -(-self.n // (self.batch_size * self.world_size))

    def __iter__(self):
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, True, generator=self.weights_generator)
        else:
            order = torch.randperm(self.n, generator=self.generator)
            torch.randperm(self.n, generator=self.generator)  # RandomSampler's unused second draw
        per, b = self.batch_size * self.world_size, self.batch_size
        skip, self.skip = self.skip, 0
        for start in range(skip * per, self.n, per):
            rows = order[start : start + per][self.rank * b : (self.rank + 1) * b].tolist()
            yield rows or [-1]


class WithBlanks(torch.utils.data.Dataset):
    """``dataset`` whose index -1 is a blank example: the first one with every target ignored."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i] if i >= 0 else blank(self.dataset[0])


class ExamplesDataModule(L.LightningDataModule):
    """What the data modules of tokenized examples (classification, instructions) share: each
    rank's batches of one global order (``GlobalBatches``), and each example of the validation
    and test splits on exactly one rank (``RankShard``, blanks where a rank runs short)."""

    config: Any
    sets: dict

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _train_loader(self, data, collate_fn, weights: torch.Tensor | None = None) -> DataLoader:
        rank, world = self._rank()
        generator = torch.Generator().manual_seed(self.seed)
        batches = GlobalBatches(
            len(data), self.config.batch_size, generator, rank, world, weights, self.seed
        )
        if self.trainer is not None and self.trainer.global_step > 0:  # a resumed run: where it was
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
            batches.resume(self.trainer.current_epoch, done)
        return DataLoader(
            WithBlanks(data),
            batch_sampler=batches,
            generator=generator,
            collate_fn=collate_fn,
            num_workers=self.config.num_workers,
        )

    def _eval_loader(self, data, collate_fn) -> DataLoader:
        rank, world = self._rank()
        if world > 1:
            data = RankShard(data, rank, world)
        return DataLoader(
            data,
            batch_size=self.config.val_batch_size or self.config.batch_size,
            collate_fn=collate_fn,
            num_workers=self.config.num_workers,
        )

    def _collate(self):
        """The collate function of the module's batches (classification, preference pairs)."""
        raise NotImplementedError

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.sets["val"], self._collate())

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.sets:
            raise LMForgeError("no test split: set data.test")
        return self._eval_loader(self.sets["test"], self._collate())


class ClassificationDataModule(ExamplesDataModule):
    """Labelled examples for classification fine-tuning, tokenized with the model's tokenizer
    and framed as its family frames a text (``TextFrame``).

    ``labels``: the label set (discovered from the training file when not given, e.g. when a
    checkpoint brings its own).
    """

    def __init__(
        self,
        config,
        tokenizer,
        frame,
        seed: int = 1337,
        labels: list[str] | None = None,
    ) -> None:
        super().__init__()
        from lmforge.data.classification import read_examples

        self.config, self.tokenizer, self.frame, self.seed = config, tokenizer, frame, seed
        self.examples = {"train": read_examples(config.train, config)}
        self.labels = labels or sorted({label for _, label in self.examples["train"]})
        if len(self.labels) < 2:
            raise LMForgeError(
                f"{config.train} has a single label ({self.labels[0]!r}): nothing to classify"
            )
        self.pad_id = tokenizer.token_to_id(frame.pad) or 0
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
                examples, self.labels, self.tokenizer, self.frame, c, f"{path}"
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

    def _collate(self):
        return functools.partial(collate, pad_id=self.pad_id)

    def train_dataloader(self) -> DataLoader:
        data = self.sets["train"]
        weights = None
        if self.config.balance == "sampling":
            weights = self.class_weights()[torch.tensor(data.labels)]
        return self._train_loader(data, self._collate(), weights)


class FramedDataModule(ExamplesDataModule):
    """Records framed for a model's tokenizer (``lmforge.data.instructions.Framing``: its EOS,
    BOS, padding and chat template); ``settings``: what its ``tokenizer_config.json`` says."""

    def __init__(self, config, tokenizer, seed: int = 1337, settings=None) -> None:
        from lmforge.data.instructions import Framing

        super().__init__()
        self.config, self.tokenizer, self.seed = config, tokenizer, seed
        self.framing = Framing(tokenizer, config, settings)
        self.tokenizer_settings = self.framing.used_settings  # kept in checkpoints
        self.pad_id = self.framing.pad_id
        self.sets: dict = {}


class InstructionDataModule(FramedDataModule):
    """Instruction records tokenized with the model's tokenizer: padded (or packed) batches of
    ``input_ids``, ``labels`` (-100 on prompts and padding) and, packed, ``segments``.

    ``settings``: what the tokenizer's ``tokenizer_config.json`` says (special tokens, chat
    template); None for a tokenizer without one (GPT-2's, lmforge's own)."""

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
            examples, counts = encode_records(records, self.tokenizer, c, str(path), self.framing)
            done = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
            rank_zero_info(f"{split}: {len(examples)} examples" + (f" ({done})" if done else ""))
            self.sets[split] = (
                pack(examples, c.max_len, self.pad_id) if c.pack and split == "train" else examples
            )

    def train_dataloader(self) -> DataLoader:
        from lmforge.data.instructions import pad_batch

        collate_fn = (
            torch.utils.data.default_collate
            if self.config.pack
            else functools.partial(pad_batch, pad_id=self.pad_id)
        )
        return self._train_loader(self.sets["train"], collate_fn)

    def val_dataloader(self) -> DataLoader:
        from lmforge.data.instructions import pad_batch

        return self._eval_loader(self.sets["val"], functools.partial(pad_batch, pad_id=self.pad_id))


class PreferenceDataModule(FramedDataModule):
    """Preference pairs (``data/preferences.py``) tokenized with the model's tokenizer
    (``settings``: its ``tokenizer_config.json``, or ``preferences.frame_settings``; None: GPT-2's
    conventions): batches of ``pad_pairs``. Training batches follow one seeded global order
    split over the ranks (``GlobalBatches``); each validation and test pair is on one rank."""

    def setup(self, stage: str | None = None) -> None:
        from lmforge.data.preferences import encode_pairs, read_pairs

        if self.sets:
            return
        c = self.config
        files = {"train": c.train, "val": c.val} | ({"test": c.test} if c.test else {})
        for split, path in files.items():
            pairs, counts = encode_pairs(read_pairs(path), self.framing, c, str(path))
            done = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
            rank_zero_info(
                f"{split}: {len(pairs)} preference pairs" + (f" ({done})" if done else "")
            )
            self.sets[split] = pairs

    def _collate(self):
        from lmforge.data.preferences import pad_pairs

        return functools.partial(pad_pairs, pad_id=self.pad_id)

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.sets["train"], self._collate())


class PromptDataModule(L.LightningDataModule):
    """Training prompts as ``PromptBatches``, held-out prompts as index batches (each on one
    rank). ``block_size``: the policy's context; ``iterations``: optimizer steps per rollout."""

    def __init__(
        self,
        config: PromptDataConfig,
        tokenizer,
        block_size: int,
        seed: int = 1337,
        iterations: int = 1,
        settings=None,
    ) -> None:
        super().__init__()
        self.config, self.tokenizer, self.seed = config, tokenizer, seed
        self.block_size, self.iterations = block_size, iterations
        self.framing = Framing(tokenizer, config, settings)
        self.tokenizer_settings = self.framing.used_settings  # kept in checkpoints
        self.prompts: dict[str, list] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.prompts:
            return
        c = self.config
        for split, path in (("train", c.train), ("val", c.val)):
            prompts, counts = encode_prompts(
                read_records(path), self.framing, self.block_size, c.too_long, str(path)
            )
            if split == "val" and c.max_val_prompts:
                prompts = prompts[: c.max_val_prompts]
            done = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
            rank_zero_info(f"{split}: {len(prompts)} prompts" + (f" ({done})" if done else ""))
            self.prompts[split] = prompts

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        accumulate = self.trainer.accumulate_grad_batches if self.trainer else 1
        start = self.trainer.global_step * accumulate if self.trainer else 0
        stream = PromptBatches(
            len(self.prompts["train"]),
            self.config.batch_size,
            self.seed,
            accumulate,
            self.iterations,
            rank,
            world,
            start_step=start,
        )
        return DataLoader(stream, batch_size=None, num_workers=self.config.num_workers)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        data = PromptIndices(len(self.prompts["val"]))
        if world > 1:
            data = RankShard(data, rank, world)
        return DataLoader(
            data,
            batch_size=self.config.val_batch_size or self.config.batch_size,
            num_workers=self.config.num_workers,
        )
