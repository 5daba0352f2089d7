"""Causal language modelling: next-token prediction with a GPT."""

from __future__ import annotations

import torch

from lmforge.data.datamodule import TokenDataModule
from lmforge.tasks.base import LMTask, Recipe, token_loss
from lmforge.tasks.config import CausalLMConfig


class CausalLMTask(LMTask):
    """Cross-entropy on next tokens; logs train/loss, val/loss, val/ppl and tokens seen."""

    config_class = CausalLMConfig

    def __init__(
        self, model, task: CausalLMConfig | dict | None = None, seed: int = 0, family: str = "gpt"
    ) -> None:
        super().__init__(task or CausalLMConfig(), seed)
        self.model = self.make_model(model, family)

    @classmethod
    def recipe(cls, run, ckpt_path: str | None) -> Recipe:
        dm = TokenDataModule(run.data, seed=run.cfg.seed)
        return cls.pretraining_recipe(run, ckpt_path, dm)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss_sum, n = token_loss(self.model(x), y)
        self.count_tokens(x.numel())
        return self.step_loss(loss_sum, n, scale=y.numel())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.update_val_loss(*token_loss(self.model(x), y))  # n = 0: a rank's blank window
