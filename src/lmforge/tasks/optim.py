"""Optimizer settings and the learning-rate schedule (no Lightning: cheap to import and validate)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.errors import LMForgeError


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then cosine decay to ``min_lr``."""

    lr: float = 6e-4  # peak learning rate, reached at the end of warmup
    min_lr: float = 6e-5  # floor of the cosine decay
    warmup_steps: int = 100  # optimizer steps of linear warmup from 0
    decay_steps: int | None = (
        None  # step at which min_lr is reached (default: the run's total steps)
    )
    weight_decay: float = 0.1  # applied to matrices only (not biases, norms)
    decay_embeddings: bool = True  # also decay embedding matrices (and a head tied to them)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise LMForgeError(f"task.optim.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise LMForgeError(f"task.optim.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise LMForgeError(f"task.optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise LMForgeError(f"task.optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise LMForgeError(
                    f"task.optim.{name} must be in [0, 1), got {getattr(self, name)}"
                )


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate after ``step`` optimizer steps: linear warmup, cosine to ``min_lr``, then flat."""
    decay_steps = cfg.decay_steps or total_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
