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
    head_dim: int, max_len: int, base: float = 10000.0, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for rotary position embeddings (half-split layout, as in GPT-NeoX/Llama).
    ``scaling``: Llama 3's frequency scaling (``llama3_frequencies``), or None."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, **scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def llama3_frequencies(
    inv_freq: torch.Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: float,
) -> torch.Tensor:
    """Llama 3.1's rotary frequencies for long contexts: wavelengths longer than the original
    context / ``low_freq_factor`` are stretched by ``factor``, those shorter than original /
    ``high_freq_factor`` kept, and the band between interpolated smoothly."""
    old = original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old / low_freq_factor, inv_freq / factor, inv_freq)
    medium = (wavelen >= old / high_freq_factor) & (wavelen <= old / low_freq_factor)
    return torch.where(medium, smoothed, scaled)


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

    Options of the modern decoders: ``n_kv_head`` < ``n_head`` shares each key/value head among
    ``n_head // n_kv_head`` query heads (grouped-query; 1: multi-query), and the cache keeps only
    the ``n_kv_head`` heads; ``head_dim`` apart from ``n_embd // n_head`` (Qwen3); ``qkv_bias``:
    biases on the query, key and value projections even when ``bias`` is off (Qwen2);
    ``qk_norm``: an RMSNorm over each head of the queries and keys before rotary (Qwen3,
    OLMo-2 style); ``window``: each query sees only the last ``window`` positions, itself
    included (Mistral's sliding window).
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        n_kv_head: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        window: int | None = None,
    ) -> None:
        super().__init__()
        if head_dim is None and n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head
        if n_head % self.n_kv_head:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        self.head_dim = head_dim or n_embd // n_head
        self.window = window
        q_size, kv_size = n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.sizes = (q_size, kv_size, kv_size)  # query, key, value rows of ``qkv``
        self.qkv = nn.Linear(n_embd, q_size + 2 * kv_size, bias=bias or qkv_bias)
        self.proj = nn.Linear(q_size, n_embd, bias=bias)
        if qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=norm_eps)
        else:
            self.q_norm = self.k_norm = None
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
        B, T, _ = x.shape
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split(self.sizes, dim=2)
        q = q.view(B, T, H, D)
        k = k.view(B, T, KV, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.view(B, T, KV, D).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            if cos.dim() == 2:  # the whole table: this pass's positions; else (B, 1, T, D) given
                cos, sin = cos[past : past + T], sin[past : past + T]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv_head, past + T, head_dim)
        if causal and self.window is not None and past + T > self.window:
            # Query i (at position past + i) sees keys j with i - window < j <= i.
            i = torch.arange(past, past + T, device=x.device)[:, None]
            j = torch.arange(past + T, device=x.device)[None, :]
            band = (j <= i) & (j > i - self.window)  # (T, past + T)
            attn_mask = band if attn_mask is None else attn_mask & band
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
            enable_gqa=KV != H,
        )  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)
        return self.resid_dropout(self.proj(y))


class ReLUSquared(nn.Module):
    """relu(x) ** 2, the activation of Primer and the modded-nanogpt speedrun."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    """Two linear layers with an activation between them, 4x wide by default. ``kind``:
    "gelu" (GPT-2, BERT); "relu2": ``proj(relu(fc(x)) ** 2)`` (modded-nanogpt); "swiglu"
    (Llama): ``fc`` holds the gate and the up projection side by side (2 * hidden rows) and the
    block computes ``proj(silu(gate) * up)``."""

    def __init__(
        self,
        n_embd: int,
        hidden: int,
        dropout: float = 0.0,
        bias: bool = True,
        approximate: str = "none",
        kind: str = "gelu",
    ) -> None:
        super().__init__()
        self.gated = kind == "swiglu"
        self.fc = nn.Linear(n_embd, 2 * hidden if self.gated else hidden, bias=bias)
        if kind == "gelu":
            self.act = nn.GELU(approximate=approximate)
        elif kind == "relu2":
            self.act = ReLUSquared()
        elif kind == "swiglu":
            self.act = nn.SiLU()
        else:
            raise ValueError(f"MLP kind must be gelu, relu2 or swiglu, got {kind!r}")
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.dropout(self.proj(h))


def check_config(config, positive: tuple[str, ...], head_dim: int | None = None) -> None:
    """The checks every model config shares; sets the derived ``padded_vocab_size`` and
    ``head_dim`` (``n_embd // n_head`` unless ``head_dim`` is given). Raises ValueError naming
    the config class and the field."""
    name = type(config).__name__
    for field in positive:
        if getattr(config, field) <= 0:
            raise ValueError(f"{name}.{field} must be positive, got {getattr(config, field)}")
    if head_dim is not None:
        if head_dim <= 0:
            raise ValueError(f"{name}.head_dim must be positive, got {head_dim}")
    elif config.n_embd % config.n_head:
        raise ValueError(
            f"{name}: n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})"
        )
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"{name}.dropout must be in [0, 1), got {config.dropout}")
    m = config.pad_vocab_multiple  # null: unpadded (lmforge-train picks it per device)
    if m is not None and m <= 0:
        raise ValueError(f"{name}.pad_vocab_multiple must be positive or null, got {m}")
    m = m or 1
    config.padded_vocab_size = (config.vocab_size + m - 1) // m * m
    config.head_dim = head_dim or config.n_embd // config.n_head


def init_weights(
    model: nn.Module, n_layer: int, std: float = 0.02, zero_proj: bool = False
) -> None:
    """GPT-2 / BERT initialisation: linear and embedding weights normal(0, std), biases zero,
    norms one; the residual projections of each block (``attn.proj``, ``mlp.proj``) scaled by
    1/sqrt(2 * n_layer), or zero with ``zero_proj`` (each block starts as the identity, as in
    the modded-nanogpt speedrun)."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm | nn.RMSNorm):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    for block in model.blocks:
        for proj in (block.attn.proj, block.mlp.proj):
            if zero_proj:
                nn.init.zeros_(proj.weight)
            else:
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * n_layer))
