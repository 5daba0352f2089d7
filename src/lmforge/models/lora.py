"""Low-rank adapters (LoRA, Hu et al. 2021) on the linear layers of our models, plain torch.

``add_lora(model, targets=("qkv", "proj", "fc"), rank=8, alpha=16)`` replaces every matching
``nn.Linear`` by a ``LoRALinear``: the frozen base layer plus ``B @ A`` scaled by alpha / rank,
with ``B`` zero at the start so the adapted model begins exactly where the base model was.
``merge_lora(model)`` folds the adapters into the base weights and puts plain ``nn.Linear`` back,
for export. ``adapters_off(model)`` runs the base model without a second copy of it (a DPO
reference).

Why not ``peft``: it would bring transformers and accelerate into the core install, and its
adapters rename the wrapped weights (``...qkv.base_layer.weight``), so checkpoints of adapted
models would no longer load into our plain modules; the ~50 lines here keep the base layer's
own names (``qkv.weight``) and merge exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoRAConfig:
    """Low-rank adapters of a fine-tune (``task.lora``)."""

    rank: int = 0  # 0: no adapters, fine-tune the weights themselves
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["qkv", "attn.proj", "mlp.fc", "mlp.proj"])

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"task.lora.rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"task.lora.dropout must be in [0, 1), got {self.dropout}")

    def apply(self, model: nn.Module) -> int:
        """Wrap ``model``'s target layers in adapters (nothing when ``rank`` is 0); returns how
        many were wrapped."""
        if self.rank == 0:
            return 0
        return add_lora(model, self.targets, self.rank, self.alpha, self.dropout)


class LoRALinear(nn.Module):
    enabled = True  # False: the base layer alone (``adapters_off``)

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the base layer's own parameters
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_a = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_b = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear; B = 0
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight, self.bias)
        if not self.enabled:
            return out
        return out + (self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.weight.size(1), self.weight.size(0), bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scale * self.lora_b @ self.lora_a)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.to(self.weight.device, self.weight.dtype)


def add_lora(
    model: nn.Module, targets: Iterable[str], rank: int, alpha: float, dropout: float = 0.0
) -> int:
    """Wrap the ``nn.Linear`` layers of the transformer blocks whose name ends in one of
    ``targets`` (``qkv``, ``attn.proj``, ``mlp.fc``, ``proj`` for both projections, ...);
    returns how many were wrapped. Every other parameter of ``model`` is frozen: the adapters
    are what trains."""
    targets = tuple(targets)
    model.requires_grad_(False)
    wrapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if (
                isinstance(child, nn.Linear)
                and full.startswith("blocks.")
                and any(full == t or full.endswith("." + t) for t in targets)
            ):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                wrapped += 1
    return wrapped


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` computing with its base weights alone while the block runs: every adapter
    skipped, then put back as it was (also when the block fails)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(layers, before, strict=True):
            m.enabled = was


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weights, in place; returns ``model``."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model
