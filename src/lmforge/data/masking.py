"""Dynamic masking for masked-language-model pretraining (BERT's 80/10/10 recipe).

The masks of a batch are a function of ``(seed, rank, step)``: every batch is masked afresh,
and a resumed run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import LMForgeError


@dataclass
class MaskingConfig:
    """Which tokens an MLM batch asks the model to predict, and how they are corrupted."""

    mask_prob: float = 0.15  # share of eligible (non-special, non-padding) tokens selected
    replace_mask: float = 0.8  # of the selected: replaced by [MASK]
    replace_random: float = (
        0.1  # of the selected: replaced by a random non-special token; the rest kept
    )
    whole_word: bool = False  # select whole WordPiece words (a token and its ## continuations)
    two_segments: bool = False  # token type 1 after the first [SEP] inside a sequence

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise LMForgeError(f"task.masking.mask_prob must be in (0, 1), got {self.mask_prob}")
        if (
            self.replace_mask < 0
            or self.replace_random < 0
            or self.replace_mask + self.replace_random > 1
        ):
            raise LMForgeError(
                "task.masking.replace_mask and replace_random must be >= 0 and sum to at most 1"
            )


class Masker:
    """Applies dynamic masking to a batch of token ids."""

    def __init__(
        self,
        cfg: MaskingConfig,
        vocab_size: int,
        mask_id: int,
        special_ids: list[int],
        continuation: torch.Tensor | None = None,
    ) -> None:
        """``continuation``: a boolean (vocab_size,) table of WordPiece ``##`` tokens, for whole-word masking."""
        self.cfg, self.mask_id = cfg, mask_id
        self.special = torch.zeros(vocab_size, dtype=torch.bool)
        self.special[torch.tensor(special_ids, dtype=torch.long)] = True
        self.normal = torch.nonzero(~self.special).squeeze(1)  # tokens a random replacement may use
        self.continuation = continuation
        if cfg.whole_word and continuation is None:
            raise LMForgeError(
                "task.masking.whole_word needs a WordPiece tokenizer (## continuation tokens)"
            )

    def __call__(
        self, ids: torch.Tensor, generator: torch.Generator | list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (corrupted ids, labels): labels hold the original id where selected, else -100.

        ``generator``: one for the batch, or one per row (a row's mask then depends on its own
        generator alone, whatever batch it is part of).
        """
        if isinstance(generator, torch.Generator):
            rand, how, pick = torch.rand((3, *ids.shape), generator=generator)
        else:
            noise = [torch.rand((3, ids.size(1)), generator=g) for g in generator]
            rand, how, pick = torch.stack(noise, dim=1)  # each (B, T)
        eligible = ~self.special[ids]
        if self.cfg.whole_word:
            # Every piece of a word takes the draw of the word's first piece. Continuations cut
            # from their first piece by the window's start share word 0, which is never selected.
            starts = eligible & ~self.continuation[ids]
            word = torch.cumsum(starts.long(), dim=1)  # (B, T) word index of each token
            first = torch.where(starts, rand, torch.full_like(rand, 2.0))
            per_word = torch.full_like(rand, 2.0).scatter_reduce(1, word, first, reduce="amin")
            rand = torch.gather(per_word, 1, word)
        selected = eligible & (rand < self.cfg.mask_prob)
        labels = torch.where(selected, ids, torch.full_like(ids, -100))
        to_mask = selected & (how < self.cfg.replace_mask)
        to_random = (
            selected
            & (how >= self.cfg.replace_mask)
            & (how < self.cfg.replace_mask + self.cfg.replace_random)
        )
        n = len(self.normal)
        random_ids = self.normal[(pick * n).long().clamp_max(n - 1)]
        out = torch.where(to_mask, torch.full_like(ids, self.mask_id), ids)
        out = torch.where(to_random, random_ids, out)
        return out, labels
