"""lmforge-train: compose the config, validate it, let the task build its recipe, then fit.

The runner knows no task by name: ``task._target_`` names the task's typed config, which names
its LightningModule, whose ``recipe`` builds the module and the data module (see
docs/architecture.md for what a new task touches).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from lmforge.cli import CONFIG_PATH, reports_errors
from lmforge.config import build
from lmforge.errors import LMForgeError
from lmforge.run import (
    check_resumable,
    check_run_settings,
    eval_data_choice,
    global_batch,
    holds_run_dir,
    pad_vocab_for_device,
    refuse_multirun_with_ranks,
    report,
    resume_from,
)


@dataclass
class Run:
    """The validated pieces of a training run: typed, checked before anything heavy loads."""

    cfg: DictConfig  # the composed config (seed, init_from, resume, paths, ...)
    task: Any  # the task's config (a lmforge.tasks.config.TaskConfig)
    data: Any  # the data config the task trains on
    model: Any  # the model config (model=pretrained for a fine-tune: FromPretrained)


def validate(cfg: DictConfig) -> Run:
    """Check every user-set field; raises LMForgeError naming the key and the fix."""
    task = build(cfg.task, "task")  # a lmforge.tasks.config.TaskConfig
    data = build(cfg.data, "data")
    task.check_data(data)
    # A null vocab_size is the tokenizer's, known once the data is prepared (recipe)
    pad_vocab_for_device(cfg)
    vocab = {"vocab_size": cfg.model.vocab_size or 1} if "vocab_size" in cfg.model else {}
    model = build(cfg.model, "model", **vocab)
    task.check_model(model)
    seq_len = getattr(data, "seq_len", 0)
    if not task.pretrained and seq_len > model.block_size:
        raise LMForgeError(
            f"data.seq_len={seq_len} exceeds model.block_size={model.block_size}:"
            " lower data.seq_len or raise model.block_size"
        )
    check_run_settings(cfg)
    return Run(cfg, task, data, model)


@holds_run_dir
def train(cfg: DictConfig) -> dict:
    """Run one training job; returns the final metrics."""
    run = validate(cfg)

    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger, WandbLogger
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lmforge.callbacks.checkpointing import AtomicCheckpointIO, Preempted
    from lmforge.callbacks.progress import summary_without_flops
    from lmforge.callbacks.validation import LastStepValidation
    from lmforge.loggers import trim_metrics
    from lmforge.signals import EXIT_REQUEUE

    out_dir = cfg.paths.output_dir
    ckpt_path, resume_step = resume_from(cfg.resume, Path(out_dir) / "checkpoints")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    recipe = hydra.utils.get_class(run.task.module).recipe(run, ckpt_path)
    check_resumable(ckpt_path, recipe.module, recipe.datamodule)  # before any write in the run dir
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs in fp32

    loggers = [lg for lg in map(hydra.utils.instantiate, (cfg.logger or {}).values()) if lg]
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.callbacks or {}).values() if c]
    callbacks.append(LastStepValidation())  # every run ends with a val/loss (a sweep's objective)
    # Data parallelism is in the data modules (each rank its rows of one global batch, its
    # share of the validation set), not in a DistributedSampler.
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=callbacks,
        use_distributed_sampler=False,
        **recipe.trainer_args,
    )
    summary_without_flops(trainer)  # Lightning's counts no FLOPs of our modules: "Total FLOPs: 0"
    refuse_multirun_with_ranks(trainer.world_size)
    batch = global_batch(trainer, recipe)
    if not isinstance(trainer.strategy, ModelParallelStrategy):  # that one stages its own writes
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    with open_dict(cfg):  # the model actually trained, its family's config (init_from: its own)
        cfg.model = {"_target_": _qualname(type(recipe.model_config))} | {
            f.name: getattr(recipe.model_config, f.name)
            for f in fields(recipe.model_config)
            if f.init
        }
    if trainer.is_global_zero:
        os.makedirs(out_dir, exist_ok=True)
        OmegaConf.save(cfg, os.path.join(out_dir, "config.yaml"), resolve=True)
    model = recipe.module.model
    n_params = model.num_params()
    n_embedding = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)
    )
    for logger in trainer.loggers:
        logger.log_hyperparams(
            OmegaConf.to_container(cfg, resolve=True)
            | {"params/total": n_params, "params/non_embedding": n_params - n_embedding}
            | batch
        )
    if resume_step is not None and trainer.is_global_zero:
        for logger in trainer.loggers:  # the resumed run logs its steps again
            if isinstance(logger, CSVLogger):
                trim_metrics(Path(logger.log_dir) / "metrics.csv", resume_step)
    try:
        if recipe.validate_first:
            trainer.validate(recipe.module, datamodule=recipe.datamodule, verbose=False)
        trainer.fit(recipe.module, datamodule=recipe.datamodule, ckpt_path=ckpt_path)
        metrics = scalars(trainer.callback_metrics)
        if recipe.test:
            trainer.test(recipe.module, datamodule=recipe.datamodule, verbose=False)
            metrics |= scalars(trainer.callback_metrics)
    except Preempted as e:
        print(f"{e}: resume with resume=auto", flush=True)
        sys.exit(EXIT_REQUEUE)
    finally:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()
    if trainer.is_global_zero:
        report(trainer, metrics, out_dir, data=eval_data_choice(run.data))
    return metrics


def scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v.numel() == 1}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> float | None:
    from lmforge.signals import stop_on_signals

    with stop_on_signals():  # SIGTERM before the first step: one line, exit 75
        metrics = train(cfg)
    return metrics.get("val/loss")  # the objective of Hydra sweepers


if __name__ == "__main__":
    sys.exit(main())
