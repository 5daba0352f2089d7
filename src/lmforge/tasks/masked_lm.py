"""Masked language modelling: BERT-style pretraining with dynamic 80/10/10 masking."""

from __future__ import annotations

import torch
from torchmetrics.aggregation import MeanMetric

from lmforge.data.masking import MaskingConfig
from lmforge.models.bert import Bert, BertConfig
from lmforge.tasks.base import LMTask, token_loss
from lmforge.tasks.optim import OptimConfig


class MaskedLMTask(LMTask):
    """Cross-entropy over the masked positions only, normalised by the masked tokens of the step.

    The MLM head runs on the masked positions alone (sparse prediction): no vocabulary-sized
    logits for the ~85% of positions that carry no label.
    """

    def __init__(
        self,
        model: BertConfig | dict,
        optim: OptimConfig | dict | None = None,
        masking: MaskingConfig | dict | None = None,
    ) -> None:
        super().__init__()
        model_cfg = model if isinstance(model, BertConfig) else BertConfig(**model)
        self.optim = optim if isinstance(optim, OptimConfig) else OptimConfig(**(optim or {}))
        self.masking = (
            masking if isinstance(masking, MaskingConfig) else MaskingConfig(**(masking or {}))
        )
        self.save_config(model_cfg, optim=self.optim, masking=self.masking)
        self.model = Bert(model_cfg)
        # MLM does not train the pooler (classification fine-tuning does); frozen, DDP needs no
        # unused-parameter search and the optimizer holds no state for it.
        self.model.pooler.requires_grad_(False)
        self.val_loss = MeanMetric()
        self.val_acc = MeanMetric()

    def mlm_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed loss, masked-token count, correct predictions) of a batch."""
        labels = batch["labels"]
        hidden = self.model(
            batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids")
        )
        selected = labels != -100
        logits = self.model.mlm_logits(hidden, selected)  # (N, vocab_size)
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
        self.val_loss.update(loss_sum / n.clamp(min=1), weight=n)  # n = 0 adds nothing
        self.val_acc.update(correct / n.clamp(min=1), weight=n)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # reduced across ranks, weighted by masked tokens
        acc = self.val_acc.compute()
        self.val_loss.reset()
        self.val_acc.reset()
        # The values are already reduced over ranks; sync_dist marks them so (a mean of equals).
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", loss.exp(), sync_dist=True)
        self.log("val/mlm_acc", acc, prog_bar=True, sync_dist=True)
