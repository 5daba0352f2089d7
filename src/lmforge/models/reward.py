"""A reward model: a GPT or BERT backbone and a scalar head, scoring a prompt and its response.

A GPT's score is read at the last token that is not padding, as transformers'
``GPT2ForSequenceClassification`` reads it (the rightmost token other than ``pad_token_id``): with
GPT-2's convention of padding with ``<|endoftext|>``, that is the response's last token before its
closing ``<|endoftext|>``. A BERT's is read from its pooled ``[CLS]``, as
``BertForSequenceClassification`` does. The head has no bias: a Bradley-Terry loss sees only
differences of scores, in which a bias cancels (exported as a zero bias where transformers has one).
Plain torch: usable without Lightning (``lmforge.checkpoint.load_reward_model``).
"""

from __future__ import annotations

import torch
from torch import nn


def sequence_rewards(
    backbone: nn.Module,
    head: nn.Linear,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    pad_id: int,
    causal: bool,
) -> torch.Tensor:
    """Scores (B,) of right-padded sequences (B, T) of ``lengths`` real tokens."""
    T = input_ids.size(1)
    pos = torch.arange(T, device=input_ids.device)
    real = pos[None] < lengths[:, None]  # (B, T)
    if causal:
        # The rightmost real token that is not pad_id (the last real one if all are).
        scored = torch.where(real & (input_ids != pad_id), pos, -1).amax(1)
        scored = torch.where(scored >= 0, scored, (lengths - 1).clamp(min=0))
        features = backbone.sequence_features(
            backbone.hidden(input_ids), pos[None] <= scored[:, None]
        )
    else:
        features = backbone.sequence_features(backbone.hidden(input_ids, real.long()), real)
    return head(features).squeeze(-1).float()


class RewardModel(nn.Module):
    """``backbone`` (a GPT or BERT without its language-model head) and a scalar ``head``.
    ``tokenizer``, ``family`` and ``pad_id`` as the checkpoint records them."""

    def __init__(self, backbone: nn.Module, pad_id: int, causal: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.n_embd, 1, bias=False)
        self.pad_id, self.causal = pad_id, causal
        self.tokenizer = None
        self.family = None
        self.tokenizer_settings = None  # what its tokenizer_config.json says, if it carries one

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return sequence_rewards(
            self.backbone, self.head, input_ids, lengths, self.pad_id, self.causal
        )

    @torch.no_grad()
    def score(
        self,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        batch_size: int = 32,
    ) -> torch.Tensor:
        """The reward (N,) of each prompt followed by its response (token ids as the reward
        model's data framing makes them: the prompt with any BOS, the response with its EOS)."""
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        limit = self.backbone.config.block_size
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
        for i, s in enumerate(seqs):
            if len(s) > limit:
                raise ValueError(
                    f"sequence {i} has {len(s)} tokens, more than the reward model's context of"
                    f" {limit}: truncate the prompt (keep its end)"
                )
        device = self.head.weight.device
        out = []
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            ids = torch.full((len(chunk), max(map(len, chunk))), self.pad_id, dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            lengths = torch.tensor([len(s) for s in chunk])
            out.append(self(ids.to(device), lengths.to(device)).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def export_hf(self, out):
        """Write a transformers ``*ForSequenceClassification`` directory (``num_labels=1``)."""
        from lmforge.errors import LMForgeError

        try:
            return self.family.export_hf(
                self.backbone,
                out,
                self.tokenizer,
                score=self.head.weight.detach(),
                pad_id=self.pad_id,
            )
        except ValueError as e:
            raise LMForgeError(f"{e}: a reward model of it cannot be exported yet") from None
