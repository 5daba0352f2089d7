"""Causal language modelling: next-token prediction with a GPT."""

from __future__ import annotations

from dataclasses import asdict

import torch
from torchmetrics.aggregation import MeanMetric

from lmforge.models.gpt import GPT, GPTConfig
from lmforge.tasks.base import LMTask, OptimConfig, token_loss


class CausalLMTask(LMTask):
    """Cross-entropy on next tokens; logs train/loss, val/loss, val/ppl and tokens seen."""

    def __init__(self, model: GPTConfig | dict, optim: OptimConfig | dict | None = None) -> None:
        super().__init__()
        model_cfg = model if isinstance(model, GPTConfig) else GPTConfig(**model)
        self.optim = optim if isinstance(optim, OptimConfig) else OptimConfig(**(optim or {}))
        # Plain dicts only: checkpoints must load with torch.load(weights_only=True).
        init_fields = {
            k: v for k, v in asdict(model_cfg).items() if k not in ("padded_vocab_size", "head_dim")
        }
        self.save_hyperparameters({"model": init_fields, "optim": asdict(self.optim)})
        self.model = GPT(model_cfg)
        self.val_loss = MeanMetric()  # token-weighted: update(mean, weight=n_tokens)
        self.tokens_seen = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss_sum, n = token_loss(self.model(x), y)
        loss = loss_sum / n
        self.tokens_seen += x.numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens", float(self.tokens_seen))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss_sum, n = token_loss(self.model(x), y)
        self.val_loss.update(loss_sum / n, weight=n)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # reduced across ranks, weighted by tokens
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", loss.exp())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "tokenizer"):
            checkpoint["tokenizer"] = dm.tokenizer.to_str()  # the tokenizer travels with the model

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
