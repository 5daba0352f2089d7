"""Masked language modelling: BERT-style pretraining with dynamic 80/10/10 masking."""

from __future__ import annotations

import torch
from torchmetrics.aggregation import MeanMetric

from lmforge.data.datamodule import TokenDataModule
from lmforge.tasks.base import LMTask, Recipe, token_loss
from lmforge.tasks.config import MaskedLMConfig


class MaskedLMTask(LMTask):
    """Cross-entropy over the masked positions only, normalised by the masked tokens of the step.

    The MLM head runs on the masked positions alone (sparse prediction): no vocabulary-sized
    logits for the ~85% of positions that carry no label.
    """

    config_class = MaskedLMConfig

    def __init__(
        self, model, task: MaskedLMConfig | dict | None = None, seed: int = 0, family: str = "bert"
    ) -> None:
        super().__init__(task or MaskedLMConfig(), seed)
        self.masking = self.task.masking
        self.model = self.make_model(model, family)
        # MLM does not train the pooler (classification fine-tuning does); frozen, DDP needs no
        # unused-parameter search and the optimizer holds no state for it.
        self.model.pooler.requires_grad_(False)
        self.val_acc = MeanMetric()

    @classmethod
    def recipe(cls, run, ckpt_path: str | None) -> Recipe:
        dm = TokenDataModule(run.data, seed=run.cfg.seed, masking=run.task.masking)
        return cls.pretraining_recipe(run, ckpt_path, dm)

    def mlm_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed loss, masked-token count, correct predictions) of a batch."""
        labels = batch["labels"]
        hidden = self.model.hidden(
            batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids")
        )
        selected = labels != -100
        logits = self.model.lm_logits(hidden, selected)  # (N, vocab_size)
        targets = labels[selected]
        loss_sum, n = token_loss(logits, targets)
        correct = (logits.argmax(-1) == targets).sum()
        return loss_sum, n, correct

    def training_step(self, batch, batch_idx):
        loss_sum, n, _ = self.mlm_loss(batch)
        self.count_tokens(batch["input_ids"].numel())
        # scale: the expected masked tokens of a micro-batch, a constant of the run
        scale = max(1, round(batch["labels"].numel() * self.masking.mask_prob))
        return self.step_loss(loss_sum, n, scale=scale)

    def validation_step(self, batch, batch_idx):
        loss_sum, n, correct = self.mlm_loss(batch)
        self.update_val_loss(loss_sum, n)
        self.val_acc.update(correct / n.clamp(min=1), weight=n)

    def on_validation_epoch_end(self) -> None:
        self.log_val_loss()
        acc = self.val_acc.compute()
        self.val_acc.reset()
        self.log("val/mlm_acc", acc, prog_bar=True, sync_dist=True)
