"""Instruction tuning: next-token loss on the response tokens only (the prompt is context).

The loss of an optimizer step is the mean over its response tokens, on every micro-batch and
rank (``LMTask``). Validation reports the response-token loss and perplexity and, for a fixed
set of validation prompts, the responses the model generates (greedy), printed and logged to
W&B as a table row per prompt and validation: the rows of step 0 (``lmforge-train`` validates
before training) show the responses before tuning.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info

from lmforge.data.datamodule import InstructionDataModule
from lmforge.errors import LMForgeError
from lmforge.run import pretrained_model
from lmforge.tasks.base import LMTask, Recipe, token_loss
from lmforge.tasks.config import InstructionConfig


class InstructionTask(LMTask):
    config_class = InstructionConfig

    def __init__(
        self,
        model,
        task: InstructionConfig | dict | None = None,
        seed: int = 0,
        family: str = "gpt",
        positions: int = 4096,
    ) -> None:
        super().__init__(task or InstructionConfig(), seed)
        self.positions = positions  # batch_size x max_len: the loss scale of every step
        self.model = self.make_model(model, family, positions=positions)
        self.task.lora.apply(self.model)
        self.sample_prompts: list[list[int]] = []  # set by the recipe: validation prompts' tokens
        self.stop_ids: list[int] = []  # what ends a response (EOS, the template's end of turn)
        self.tokenizer = None
        self.rows: list[list] = []

    @classmethod
    def recipe(cls, run, ckpt_path: str | None) -> Recipe:
        """Instruction records tokenized with the pretrained model's tokenizer, and the tuning
        task on the causal LM of ``init_from``; validates before tuning (step 0)."""
        loaded, config = pretrained_model(run, run.data.max_len, causal=True)
        dm = InstructionDataModule(
            run.data, loaded.tokenizer, seed=run.cfg.seed, settings=loaded.tokenizer_settings
        )
        dm.setup("fit")
        positions = run.data.batch_size * run.data.max_len
        module = cls(config, run.task, run.cfg.seed, loaded.family.name, positions)
        missing, _ = module.model.load_state_dict(loaded.model.state_dict(), strict=False)
        if any("lora_" not in k for k in missing):
            raise LMForgeError(f"the pretrained weights lack {', '.join(missing[:3])}")
        module.tokenizer = loaded.tokenizer
        module.sample_prompts = [  # through the chat template when the data uses one
            dm.framing.prompt_ids(r, n, str(run.data.val))
            for n, r in enumerate(dm.val_records[: run.data.sample_prompts], 1)
        ]
        module.stop_ids = dm.framing.stop_ids
        rank_zero_info(f"instruction tuning: {module.trained_share()}")
        # Metric states made under inference mode could not be updated in the fit's
        # validations, so evaluation runs under no_grad.
        return Recipe(
            module,
            dm,
            config,
            batch_size=run.data.batch_size,
            seq_len=run.data.max_len,
            validate_first=ckpt_path is None,
            trainer_args={"inference_mode": False},
        )

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["input_ids"], segments=batch.get("segments"))
        loss_sum, n = token_loss(logits, batch["labels"])
        self.count_tokens(batch["input_ids"].numel())
        return self.step_loss(loss_sum, n, scale=self.positions)

    def validation_step(self, batch, batch_idx):
        self.update_val_loss(*token_loss(self.model(batch["input_ids"]), batch["labels"]))

    def on_validation_epoch_end(self) -> None:
        self.log_val_loss()
        if self.tokenizer is not None and self.sample_prompts and not self.trainer.sanity_checking:
            self.log_samples()

    @torch.no_grad()
    def respond(self, prompt: list[int]) -> str:
        """The greedy response to a prompt's tokens, up to the first of ``stop_ids`` (EOS, or
        the chat template's end of turn; <|endoftext|> when the recipe set none)."""
        tok = self.tokenizer
        ids = prompt[-(self.model.config.block_size - 1) :]
        room = self.model.config.block_size - len(ids)
        out = self.model.generate(
            torch.tensor([ids], device=self.device),
            max(1, min(self.task.max_new_tokens, room)),
            temperature=0,
        )[0, len(ids) :].tolist()
        stops = self.stop_ids or [tok.token_to_id("<|endoftext|>")]
        end = next((i for i, t in enumerate(out) if t in stops), len(out))
        return tok.decode(out[:end])

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
