"""A BERT in plain PyTorch: a bidirectional encoder over the shared attention module.

Token, position and token-type embeddings with a LayerNorm; post-LayerNorm blocks as in BERT
(pre-LayerNorm as an option); an MLM head (dense, GELU, LayerNorm, decoder tied to the word
embeddings with its own bias) that can run on the masked positions alone; a pooler for
classification.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.models.layers import MLP, Attention, check_config, init_weights


@dataclass
class BertConfig:
    """Shape and options of a BERT. Derived fields are computed in ``__post_init__``."""

    vocab_size: int = 30522  # tokenizer size; the embedding is padded beyond it
    block_size: int = 512  # max_position_embeddings
    type_vocab_size: int = 2  # token types (segments)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_ratio: int = 4  # intermediate size = mlp_ratio * n_embd
    dropout: float = 0.1  # hidden and attention dropout
    pre_ln: bool = (
        False  # False: BERT's post-LayerNorm blocks; True: pre-LayerNorm (more stable when deep)
    )
    ln_eps: float = 1e-12
    gelu_approximate: str = "none"  # BERT uses the exact erf GELU
    pad_vocab_multiple: int | None = 64  # as GPTConfig's
    padded_vocab_size: int = field(init=False)
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        check_config(
            self,
            (
                "vocab_size",
                "block_size",
                "n_layer",
                "n_head",
                "n_embd",
                "mlp_ratio",
                "type_vocab_size",
            ),
        )


class EncoderBlock(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.pre_ln = c.pre_ln
        self.attn = Attention(c.n_embd, c.n_head, c.dropout, bias=True)
        self.ln_1 = nn.LayerNorm(c.n_embd, eps=c.ln_eps)
        self.mlp = MLP(
            c.n_embd, c.mlp_ratio * c.n_embd, c.dropout, bias=True, approximate=c.gelu_approximate
        )
        self.ln_2 = nn.LayerNorm(c.n_embd, eps=c.ln_eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attn(self.ln_1(x), causal=False, attn_mask=attn_mask)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, causal=False, attn_mask=attn_mask))
        return self.ln_2(x + self.mlp(x))


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder (weights tied to the word embeddings) + bias."""

    def __init__(self, c: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(c.n_embd, c.n_embd)
        self.act = nn.GELU(approximate=c.gelu_approximate)
        self.ln = nn.LayerNorm(c.n_embd, eps=c.ln_eps)
        self.decoder = nn.Linear(c.n_embd, c.padded_vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # the one place weights are tied
        self.bias = nn.Parameter(torch.zeros(c.padded_vocab_size))
        self.vocab_size = c.vocab_size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(self.ln(self.act(self.dense(h)))) + self.bias
        return logits[..., : self.vocab_size]


class Bert(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c = self.config = config
        self.tok_emb = nn.Embedding(c.padded_vocab_size, c.n_embd)
        self.pos_emb = nn.Embedding(c.block_size, c.n_embd)
        self.type_emb = nn.Embedding(c.type_vocab_size, c.n_embd)
        self.emb_ln = nn.LayerNorm(c.n_embd, eps=c.ln_eps)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(c) for _ in range(c.n_layer))
        self.checkpoint_blocks = (
            False  # activation checkpointing: keep only block inputs in training
        )
        self.ln_f = nn.LayerNorm(c.n_embd, eps=c.ln_eps) if c.pre_ln else nn.Identity()
        self.mlm_head = MLMHead(c, self.tok_emb)
        self.pooler = nn.Linear(c.n_embd, c.n_embd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation (``layers.init_weights``); the MLM head's bias starts at zero."""
        init_weights(self, self.config.n_layer)
        nn.init.zeros_(self.mlm_head.bias)

    def num_params(self) -> int:
        """Parameter count, tied weights counted once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None, predicted_fraction: float = 1.0) -> int:
        """Training FLOPs per token, 6N + 12·L·H·Q·T (PaLM), with the MLM decoder counted only on
        the ``predicted_fraction`` of positions it runs on (sparse prediction)."""
        c = self.config
        T = seq_len or c.block_size
        embeddings = sum(m.weight.numel() for m in (self.tok_emb, self.pos_emb, self.type_emb))
        decoder = c.padded_vocab_size * c.n_embd
        head = sum(p.numel() for p in self.mlm_head.parameters()) - decoder  # dense, LN, bias
        body = (
            self.num_params() - embeddings - head - sum(p.numel() for p in self.pooler.parameters())
        )
        per_token = 6 * body + 6 * (head + decoder) * predicted_fraction
        return int(per_token + 12 * c.n_layer * c.n_head * c.head_dim * T)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MLM logits (B, T, vocab_size) of every position."""
        return self.lm_logits(self.hidden(input_ids, attention_mask, token_type_ids))

    def hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, n_embd). ``attention_mask`` (B, T): 1 for real tokens, 0 for padding."""
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(T, device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(pos) + self.type_emb(token_type_ids)
        x = self.drop(self.emb_ln(x))
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T): keys each query may see
        for block in self.blocks:
            if self.checkpoint_blocks and self.training:
                x = checkpoint(block, x, mask, use_reentrant=False)  # recomputed in backward
            else:
                x = block(x, mask)
        return self.ln_f(x)

    def lm_logits(
        self, hidden: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Vocabulary logits; with a boolean ``positions`` (B, T) only there: (N, vocab_size)."""
        if positions is not None:
            hidden = hidden[positions]  # (N, n_embd)
        return self.mlm_head(hidden)

    def sequence_features(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The [CLS] representation through the pooler (dense + tanh), for classification."""
        return torch.tanh(self.pooler(hidden[:, 0]))

    def top_modules(self) -> list[nn.Module]:
        """The modules between the last block and ``sequence_features``."""
        return [self.ln_f, self.pooler]

    def pooling_modules(self) -> list[nn.Module]:
        """The modules of ``sequence_features`` that masked-LM pretraining leaves untrained:
        the pooler, which fine-tunes train even when adapters freeze everything else."""
        return [self.pooler]

    def remove_lm_head(self) -> None:
        """Drop the MLM head of pretraining (the decoder's weights are the embedding's)."""
        del self.mlm_head
