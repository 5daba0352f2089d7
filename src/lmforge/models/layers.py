"""Building blocks shared by every model family: the one attention module, the MLP, rotary,
the shape checks of a config and the initialisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys and values of the positions already seen, one entry per layer, for incremental decoding."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def seq_len(self) -> int:
        return 0 if not self.layers else self.layers[0][0].size(2)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.layers:
            k_old, v_old = self.layers[layer]
            k, v = torch.cat([k_old, k], dim=2), torch.cat([v_old, v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


def rotary_tables(
    head_dim: int, max_len: int, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for rotary position embeddings (half-split layout, as in GPT-NeoX/Llama)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, n_head, T, head_dim) by the tables sliced to its positions (T, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention on ``F.scaled_dot_product_attention``.

    The one attention module of lmforge: causal for GPT (``is_causal``), bidirectional with a
    padding mask for BERT. On CUDA with bf16/fp16 and no explicit mask, SDPA dispatches to the
    flash kernel.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        causal: bool,
        attn_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        past: int = 0,
    ) -> torch.Tensor:
        """``past`` is the number of positions already in ``cache`` before this forward pass."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            if cos.dim() == 2:  # the whole table: this pass's positions; else (B, 1, T, D) given
                cos, sin = cos[past : past + T], sin[past : past + T]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_head, past + T, head_dim)
        if causal and attn_mask is not None:
            causal = False  # the mask given already holds the causal structure
        if causal and past > 0:
            # Queries sit at positions past..past+T-1 and see every key up to their own position.
            if T > 1:
                attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            causal = False
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and attn_mask is None,
        )  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Two linear layers with a GELU between them, 4x wide by default."""

    def __init__(
        self,
        n_embd: int,
        hidden: int,
        dropout: float = 0.0,
        bias: bool = True,
        approximate: str = "none",
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.act = nn.GELU(approximate=approximate)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


def check_config(config, positive: tuple[str, ...]) -> None:
    """The checks every model config shares; sets the derived ``padded_vocab_size`` and
    ``head_dim``. Raises ValueError naming the config class and the field."""
    name = type(config).__name__
    for field in positive:
        if getattr(config, field) <= 0:
            raise ValueError(f"{name}.{field} must be positive, got {getattr(config, field)}")
    if config.n_embd % config.n_head:
        raise ValueError(
            f"{name}: n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})"
        )
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"{name}.dropout must be in [0, 1), got {config.dropout}")
    m = config.pad_vocab_multiple
    config.padded_vocab_size = (config.vocab_size + m - 1) // m * m
    config.head_dim = config.n_embd // config.n_head


def init_weights(model: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2 / BERT initialisation: linear and embedding weights normal(0, std), biases zero,
    norms one; the residual projections of each block (``attn.proj``, ``mlp.proj``) scaled by
    1/sqrt(2 * n_layer)."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for block in model.blocks:
        for proj in (block.attn.proj, block.mlp.proj):
            nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * n_layer))
