"""Causal language modelling: next-token prediction with a GPT."""

from __future__ import annotations

import torch
from torchmetrics.aggregation import MeanMetric

from lmforge.models.gpt import GPT, GPTConfig
from lmforge.tasks.base import LMTask, token_loss
from lmforge.tasks.optim import OptimConfig


class CausalLMTask(LMTask):
    """Cross-entropy on next tokens; logs train/loss, val/loss, val/ppl and tokens seen."""

    def __init__(self, model: GPTConfig | dict, optim: OptimConfig | dict | None = None) -> None:
        super().__init__()
        model_cfg = model if isinstance(model, GPTConfig) else GPTConfig(**model)
        self.optim = optim if isinstance(optim, OptimConfig) else OptimConfig(**(optim or {}))
        self.save_config(model_cfg, optim=self.optim)
        self.model = GPT(model_cfg)
        self.val_loss = MeanMetric()  # token-weighted: update(mean, weight=n_tokens)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss_sum, n = token_loss(self.model(x), y)
        self.count_tokens(x.numel())
        return self.step_loss(loss_sum, n, scale=y.numel())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss_sum, n = token_loss(self.model(x), y)
        self.val_loss.update(loss_sum / n.clamp(min=1), weight=n)  # n = 0: a rank's blank window

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # reduced across ranks, weighted by tokens
        self.val_loss.reset()
        # The values are already reduced over ranks; sync_dist marks them so (a mean of equals).
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", loss.exp(), sync_dist=True)
