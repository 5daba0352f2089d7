"""A GPT in plain PyTorch: pre-LayerNorm decoder blocks over one causal attention module.

GPT-2 layout (learned positions, GELU-tanh MLP, tied embeddings); rotary positions as an option.
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
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * n_embd
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms
    pos_emb: str = "learned"  # "learned" (GPT-2) or "rotary"
    rope_base: float = 10000.0
    gelu_approximate: str = "tanh"  # "tanh" is GPT-2's gelu_new; "none" is the exact erf GELU
    ln_eps: float = 1e-5
    tie_weights: bool = True  # lm_head shares the token embedding
    pad_vocab_multiple: int = 64  # embedding rows padded to a multiple of this (fast matmuls)
    padded_vocab_size: int = field(init=False)
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        check_config(self, ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"))
        if self.pos_emb not in ("learned", "rotary"):
            raise ValueError(
                f"GPTConfig.pos_emb must be 'learned' or 'rotary', got {self.pos_emb!r}"
            )


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias)
        self.attn = Attention(config.n_embd, config.n_head, config.dropout, config.bias)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias)
        self.mlp = MLP(
            config.n_embd,
            config.mlp_ratio * config.n_embd,
            config.dropout,
            config.bias,
            config.gelu_approximate,
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
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.pos_emb == "rotary":
            cos, sin = rotary_tables(config.head_dim, config.block_size, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        if config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight  # the one place weights are tied

    def reset_parameters(self) -> None:
        """GPT-2 initialisation (``layers.init_weights``)."""
        init_weights(self, self.config.n_layer)

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
        only there: (N, vocab_size)."""
        if positions is not None:
            hidden = hidden[positions]
        return self.lm_head(hidden)[..., : self.config.vocab_size]  # padded rows dropped

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
            # forward, not __call__: a compiled model would recompile for every new length
            logits = self.forward(next_input, cache=cache)[:, -1, :].float()  # (B, vocab_size)
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
