"""A GPT in plain PyTorch: pre-norm decoder blocks over one causal attention module.

GPT-2 layout by default (learned positions, LayerNorm, GELU-tanh MLP, tied embeddings). The
modern decoders are options of the same model, set by typed fields: rotary positions (with
Llama 3's scaling), RMSNorm, a SwiGLU MLP of its own width, grouped-query attention, q/k/v
biases, QK-norm, a sliding window. ``LlamaConfig``, ``MistralConfig``, ``Qwen2Config`` and
``Qwen3Config`` are those options' defaults for each family (``models/registry.py``); the model
is this one ``GPT``. The modded-nanogpt speedrun's recipe is options too: a squared-ReLU MLP
(``mlp=relu2``), zero-initialised block output projections (``zero_init_proj``), tanh logit
soft-capping (``logit_softcap``), QK-norm (``qk_norm``) and an untied head (``tie_weights``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.models.layers import MLP, Attention, KVCache, check_config, init_weights, rotary_tables


@dataclass
class GPTConfig:
    """Shape and options of a GPT. Derived fields are computed in ``__post_init__``."""

    vocab_size: int = 50257  # tokenizer size; the embedding is padded beyond it
    block_size: int = 1024  # longest context the model handles
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * n_embd, unless intermediate_size is set
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms
    pos_emb: str = "learned"  # "learned" (GPT-2) or "rotary"
    rope_base: float = 10000.0
    gelu_approximate: str = "tanh"  # "tanh" is GPT-2's gelu_new; "none" is the exact erf GELU
    ln_eps: float = 1e-5  # epsilon of every LayerNorm / RMSNorm
    tie_weights: bool = True  # lm_head shares the token embedding
    # embedding rows padded to a multiple of this (whole tiles for GPU matmuls); null: none
    # (lmforge-train sets a null one for the device: 64 on a GPU, none on a CPU)
    pad_vocab_multiple: int | None = 64
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama)
    # "gelu" (GPT-2), "swiglu" (Llama: proj(silu(gate) * up)) or "relu2" (proj(relu(fc(x))**2))
    mlp: str = "gelu"
    intermediate_size: int | None = None  # MLP hidden width; null: mlp_ratio * n_embd
    n_kv_head: int | None = None  # key/value heads; null: n_head; fewer: grouped-query; 1: MQA
    head_dim: int | None = None  # width of a head; null: n_embd // n_head
    qkv_bias: bool = False  # biases on q/k/v even with bias=false (Qwen2)
    qk_norm: bool = False  # RMSNorm on each head of q and k before rotary (Qwen3)
    sliding_window: int | None = None  # a token sees the last this-many positions (Mistral)
    # Llama 3 rotary scaling: {factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings}; null: none
    rope_scaling: dict[str, float] | None = None
    zero_init_proj: bool = False  # attn.proj and mlp.proj start at zero: each block the identity
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma 2); null: none
    padded_vocab_size: int = field(init=False)

    def __post_init__(self) -> None:
        """Checks the fields; a null ``intermediate_size``, ``n_kv_head`` or ``head_dim`` is set
        to the value it stands for (so checkpoints record the real geometry)."""
        name = type(self).__name__
        check_config(
            self,
            ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"),
            head_dim=self.head_dim,
        )
        for key, allowed in (
            ("pos_emb", ("learned", "rotary")),
            ("norm", ("layernorm", "rmsnorm")),
            ("mlp", ("gelu", "swiglu", "relu2")),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"{name}.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}"
                )
        if self.intermediate_size is None:
            self.intermediate_size = self.mlp_ratio * self.n_embd
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for key in ("intermediate_size", "n_kv_head", "sliding_window"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"{name}.{key} must be positive, got {value}")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"{name}.n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})"
            )
        if self.logit_softcap is not None:
            if not self.logit_softcap > 0:
                raise ValueError(
                    f"{name}.logit_softcap must be positive or null, got {self.logit_softcap}"
                )
            self.logit_softcap = float(self.logit_softcap)
        if self.rope_scaling is not None:
            keys = {
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            }
            if set(self.rope_scaling) != keys:
                raise ValueError(
                    f"{name}.rope_scaling takes exactly {', '.join(sorted(keys))} (Llama 3),"
                    f" got {', '.join(sorted(self.rope_scaling))}"
                )
            self.rope_scaling = {k: float(v) for k, v in self.rope_scaling.items()}
            if self.pos_emb != "rotary":
                raise ValueError(f"{name}.rope_scaling needs pos_emb=rotary")


def make_norm(config: GPTConfig) -> nn.Module:
    """The normalisation layer the config asks for (``norm``): LayerNorm or RMSNorm."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.ln_eps)
    return nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = Attention(
            config.n_embd,
            config.n_head,
            config.dropout,
            config.bias,
            n_kv_head=config.n_kv_head,
            head_dim=config.head_dim,
            qkv_bias=config.qkv_bias,
            qk_norm=config.qk_norm,
            norm_eps=config.ln_eps,
            window=config.sliding_window,
        )
        self.ln_2 = make_norm(config)
        self.mlp = MLP(
            config.n_embd,
            config.intermediate_size,
            config.dropout,
            config.bias,
            config.gelu_approximate,
            kind=config.mlp,
        )

    def forward(
        self,
        x,
        rope=None,
        cache: KVCache | None = None,
        layer: int = 0,
        past: int = 0,
        attn_mask: torch.Tensor | None = None,
    ):
        h = self.ln_1(x)
        x = x + self.attn(
            h, causal=True, attn_mask=attn_mask, rope=rope, cache=cache, layer=layer, past=past
        )
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.pos_emb = (
            nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.checkpoint_blocks = (
            False  # activation checkpointing: keep only block inputs in training
        )
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.pos_emb == "rotary":
            self.register_buffer("rope_cos", torch.empty(0), persistent=False)
            self.register_buffer("rope_sin", torch.empty(0), persistent=False)
            self.reset_buffers()
        self.reset_parameters()
        self.tie_weights()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation (``layers.init_weights``); with ``zero_init_proj`` the blocks'
        output projections start at zero."""
        init_weights(self, self.config.n_layer, zero_proj=self.config.zero_init_proj)

    def reset_buffers(self) -> None:
        """Compute the rotary tables (not saved in checkpoints): at construction, and again after
        a model built on the meta device is given real storage (``to_empty``)."""
        c = self.config
        if c.pos_emb == "rotary":
            device = self.tok_emb.weight.device
            cos, sin = rotary_tables(c.head_dim, c.block_size, c.rope_base, c.rope_scaling)
            self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def tie_weights(self) -> None:
        """The one place weights are tied: lm_head shares the token embedding (``tie_weights``).
        Called again after ``to_empty``, which gives each of the two its own storage."""
        if self.config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def num_params(self, exclude_position_embeddings: bool = False) -> int:
        """Parameter count, tied weights counted once."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_position_embeddings and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12·L·H·Q·T.

        N counts every weight that takes part in a matmul per token (the tied token embedding
        does, as the output projection; learned position embeddings do not).
        """
        c = self.config
        T = seq_len or c.block_size
        N = self.num_params(exclude_position_embeddings=True)
        return 6 * N + 12 * c.n_layer * c.n_head * c.head_dim * T

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids ``idx`` (B, T); padded vocabulary rows dropped.
        ``segments``: see ``hidden``."""
        return self.lm_logits(self.hidden(idx, cache=cache, segments=segments))

    def lm_logits(
        self, hidden: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits of hidden states (B, T, n_embd); with a boolean ``positions`` (B, T)
        only there: (N, vocab_size). With ``logit_softcap`` they are ``cap * tanh(logits / cap)``,
        in float32."""
        if positions is not None:
            hidden = hidden[positions]
        logits = self.lm_head(hidden)[..., : self.config.vocab_size]  # padded rows dropped
        cap = self.config.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits.float() / cap)
        return logits

    def sequence_features(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One vector per sequence (B, n_embd): the hidden state of the last real token, which
        has read the whole (right-padded) sequence."""
        if attention_mask is None:
            return hidden[:, -1]
        last = attention_mask.sum(1) - 1
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]

    def top_modules(self) -> list[nn.Module]:
        """The modules between the last block and ``sequence_features`` (trained with the last
        blocks when only those are fine-tuned)."""
        return [self.ln_f]

    def pooling_modules(self) -> list[nn.Module]:
        """The modules of ``sequence_features`` that language-model pretraining leaves
        untrained (none: a GPT reads its last token as it is)."""
        return []

    def remove_lm_head(self) -> None:
        """Drop the language-model head (tied to the embedding: the weights stay)."""
        del self.lm_head

    def hidden(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The final hidden states (B, T, n_embd), after the last LayerNorm.

        ``attention_mask`` (B, T) marks real tokens; a causal model needs it only for
        right-padded batches, whose padding no real token attends to, so it is not applied.
        ``segments`` (B, T): for sequences packed with several examples, the example each token
        belongs to. A token then attends only to earlier tokens of its own example, and
        positions restart at 0 with each example, as if every example ran alone.
        """
        B, T = idx.shape
        past = cache.seq_len if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}"
            )
        mask = None
        positions = torch.arange(past, past + T, device=idx.device)
        if segments is not None:
            same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
            mask = (same & torch.ones(T, T, dtype=torch.bool, device=idx.device).tril())[:, None]
            starts = torch.ones_like(segments, dtype=torch.bool)
            starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
            index = torch.arange(T, device=idx.device).expand(B, T)
            first = torch.where(starts, index, 0).cummax(dim=1).values  # each token's example start
            positions = index - first  # (B, T)
        x = self.tok_emb(idx)  # (B, T, n_embd)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        elif segments is not None:
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])
        else:
            rope = (self.rope_cos, self.rope_sin)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if self.checkpoint_blocks and self.training:
                x = checkpoint(block, x, rope=rope, attn_mask=mask, use_reentrant=False)
            else:
                x = block(x, rope=rope, cache=cache, layer=i, past=past, attn_mask=mask)
        return self.ln_f(x)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """``idx`` (B, T) followed by ``max_new_tokens`` sampled tokens; ``sampling``: the
        arguments of ``generate_stream``."""
        new = list(self.generate_stream(idx, max_new_tokens, **sampling))
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of each sequence, (B, 1), ``max_new_tokens`` times.

        ``temperature=0`` is greedy decoding. ``repetition_penalty`` > 1 divides the positive
        logits (multiplies the negative ones) of tokens already in the sequence (CTRL); then
        temperature, top-k and top-p (nucleus) filtering, in that order. With ``use_cache`` a
        KV cache makes each new token cost one position while the sequence fits in
        ``block_size`` (past that the context is cropped and re-encoded); without it every step
        re-encodes the whole context (the reference the cache is tested against).
        """
        cache = KVCache() if use_cache else None
        next_input = idx[:, -self.config.block_size :]
        for _ in range(max_new_tokens):
            if cache is not None and cache.seq_len + next_input.size(1) > self.config.block_size:
                cache = KVCache()
                next_input = idx[:, -self.config.block_size :]
            # hidden, not __call__: a compiled model would recompile for every new length;
            # the head runs on the last position only, the one sampled from
            hidden = self.hidden(next_input, cache=cache)[:, -1:]
            logits = self.lm_logits(hidden)[:, -1].float()  # (B, vocab_size)
            if temperature == 0 and repetition_penalty == 1.0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = filter_logits(
                    logits, idx, temperature or 1.0, top_k, top_p, repetition_penalty
                )
                if temperature == 0:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                else:
                    nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
            next_input = nxt if cache is not None else idx[:, -self.config.block_size :]
            yield nxt


def filter_logits(
    logits: torch.Tensor,
    seen: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """Next-token logits (B, V) after, in order: the repetition penalty on the tokens of
    ``seen`` (B, T) (positive logits divided by it, negative ones multiplied, as in CTRL),
    temperature, top-k, and top-p (the smallest set of most likely tokens whose probability
    reaches ``top_p``; the most likely token always stays). Removed tokens get -inf."""
    if repetition_penalty != 1.0:
        prev = torch.gather(logits, 1, seen)
        prev = torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty)
        logits = logits.scatter(1, seen, prev)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs, order = torch.sort(F.softmax(logits, dim=-1), descending=True)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        drop = torch.zeros_like(drop).scatter(1, order, drop)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# The modern decoder families: the same GPT, with their options as defaults. Each is its own
# class so that a checkpoint or config names its family (``models/registry.py``) and exports
# as that transformers architecture; the fields themselves are the GPT's.


@dataclass
class LlamaConfig(GPTConfig):
    """Llama (2, 3; SmolLM2): rotary positions, RMSNorm, SwiGLU MLP, no biases, untied head."""

    pos_emb: str = "rotary"
    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    bias: bool = False
    ln_eps: float = 1e-6
    tie_weights: bool = False


@dataclass
class MistralConfig(LlamaConfig):
    """Mistral: Llama's block, with a sliding attention window as an option."""


@dataclass
class Qwen2Config(LlamaConfig):
    """Qwen2 / Qwen2.5: Llama's block with biases on the query, key and value projections."""

    qkv_bias: bool = True


@dataclass
class Qwen3Config(LlamaConfig):
    """Qwen3: Llama's block with an RMSNorm on each query and key head (QK-norm)."""

    qk_norm: bool = True
