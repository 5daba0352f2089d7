"""What every lmforge task shares: optimizer groups, the learning-rate schedule, token losses."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from lmforge.tasks.optim import OptimConfig, lr_at


def token_loss(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over real target tokens, and their count.

    Dividing the sums accumulated over micro-batches (and ranks) by the summed counts gives the
    token-weighted mean, which a mean of per-batch means does not when batches hold different
    numbers of real tokens.
    """
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    return loss_sum, (targets != ignore_index).sum()


class LMTask(L.LightningModule):
    """Base LightningModule: subclasses set ``self.model`` and ``self.optim``."""

    model: torch.nn.Module
    optim: OptimConfig

    def param_groups(self) -> list[dict]:
        """Weight decay for matrices (embeddings as ``decay_embeddings`` says); none for biases and norms."""
        embeddings = {
            id(m.weight) for m in self.model.modules() if isinstance(m, torch.nn.Embedding)
        }
        decay, no_decay = [], []
        for _, p in self.model.named_parameters():  # tied weights appear once
            if p.requires_grad:
                is_matrix = p.dim() >= 2 and (
                    self.optim.decay_embeddings or id(p) not in embeddings
                )
                (decay if is_matrix else no_decay).append(p)
        rank_zero_info(
            f"optimizer groups: {len(decay)} tensors / {sum(p.numel() for p in decay):,} params with "
            f"weight decay {self.optim.weight_decay}; {len(no_decay)} tensors / "
            f"{sum(p.numel() for p in no_decay):,} params without"
        )
        return [
            {"params": decay, "weight_decay": self.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def total_steps(self) -> int:
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return int(self.trainer.estimated_stepping_batches)

    def configure_optimizers(self):
        c = self.optim
        fused = next(self.model.parameters()).is_cuda
        opt = torch.optim.AdamW(
            self.param_groups(), lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps, fused=fused
        )
        total = self.total_steps()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, c, total) / c.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
