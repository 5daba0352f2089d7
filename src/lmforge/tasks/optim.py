"""Optimizer settings and the learning-rate schedule (no Lightning: cheap to import and validate).

Two choices from the modded-nanogpt speedrun recipe: ``optimizer: muon`` (Muon on the hidden
matrices of the transformer blocks, AdamW on the rest) and ``schedule: wsd`` (warmup, a constant
learning rate, then a short decay at the end of the run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.errors import LMForgeError

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")
MUON_LR_ADJUSTMENTS = ("original", "match_rms_adamw")


@dataclass
class OptimConfig:
    """AdamW (or Muon on the block matrices) with linear warmup, then cosine decay to ``min_lr``
    (or warmup-stable-decay)."""

    optimizer: str = "adamw"  # adamw | muon (Muon on block matrices, AdamW on the rest)
    schedule: str = "cosine"  # cosine | wsd (warmup, constant, decay over the last decay_fraction)

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
    decay_fraction: float = 0.2  # wsd: the share of the run (up to decay_steps) spent decaying
    decay_shape: str = "linear"  # wsd: linear | 1-sqrt, the shape of the final decay
    muon_lr: float = 0.02  # muon: peak learning rate of the block matrices
    muon_momentum: float = 0.95  # muon: Nesterov momentum
    muon_weight_decay: float | None = None  # muon: decoupled, times the lr (null: weight_decay)
    muon_adjust_lr: str = "original"  # muon: per-shape lr scale: original | match_rms_adamw

    def __post_init__(self) -> None:
        for name, allowed in (
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("decay_shape", DECAY_SHAPES),
            ("muon_adjust_lr", MUON_LR_ADJUSTMENTS),
        ):
            if getattr(self, name) not in allowed:
                raise LMForgeError(
                    f"task.optim.{name} must be one of {', '.join(allowed)},"
                    f" got {getattr(self, name)!r}"
                )
        if not 0 < self.decay_fraction <= 1:
            raise LMForgeError(
                f"task.optim.decay_fraction must be in (0, 1], got {self.decay_fraction}"
            )
        if self.muon_lr <= 0:
            raise LMForgeError(f"task.optim.muon_lr must be positive, got {self.muon_lr}")
        if not 0 <= self.muon_momentum < 1:
            raise LMForgeError(
                f"task.optim.muon_momentum must be in [0, 1), got {self.muon_momentum}"
            )
        if self.muon_weight_decay is not None and self.muon_weight_decay < 0:
            raise LMForgeError(
                f"task.optim.muon_weight_decay must be >= 0 or null, got {self.muon_weight_decay}"
            )
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
    """Learning rate after ``step`` optimizer steps: linear warmup, then cosine to ``min_lr``
    (``wsd``: constant, then over the last ``decay_fraction`` of the ``decay_steps`` down to
    ``min_lr``, linearly or as 1 - sqrt), then flat."""
    decay_steps = cfg.decay_steps or total_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= decay_steps:
        return cfg.min_lr
    if cfg.schedule == "wsd":
        length = cfg.decay_fraction * decay_steps
        progress = max(0.0, (step - (decay_steps - length)) / length)
        shape = progress if cfg.decay_shape == "linear" else math.sqrt(progress)
        return cfg.lr - shape * (cfg.lr - cfg.min_lr)
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
