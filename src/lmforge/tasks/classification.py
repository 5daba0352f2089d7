"""Text classification fine-tuning: a linear head on a GPT or a BERT.

A GPT reads the text left to right, so its hidden state at the last real token (the
``<|endoftext|>`` appended to every text) has seen all of it; a BERT's ``[CLS]`` goes through its
pooler. Cross-entropy, normalised by the examples (class-weighted when ``class_weights`` is set)
of the whole optimizer step. Either everything is trained, only the last ``train_last_blocks``
blocks (plus the final norm and the head), or, with ``lora.rank`` > 0, only low-rank adapters
and the head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from lmforge.errors import LMForgeError
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.lora import add_lora
from lmforge.tasks.base import LMTask
from lmforge.tasks.optim import OptimConfig


@dataclass
class LoRAConfig:
    rank: int = 0  # 0: no adapters, fine-tune the weights themselves
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["qkv", "attn.proj", "mlp.fc", "mlp.proj"])

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise LMForgeError(f"task.lora.rank must be >= 0, got {self.rank}")


def metrics(n: int) -> MetricCollection:
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(n, average="micro"),
            "f1_macro": MulticlassF1Score(n, average="macro"),
            "precision": MulticlassPrecision(n, average=None),
            "recall": MulticlassRecall(n, average=None),
            "confusion": MulticlassConfusionMatrix(n),
        }
    )


class ClassificationTask(LMTask):
    def __init__(
        self,
        model: dict,
        family: str,
        labels: list[str],
        optim: OptimConfig | dict | None = None,
        lora: LoRAConfig | dict | None = None,
        train_last_blocks: int | None = None,
        class_weights: list[float] | None = None,
    ) -> None:
        super().__init__()
        if family not in ("gpt", "bert"):
            raise LMForgeError(f"family={family!r}: gpt or bert")
        model_cfg = (GPTConfig if family == "gpt" else BertConfig)(**model)
        self.optim = optim if isinstance(optim, OptimConfig) else OptimConfig(**(optim or {}))
        self.lora = lora if isinstance(lora, LoRAConfig) else LoRAConfig(**(lora or {}))
        self.family, self.labels = family, list(labels)
        self.save_hyperparameters(
            {
                "model": model if isinstance(model, dict) else asdict(model),
                "family": family,
                "labels": self.labels,
                "optim": asdict(self.optim),
                "lora": asdict(self.lora),
                "train_last_blocks": train_last_blocks,
                "class_weights": class_weights,
            }
        )
        self.model = GPT(model_cfg) if family == "gpt" else Bert(model_cfg)
        if family == "gpt":
            del self.model.lm_head  # tied to the embedding: the weights stay, the head goes
        else:
            del self.model.mlm_head  # pretraining's head; the pooler serves classification
        self.head = nn.Linear(model_cfg.n_embd, len(labels))
        self.drop = nn.Dropout(model_cfg.dropout)
        self.register_buffer(
            "class_weights",
            torch.tensor(class_weights) if class_weights else torch.ones(len(labels)),
            persistent=False,
        )
        self._choose_trainable(train_last_blocks)
        self.val_metrics = metrics(len(labels))
        self.test_metrics = metrics(len(labels))

    def _choose_trainable(self, train_last_blocks: int | None) -> None:
        if self.lora.rank > 0:
            add_lora(
                self.model, self.lora.targets, self.lora.rank, self.lora.alpha, self.lora.dropout
            )
        elif train_last_blocks is not None:
            self.model.requires_grad_(False)
            for block in list(self.model.blocks)[len(self.model.blocks) - train_last_blocks :]:
                block.requires_grad_(True)
            last = self.model.ln_f if self.family == "gpt" else self.model.pooler
            last.requires_grad_(True)
        if self.family == "bert" and self.lora.rank > 0:
            self.model.pooler.requires_grad_(True)  # a fresh task for the pooler: train it

    def load_backbone(self, state: dict) -> None:
        """Pretrained weights of the GPT / BERT (the LM head of a GPT is left out)."""
        own = self.model.state_dict()
        missing = [k for k in own if k not in state and "lora_" not in k]
        if missing:
            raise LMForgeError(f"the pretrained weights lack {', '.join(missing[:3])}")
        self.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token as for pretraining (6N + 12·L·H·Q·T, PaLM), N the matmul
        weights of the blocks; frozen weights skip their weight gradients, so with LoRA or frozen
        blocks this overcounts by up to a third."""
        c = self.model.config
        n = sum(p.numel() for name, p in self.model.blocks.named_parameters() if p.dim() == 2)
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def forward(self, batch: dict) -> torch.Tensor:
        """Class logits (B, n_classes)."""
        ids = batch["input_ids"]
        if self.family == "gpt":
            hidden = self.model.features(ids)  # causal: right padding never reaches real tokens
            last = hidden[torch.arange(ids.size(0), device=ids.device), batch["lengths"] - 1]
        else:
            last = self.model.pooled(self.model(ids, batch["attention_mask"]))
        return self.head(self.drop(last))

    def training_step(self, batch, batch_idx):
        logits = self(batch)
        y = batch["labels"]
        w = self.class_weights[y]
        loss_sum = (F.cross_entropy(logits.float(), y, reduction="none") * w).sum()
        self.count_tokens(batch["input_ids"].numel())
        return self.step_loss(loss_sum, w.sum(), scale=y.numel())

    def _eval_step(self, batch, collection: MetricCollection) -> None:
        collection.update(self(batch).argmax(-1), batch["labels"])

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics)

    def _log_metrics(self, collection: MetricCollection, prefix: str) -> dict:
        values = collection.compute()
        collection.reset()
        self.log(f"{prefix}/acc", values["acc"], prog_bar=True, sync_dist=True)
        self.log(f"{prefix}/f1_macro", values["f1_macro"], sync_dist=True)
        for i, label in enumerate(self.labels):
            self.log(f"{prefix}/precision_{label}", values["precision"][i], sync_dist=True)
            self.log(f"{prefix}/recall_{label}", values["recall"][i], sync_dist=True)
        confusion = values["confusion"].tolist()
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and self.trainer.is_global_zero:
                logger.log_table(
                    key=f"{prefix}/confusion",
                    columns=["true \\ predicted", *self.labels],
                    data=[[label, *row] for label, row in zip(self.labels, confusion, strict=True)],
                )
        return {"confusion": confusion}

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self.test_confusion = self._log_metrics(self.test_metrics, "test")["confusion"]

    @torch.no_grad()
    def predict_texts(self, texts: list[str], tokenizer, max_len: int = 128) -> list[str]:
        """The predicted label of each text."""
        from lmforge.data.classification import ClassificationDataConfig, collate, encode

        cfg = ClassificationDataConfig(train="", val="", max_len=max_len)
        data, _ = encode(
            [(t, self.labels[0]) for t in texts], self.labels, tokenizer, self.family, cfg, "texts"
        )
        pad = tokenizer.token_to_id("[PAD]" if self.family == "bert" else "<|endoftext|>") or 0
        batch = collate([data[i] for i in range(len(data))], pad)
        was = self.training
        self.eval()
        try:
            logits = self(batch)
        finally:
            self.train(was)
        return [self.labels[i] for i in logits.argmax(-1).tolist()]
