"""Reward-model training: a scalar head on a pretrained GPT or BERT, fitted to preference pairs.

Each pair's chosen and rejected sequences go through the model in one batch of 2B; the loss is
the Bradley-Terry negative log-likelihood -log sigmoid(r_chosen - r_rejected - margin), the mean
over the real pairs of the whole optimizer step (micro-batches and ranks, ``LMTask``). Validation
and test report that loss, the pairwise accuracy (the share of pairs with r_chosen > r_rejected)
and the mean margin r_chosen - r_rejected. The backbone and head are those of
``models.reward``; as in classification, everything trains, only the last blocks, or LoRA
adapters (and the head, and a BERT's pooler).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics.aggregation import MeanMetric

from lmforge.data.datamodule import PreferenceDataModule
from lmforge.data.preferences import model_settings
from lmforge.models.registry import family as get_family
from lmforge.models.reward import sequence_rewards
from lmforge.run import pretrained_model
from lmforge.tasks.base import LMTask, Recipe
from lmforge.tasks.classification import ClassificationTask
from lmforge.tasks.config import RewardConfig


class PairMetrics(nn.Module):
    """Loss, pairwise accuracy and mean margin over the pairs of a split (reduced over ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.loss, self.accuracy, self.margin = MeanMetric(), MeanMetric(), MeanMetric()

    def update(self, loss: torch.Tensor, diff: torch.Tensor) -> None:
        if loss.numel():
            self.loss.update(loss)
            self.accuracy.update((diff > 0).float())
            self.margin.update(diff)

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"loss": self.loss.compute(), "accuracy": self.accuracy.compute()}
        out["margin"] = self.margin.compute()
        for m in (self.loss, self.accuracy, self.margin):
            m.reset()
        return out


class RewardTask(LMTask):
    config_class = RewardConfig

    def __init__(
        self,
        model,
        family: str,
        pad_id: int,
        task: RewardConfig | dict | None = None,
        seed: int = 0,
        batch_size: int = 16,
        reward: bool = True,  # what checkpoints record to mark a reward model
    ) -> None:
        super().__init__(task or RewardConfig(), seed)
        self.batch_size = batch_size  # pairs per micro-batch: the loss scale of every step
        self.pad_id = pad_id
        self.model = self.make_model(model, family, reward=True, pad_id=pad_id)
        self.causal = get_family(self.hparams["family"]).causal  # a GPT: its last token
        self.model.remove_lm_head()
        self.head = nn.Linear(self.model.config.n_embd, 1, bias=False)
        nn.init.normal_(self.head.weight, std=1 / (self.model.config.n_embd + 1) ** 0.5)
        self._choose_trainable(self.task.train_last_blocks)
        self.val_metrics, self.test_metrics = PairMetrics(), PairMetrics()

    _choose_trainable = ClassificationTask._choose_trainable
    load_backbone = ClassificationTask.load_backbone
    flops_per_token = ClassificationTask.flops_per_token

    @classmethod
    def recipe(cls, run, ckpt_path: str | None) -> Recipe:
        """Preference pairs framed for the pretrained model's tokenizer (a BERT's as [CLS] prompt
        response [SEP]), and a scalar head on the model of ``init_from``."""
        loaded, config = pretrained_model(run, run.data.max_len)
        settings = model_settings(loaded.tokenizer_settings, loaded.family.frame, loaded.tokenizer)
        dm = PreferenceDataModule(run.data, loaded.tokenizer, run.cfg.seed, settings)
        dm.setup("fit")
        module = cls(
            config, loaded.family.name, dm.pad_id, run.task, run.cfg.seed, run.data.batch_size
        )
        module.load_backbone(loaded.model.state_dict())
        rank_zero_info(f"reward model: {module.trained_share()}")
        return Recipe(
            module,
            dm,
            config,
            batch_size=run.data.batch_size,
            seq_len=run.data.max_len,
            validate_first=ckpt_path is None,
            test=run.data.test is not None,
            # Metric states made under inference mode (the validation before training) could
            # not be updated in the fit's validations: evaluation runs under no_grad.
            trainer_args={"inference_mode": False},
        )

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) of right-padded sequences."""
        return sequence_rewards(self.model, self.head, input_ids, lengths, self.pad_id, self.causal)

    def pair_losses(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair Bradley-Terry losses and r_chosen - r_rejected of the real pairs, and the
        mask of real pairs (blanks: a rank's filler)."""
        B = batch["real"].numel()
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        rewards = self(ids, torch.cat([batch["chosen_lengths"], batch["rejected_lengths"]]))
        diff = rewards[:B] - rewards[B:]
        loss = -F.logsigmoid(diff - (batch["margin"] + self.task.margin))
        return loss, diff, batch["real"]

    def training_step(self, batch, batch_idx):
        loss, _, real = self.pair_losses(batch)
        self.count_tokens(2 * batch["chosen_input_ids"].numel())
        return self.step_loss((loss * real).sum(), real.sum(), scale=self.batch_size)

    def validation_step(self, batch, batch_idx):
        loss, diff, real = self.pair_losses(batch)
        self.val_metrics.update(loss[real], diff[real])

    def test_step(self, batch, batch_idx):
        loss, diff, real = self.pair_losses(batch)
        self.test_metrics.update(loss[real], diff[real])

    def _log(self, metrics: PairMetrics, prefix: str) -> None:
        for name, value in metrics.compute().items():
            self.log(f"{prefix}/{name}", value, prog_bar=name == "accuracy", sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log(self.test_metrics, "test")
