"""What every lmforge task shares: optimizer groups, the learning-rate schedule, token losses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.tensor.experimental import implicit_replication
from torchmetrics.aggregation import MeanMetric

from lmforge.config import build
from lmforge.errors import LMForgeError
from lmforge.models.registry import family as get_family
from lmforge.models.registry import family_of
from lmforge.tasks.config import TaskConfig
from lmforge.tasks.muon import MuonWithAdamW
from lmforge.tasks.optim import lr_at


class NonFiniteError(LMForgeError):
    """A non-finite loss or gradient norm under task.on_nonfinite=stop."""


def token_loss(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over real target tokens, and their count.

    Dividing the sums accumulated over micro-batches (and ranks) by the summed counts gives the
    token-weighted mean, which a mean of per-batch means does not when batches hold different
    numbers of real tokens.
    """
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    return loss_sum, (targets != ignore_index).sum()


@dataclass
class Recipe:
    """What a task's ``recipe`` hands the runner: the module and data module of the run, the
    model config actually trained (recorded in the run's config), and how the run goes."""

    module: LMTask
    datamodule: L.LightningDataModule
    model_config: Any
    batch_size: int  # sequences per device per micro-batch
    seq_len: int  # positions per sequence (at most, for padded batches)
    global_batch_tokens: int | None = None  # derive the accumulation from this target
    validate_first: bool = False  # validate before training (step 0)
    test: bool = False  # evaluate the test split after training
    trainer_args: dict = field(default_factory=dict)  # e.g. inference_mode=False


class StepTokens:
    """Normalises the loss of an optimizer step by the real target tokens of the whole step.

    Each micro-batch back-propagates ``loss_sum / scale`` (``scale``: a constant of the run, the
    same on every rank and micro-batch, e.g. the positions of one full micro-batch; padded or
    short batches must not change it, or the ranks' gradients would be averaged with unequal
    weights); Lightning divides by the accumulation count A and
    DDP averages over the world size W, so the accumulated gradient is
    sum(grad loss_sum) / (scale * A * W). Once the step's micro-batches are in, ``close``
    sums the step's loss and token count N over the ranks and returns the step's mean loss and
    ``factor`` = scale * A * W / N, by which the gradients are multiplied: the result is the
    gradient of the token-weighted mean loss of the step, whatever the padding or masking of
    each micro-batch (a mean of per-batch means is not).
    """

    def __init__(self) -> None:
        self.loss_sum: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None
        self.scale = 1.0

    def add(self, loss_sum: torch.Tensor, n_tokens: torch.Tensor, scale: float) -> torch.Tensor:
        """Record a micro-batch; returns the loss to back-propagate for it."""
        if self.loss_sum is None:
            self.loss_sum, self.tokens = loss_sum.detach(), n_tokens
        else:
            self.loss_sum = self.loss_sum + loss_sum.detach()
            self.tokens = self.tokens + n_tokens
        self.scale = scale
        return loss_sum / scale

    def close(self, trainer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean loss, gradient factor) of the step just accumulated, over all ranks; None when
        nothing was recorded."""
        if self.tokens is None:
            return None
        loss_sum, n = self.loss_sum, self.tokens
        self.loss_sum = self.tokens = None
        if trainer.world_size > 1:
            totals = trainer.strategy.reduce(
                torch.stack([loss_sum, n.to(loss_sum.dtype)]), reduce_op="sum"
            )
            loss_sum, n = totals[0], totals[1]
        n = n.clamp(min=1)
        factor = self.scale * trainer.accumulate_grad_batches * trainer.world_size / n
        return loss_sum / n, factor


class LMTask(L.LightningModule):
    """Base LightningModule of every task: the optimizer groups and schedule, the token
    normalisation of each step (``StepTokens``), applied together with gradient clipping in one
    pass over the gradients, the non-finite policy, per-step dropout seeds, validation
    loss/perplexity, and the checks made when a checkpoint is loaded.

    Subclasses build ``self.model`` (a model of a registered family), call ``save_config``, and
    define ``recipe``.
    """

    model: torch.nn.Module
    tokens_seen: int = 0  # input positions consumed over all ranks (logged as train/tokens)
    skipped_steps: int = 0
    _configured: bool = False

    config_class: type[TaskConfig] = TaskConfig  # the task config this module takes

    def __init__(self, task: TaskConfig | dict, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(task, self.config_class):  # load_from_checkpoint: a plain dict
            task = build(task, "task", cls=self.config_class)
        self.task = task
        self.optim = task.optim
        self.seed = seed  # with (rank, step, micro-batch), seeds the dropout masks
        self.step_tokens = StepTokens()
        self.val_loss = MeanMetric()  # token-weighted: update(mean, weight=n_tokens)
        self._step_loss: torch.Tensor | None = None
        self._grad_factor: torch.Tensor | None = None
        self._skipped_in_a_row = 0

    @classmethod
    def recipe(cls, run, ckpt_path: str | None) -> Recipe:
        """The module and data module of ``run`` (the validated config, ``lmforge.cli.train.Run``);
        ``ckpt_path``: the checkpoint the run resumes from, if any."""
        raise NotImplementedError

    @classmethod
    def pretraining_recipe(cls, run, ckpt_path: str | None, dm) -> Recipe:
        """The recipe of a pretraining task on the token data module ``dm``: a model of the
        ``model`` config (vocabulary from the tokenizer) or of ``init_from``."""
        from lmforge.run import initial_model, pretraining_model

        dm.prepare_data()
        model_cfg = pretraining_model(run, dm.meta["vocab_size"])
        initial = initial_model(run, model_cfg, dm, ckpt_path)
        module = cls(initial.config if initial else model_cfg, run.task, run.cfg.seed)
        if initial is not None:
            module.model.load_state_dict(initial.state_dict())
        return Recipe(
            module,
            dm,
            module.model.config,
            batch_size=run.data.batch_size,
            seq_len=run.data.seq_len,
            global_batch_tokens=run.data.global_batch_tokens,
        )

    def trained_share(self) -> str:
        """'N of M parameters trained', for the start of a fine-tune."""
        trained = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return f"{trained:,} of {sum(p.numel() for p in self.parameters()):,} parameters trained"

    def step_loss(self, loss_sum: torch.Tensor, n_tokens: torch.Tensor, scale: int) -> torch.Tensor:
        """The loss to back-propagate for one micro-batch (see ``StepTokens``)."""
        return self.step_tokens.add(loss_sum, n_tokens, scale)

    def update_val_loss(self, loss_sum: torch.Tensor, n: torch.Tensor) -> None:
        self.val_loss.update(loss_sum / n.clamp(min=1), weight=n)  # n = 0 (a blank) adds nothing

    def log_val_loss(self) -> torch.Tensor:
        """Log val/loss and val/ppl: token-weighted over the split, reduced across ranks."""
        loss = self.val_loss.compute()
        self.val_loss.reset()
        # The values are already reduced over ranks; sync_dist marks them so (a mean of equals).
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", loss.exp(), sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        self.log_val_loss()

    def configure_model(self) -> None:
        """Activation checkpointing, compilation and sharding, applied once to the model (not the
        LightningModule, so state-dict keys stay the model's own).

        Compilation by default only on CUDA, where it pays (on a CPU it costs 30-40 s a shape for
        at most 1.25x). Under FSDP each block is compiled, then sharded as one unit.
        """
        if self._configured or self._trainer is None:  # load_from_checkpoint: nothing to set up
            return
        self._configured = True
        from lightning.pytorch.strategies import ModelParallelStrategy

        from lmforge.parallel import shard

        strategy = self.trainer.strategy
        self.model.checkpoint_blocks = self.task.activation_checkpointing
        compile_model = self.task.compile == "true" or (
            self.task.compile == "auto" and strategy.root_device.type == "cuda"
        )
        if isinstance(strategy, ModelParallelStrategy):
            if compile_model:
                for block in self.model.blocks:
                    block.compile()
            shard(
                self.model,
                self.device_mesh["data_parallel"],
                self.model.blocks,
                bf16=str(self.trainer.precision).startswith("bf16"),
                cpu_offload=getattr(strategy, "cpu_offload", False),
                reshard_after_forward=getattr(strategy, "reshard_after_forward", True),
                heads=[
                    m
                    for m in self.children()
                    if m is not self.model and any(p.requires_grad for p in m.parameters())
                ],
            )
        elif compile_model:
            self.model.compile()

    def on_train_start(self) -> None:
        self._trainable = [
            p for p in self.parameters() if p.requires_grad
        ]  # walked once, not every step

    def on_before_optimizer_step(self, optimizer) -> None:
        closed = self.step_tokens.close(self.trainer)
        if closed is None:
            return
        self._step_loss, self._grad_factor = closed
        if self.logging_step():
            # Straight to the loggers, now: a checkpoint at the end of this step then never
            # precedes the step's row, so a run killed in between resumes with no row missing.
            row = {"train/loss": self._step_loss.item(), "train/tokens": float(self.tokens_seen)}
            for logger in self.trainer.loggers:
                logger.log_metrics(row, step=self.trainer.global_step)
            self.log("train/loss", self._step_loss, prog_bar=True, logger=False)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Token normalisation and clipping by norm in one multiplication of the gradients
        (Lightning calls this hook every step, with or without clipping configured)."""
        factor, self._grad_factor = self._grad_factor, None
        grads = [p.grad for p in self._trainable if p.grad is not None]
        if factor is None or not grads:
            return self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        norm = torch.nn.utils.get_total_norm(grads) * factor  # the normalised gradient's norm
        if hasattr(norm, "full_tensor"):  # sharded (FSDP) gradients
            norm = norm.full_tensor()
        if not self.finite_step(norm):
            return
        if self.logging_step():  # the token-normalised gradient's norm, before clipping
            for logger in self.trainer.loggers:
                logger.log_metrics({"train/grad_norm": norm.item()}, step=self.trainer.global_step)
        by_norm = gradient_clip_val and gradient_clip_algorithm in (None, "norm")
        if by_norm:
            factor = factor * torch.clamp(gradient_clip_val / (norm + 1e-6), max=1.0)
        with implicit_replication():  # sharded (DTensor) gradients times a plain scalar tensor
            torch._foreach_mul_(grads, factor.to(grads[0].dtype))  # no host sync
        if gradient_clip_val and not by_norm:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)  # by value

    def finite_step(self, grad_norm: torch.Tensor) -> bool:
        """Check the step's loss and gradient norm (one host sync a step). A non-finite one
        either stops training (``stop``: nothing more is saved, the last good checkpoint stays)
        or skips the step (``skip``: the gradients are dropped, so AdamW leaves parameters and
        moments untouched; the step is counted in ``train/skipped_steps``)."""
        loss = self._step_loss if self._step_loss is not None else grad_norm.new_zeros(())
        if bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
            self._skipped_in_a_row = 0
            return True
        step = self.trainer.global_step + 1
        what = f"loss {loss.item():.4g}, gradient norm {grad_norm.item():.4g}"
        if self.task.on_nonfinite == "stop":
            raise NonFiniteError(
                f"non-finite values at step {step} ({what}): the learning rate is likely too high"
                f" (task.optim.lr={self.optim.lr}) or the data holds a bad batch; the last good"
                " checkpoint is kept: resume with resume=auto and a lower learning rate, or set"
                " task.on_nonfinite=skip"
            )
        self._skipped_in_a_row += 1
        if self._skipped_in_a_row > self.task.max_skipped_steps:
            raise NonFiniteError(
                f"{self._skipped_in_a_row} steps in a row were non-finite (the last: step {step},"
                f" {what}): training is not recovering; resume from the last good checkpoint"
                " with resume=auto and a lower task.optim.lr (task.max_skipped_steps sets the"
                " limit)"
            )
        for p in self._trainable:
            p.grad = None  # AdamW skips parameters without a gradient
        self.skipped_steps += 1
        rank_zero_warn(f"step {step} skipped ({what}); {self.skipped_steps} skipped so far")
        for logger in self.trainer.loggers:
            logger.log_metrics({"train/skipped_steps": self.skipped_steps}, step=step - 1)
        return False

    def on_train_batch_start(self, batch, batch_idx) -> None:
        """Dropout masks drawn from (seed, rank, step, micro-batch) alone, like the data: a
        resumed run draws what the uninterrupted one would have."""
        micro = batch_idx % self.trainer.accumulate_grad_batches
        key = (self.seed, self.global_rank, self.trainer.global_step, micro)
        seed = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)
        # Only the generators dropout draws from: torch.manual_seed also queues seeds for every
        # uninitialised backend, formatting a stack trace for each (~0.5 ms a step on a CPU).
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def logging_step(self) -> bool:
        """Whether Lightning writes this step to the loggers: every ``log_every_n_steps`` optimizer
        steps, at a stop, and in a fast dev run (the rule of Lightning's own logger connector);
        ``self.log`` costs time, so the other steps skip it."""
        trainer = self.trainer
        due = (trainer.global_step + 1) % trainer.log_every_n_steps == 0
        return due or trainer.should_stop or bool(trainer.fast_dev_run)

    def param_groups(self) -> list[dict]:
        """Weight decay for matrices (embeddings as ``decay_embeddings`` says); none for biases and norms.

        With ``optimizer=muon`` the 2-D weights inside ``model.blocks`` (attention and MLP
        matrices, LoRA adapters of those) form a first group marked ``use_muon``, at ``muon_lr``.
        """
        c = self.optim
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, torch.nn.Embedding)}
        hidden = set()
        if c.optimizer == "muon":
            hidden = {id(p) for p in self.model.blocks.parameters() if p.dim() == 2}
        muon, decay, no_decay = [], [], []
        for _, p in self.named_parameters():  # the model and any head; tied weights appear once
            if p.requires_grad:
                is_matrix = p.dim() >= 2 and (c.decay_embeddings or id(p) not in embeddings)
                (muon if id(p) in hidden else decay if is_matrix else no_decay).append(p)
        if c.optimizer == "muon":
            rank_zero_info(
                f"optimizer groups: Muon on {len(muon)} block matrices / "
                f"{sum(p.numel() for p in muon):,} params at lr {c.muon_lr}"
            )
        rank_zero_info(
            f"optimizer groups: {len(decay)} tensors / {sum(p.numel() for p in decay):,} params with "
            f"weight decay {c.weight_decay}; {len(no_decay)} tensors / "
            f"{sum(p.numel() for p in no_decay):,} params without"
        )
        groups = [
            {"params": decay, "weight_decay": c.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if c.optimizer == "muon":
            wd = c.weight_decay if c.muon_weight_decay is None else c.muon_weight_decay
            groups.insert(
                0, {"params": muon, "weight_decay": wd, "lr": c.muon_lr, "use_muon": True}
            )
        return groups

    def total_steps(self) -> int:
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return int(self.trainer.estimated_stepping_batches)

    def configure_optimizers(self):
        c = self.optim
        # The fused kernel on every device: on a CPU torch's default is the per-tensor loop,
        # 2.3 ms a step against 0.7 ms on nanoGPT's Shakespeare model (bench/vs_nanogpt.py)
        adamw = {"lr": c.lr, "betas": (c.beta1, c.beta2), "eps": c.eps, "fused": True}
        if c.optimizer == "muon":
            muon = {"momentum": c.muon_momentum, "adjust_lr_fn": c.muon_adjust_lr}
            opt = MuonWithAdamW(self.param_groups(), muon, adamw)
        else:
            opt = torch.optim.AdamW(self.param_groups(), **adamw)
        total = self.total_steps()
        # Each group's own peak (lr, muon_lr) times the schedule's factor
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, c, total) / c.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def make_model(self, model, family: str, **extra) -> torch.nn.Module:
        """The model of ``model`` (a config of a registered family, or its fields as a dict, as
        ``load_from_checkpoint`` passes them); records the family, the model's init fields, the
        task config, the seed and ``extra`` as hyperparameters, plain values that checkpoints
        load with ``torch.load(weights_only=True)``."""
        fam = get_family(family) if isinstance(model, dict) else family_of(model)
        config = fam.config(**model) if isinstance(model, dict) else model
        init_fields = {f.name: getattr(config, f.name) for f in fields(config) if f.init}
        self.save_hyperparameters(
            {"family": fam.name, "model": init_fields, "task": asdict(self.task), "seed": self.seed}
            | extra
        )
        return fam.build(config)

    def count_tokens(self, n_positions: int) -> None:
        self.tokens_seen += n_positions * self.trainer.world_size

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        checkpoint["skipped_steps"] = self.skipped_steps
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "tokenizer"):
            checkpoint["tokenizer"] = dm.tokenizer.to_str()  # the tokenizer travels with the model
            settings = getattr(dm, "tokenizer_settings", None)
            if settings is not None and settings.to_dict():  # its special tokens, chat template
                checkpoint["tokenizer_config"] = settings.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the counters of a resumed run. That the checkpoint holds this model and
        tokenizer was checked before anything was written (``run.check_resumable``)."""
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
