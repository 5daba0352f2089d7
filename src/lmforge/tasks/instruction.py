"""Instruction tuning: next-token loss on the response tokens only (the prompt is context).

The loss of an optimizer step is the mean over its response tokens, on every micro-batch and
rank (``LMTask``). Validation reports the response-token loss and perplexity and, for a fixed
set of validation prompts, the responses the model generates (greedy), printed and logged to
W&B as a table row per prompt and validation: the rows of step 0 (``lmforge-train`` validates
before training) show the responses before tuning.
"""

from __future__ import annotations

import torch
from torchmetrics.aggregation import MeanMetric

from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.lora import add_lora
from lmforge.tasks.base import LMTask, token_loss
from lmforge.tasks.classification import LoRAConfig
from lmforge.tasks.optim import OptimConfig


class InstructionTask(LMTask):
    def __init__(
        self,
        model: dict,
        optim: OptimConfig | dict | None = None,
        lora: LoRAConfig | dict | None = None,
        max_new_tokens: int = 64,
    ) -> None:
        super().__init__()
        from dataclasses import asdict

        self.optim = optim if isinstance(optim, OptimConfig) else OptimConfig(**(optim or {}))
        self.lora = lora if isinstance(lora, LoRAConfig) else LoRAConfig(**(lora or {}))
        self.save_hyperparameters(
            {"model": model, "optim": asdict(self.optim), "lora": asdict(self.lora)}
        )
        self.model = GPT(GPTConfig(**model))
        if self.lora.rank > 0:
            add_lora(
                self.model, self.lora.targets, self.lora.rank, self.lora.alpha, self.lora.dropout
            )
        self.max_new_tokens = max_new_tokens
        self.val_loss = MeanMetric()
        self.sample_prompts: list[str] = []  # set by lmforge-train from the validation records
        self.tokenizer = None
        self.rows: list[list] = []

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["input_ids"], segments=batch.get("segments"))
        loss_sum, n = token_loss(logits, batch["labels"])
        self.count_tokens(batch["input_ids"].numel())
        return self.step_loss(loss_sum, n, scale=batch["labels"].numel())

    def validation_step(self, batch, batch_idx):
        loss_sum, n = token_loss(self.model(batch["input_ids"]), batch["labels"])
        self.val_loss.update(loss_sum / n.clamp(min=1), weight=n)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", loss.exp(), sync_dist=True)
        if self.tokenizer is not None and self.sample_prompts and not self.trainer.sanity_checking:
            self.log_samples()

    @torch.no_grad()
    def respond(self, prompt: str) -> str:
        """The greedy response to a rendered prompt, up to <|endoftext|>."""
        tok = self.tokenizer
        ids = tok.encode(prompt).ids[-(self.model.config.block_size - 1) :]
        room = self.model.config.block_size - len(ids)
        out = self.model.generate(
            torch.tensor([ids], device=self.device),
            max(1, min(self.max_new_tokens, room)),
            temperature=0,
        )[0, len(ids) :].tolist()
        eot = tok.token_to_id("<|endoftext|>")
        return tok.decode(out[: out.index(eot)] if eot in out else out)

    def log_samples(self) -> None:
        was = self.training
        self.eval()
        try:
            responses = [self.respond(p) for p in self.sample_prompts]
        finally:
            self.train(was)
        step = self.trainer.global_step
        self.rows += [[step, i, r] for i, r in enumerate(responses)]
        if self.trainer.is_global_zero:
            print(
                f"\n----- response to validation prompt 0 at step {step} -----\n{responses[0]}\n-----"
            )
            from lightning.pytorch.loggers import WandbLogger

            for logger in self.trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_text(
                        key="responses", columns=["step", "prompt", "response"], data=self.rows
                    )
