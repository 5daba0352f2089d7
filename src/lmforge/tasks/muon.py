"""Muon on the hidden matrices and AdamW on the other parameters, as one torch optimizer.

Muon (``torch.optim.Muon``) orthogonalises the momentum of a 2-D weight before applying it; it
is meant for the matrices inside the transformer blocks, while embeddings, heads, norms and
biases keep AdamW (as in the modded-nanogpt speedrun). Lightning's automatic optimization and
the ``LambdaLR`` schedule expect one optimizer, so this one owns a Muon and an AdamW and exposes
the union of their parameter groups: the same dict objects, so the schedule's learning rates
reach both, and one shared ``state``, so ``Optimizer.state_dict``/``load_state_dict`` save and
restore both exactly.
"""

from __future__ import annotations

import torch
from torch.optim import AdamW, Muon


class MuonWithAdamW(torch.optim.Optimizer):
    """``groups`` with ``use_muon: True`` go to Muon (with ``muon_args``), the others to AdamW
    (with ``adamw_args``); the Muon groups come first in ``param_groups``."""

    def __init__(self, groups: list[dict], muon_args: dict, adamw_args: dict) -> None:
        muon_groups = [g for g in groups if g.get("use_muon")]
        self.muon = Muon(muon_groups, **muon_args)
        self.adamw = AdamW([g for g in groups if not g.get("use_muon")], **adamw_args)
        # The inner optimizers completed the group dicts with their defaults; adding them here
        # keeps the same dicts (no copy), so a scheduler's changes reach the inner optimizers.
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this one's groups and state (after a load too, which
        replaces both)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups = self.param_groups[:n]
        self.adamw.param_groups = self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss
