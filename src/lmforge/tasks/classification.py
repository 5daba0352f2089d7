"""Text classification fine-tuning: a linear head on a GPT or a BERT.

A GPT reads the text left to right, so its hidden state at the last real token (the
``<|endoftext|>`` appended to every text) has seen all of it; a BERT's ``[CLS]`` goes through its
pooler. Cross-entropy, normalised by the examples (class-weighted when ``class_weights`` is set)
of the whole optimizer step. Either everything is trained, only the last ``train_last_blocks``
blocks (plus the final norm and the head), or, with ``lora.rank`` > 0, only low-rank adapters
and the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from lmforge.data.datamodule import ClassificationDataModule
from lmforge.errors import LMForgeError
from lmforge.models.registry import family as get_family
from lmforge.run import pretrained_model
from lmforge.tasks.base import LMTask, Recipe
from lmforge.tasks.config import ClassificationConfig


def metrics(n: int) -> MetricCollection:
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(n, average="micro"),
            "f1_macro": MulticlassF1Score(n, average="macro"),
            "precision": MulticlassPrecision(n, average=None),
            "recall": MulticlassRecall(n, average=None),
            "confusion": MulticlassConfusionMatrix(n),
        }
    )


class ClassificationTask(LMTask):
    config_class = ClassificationConfig

    def __init__(
        self,
        model,
        family: str,
        labels: list[str],
        task: ClassificationConfig | dict | None = None,
        seed: int = 0,
        class_weights: list[float] | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(task or ClassificationConfig(), seed)
        self.labels = list(labels)
        self.batch_size = batch_size  # examples per micro-batch: the loss scale of every step
        self.model = self.make_model(model, family, labels=self.labels, class_weights=class_weights)
        self.model.remove_lm_head()  # pretraining's head; a linear head on features instead
        width = self.model.config.n_embd
        self.head = nn.Linear(width, len(labels))
        self.drop = nn.Dropout(self.model.config.dropout)
        self.register_buffer(
            "class_weights",
            torch.tensor(class_weights) if class_weights else torch.ones(len(labels)),
            persistent=False,
        )
        self._choose_trainable(self.task.train_last_blocks)
        self.val_metrics = metrics(len(labels))
        self.test_metrics = metrics(len(labels))

    @classmethod
    def recipe(cls, run, ckpt_path: str | None) -> Recipe:
        """Labelled data tokenized with the pretrained model's tokenizer, and a classifier on
        the model of ``init_from``."""
        loaded, config = pretrained_model(run, run.data.max_len)
        dm = ClassificationDataModule(run.data, loaded.tokenizer, loaded.family.frame, run.cfg.seed)
        dm.setup("fit")
        weights = dm.class_weights().tolist() if run.data.balance == "weights" else None
        module = cls(
            config,
            loaded.family.name,
            dm.labels,
            run.task,
            run.cfg.seed,
            weights,
            run.data.batch_size,
        )
        module.load_backbone(loaded.model.state_dict())
        rank_zero_info(f"classifier: labels {dm.labels}; {module.trained_share()}")
        return Recipe(
            module,
            dm,
            config,
            batch_size=run.data.batch_size,
            seq_len=run.data.max_len,
            test=run.data.test is not None,
        )

    def _choose_trainable(self, train_last_blocks: int | None) -> None:
        if self.task.lora.rank > 0:
            self.task.lora.apply(self.model)
            for module in self.model.pooling_modules():
                module.requires_grad_(True)
        elif train_last_blocks is not None:
            self.model.requires_grad_(False)
            for block in list(self.model.blocks)[len(self.model.blocks) - train_last_blocks :]:
                block.requires_grad_(True)
            for module in self.model.top_modules():
                module.requires_grad_(True)

    def load_backbone(self, state: dict) -> None:
        """Pretrained weights of the GPT / BERT (the LM head of a GPT is left out)."""
        own = self.model.state_dict()
        missing = [k for k in own if k not in state and "lora_" not in k]
        if missing:
            raise LMForgeError(f"the pretrained weights lack {', '.join(missing[:3])}")
        self.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token as for pretraining (6N + 12·L·H·Q·T, PaLM), N the matmul
        weights of the blocks; frozen weights skip their weight gradients, so with LoRA or frozen
        blocks this overcounts by up to a third."""
        c = self.model.config
        n = sum(p.numel() for name, p in self.model.blocks.named_parameters() if p.dim() == 2)
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def forward(self, batch: dict) -> torch.Tensor:
        """Class logits (B, n_classes)."""
        mask = batch["attention_mask"]
        features = self.model.sequence_features(self.model.hidden(batch["input_ids"], mask), mask)
        return self.head(self.drop(features))

    def training_step(self, batch, batch_idx):
        logits = self(batch)
        y = batch["labels"]
        real = y >= 0  # blanks (a rank's filler in the last global batch) weigh nothing
        w = torch.where(real, self.class_weights[y.clamp(min=0)], 0.0)
        loss = F.cross_entropy(logits.float(), y, reduction="none", ignore_index=-100)
        loss_sum = (loss * w).sum()
        self.count_tokens(batch["input_ids"].numel())
        return self.step_loss(loss_sum, w.sum(), scale=self.batch_size)

    def _eval_step(self, batch, collection: MetricCollection) -> None:
        real = batch["labels"] >= 0  # blanks: a rank's filler, counted nowhere
        collection.update(self(batch).argmax(-1)[real], batch["labels"][real])

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics)

    def _log_metrics(self, collection: MetricCollection, prefix: str) -> dict:
        values = collection.compute()
        collection.reset()
        self.log(f"{prefix}/acc", values["acc"], prog_bar=True, sync_dist=True)
        self.log(f"{prefix}/f1_macro", values["f1_macro"], sync_dist=True)
        for i, label in enumerate(self.labels):
            self.log(f"{prefix}/precision_{label}", values["precision"][i], sync_dist=True)
            self.log(f"{prefix}/recall_{label}", values["recall"][i], sync_dist=True)
        confusion = values["confusion"].tolist()
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and self.trainer.is_global_zero:
                logger.log_table(
                    key=f"{prefix}/confusion",
                    columns=["true \\ predicted", *self.labels],
                    data=[[label, *row] for label, row in zip(self.labels, confusion, strict=True)],
                )
        return {"confusion": confusion}

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self.test_confusion = self._log_metrics(self.test_metrics, "test")["confusion"]

    @torch.no_grad()
    def predict_texts(self, texts: list[str], tokenizer, max_len: int = 128) -> list[str]:
        """The predicted label of each text."""
        from lmforge.data.classification import ClassificationDataConfig, collate, encode

        cfg = ClassificationDataConfig(train="", val="", max_len=max_len)
        frame = get_family(self.hparams["family"]).frame
        data, _ = encode(
            [(t, self.labels[0]) for t in texts], self.labels, tokenizer, frame, cfg, "texts"
        )
        pad = tokenizer.token_to_id(frame.pad) or 0
        batch = collate([data[i] for i in range(len(data))], pad)
        was = self.training
        self.eval()
        try:
            logits = self(batch)
        finally:
            self.train(was)
        return [self.labels[i] for i in logits.argmax(-1).tolist()]
