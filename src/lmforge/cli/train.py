"""lmforge-train: compose model, data, task, trainer and loggers from the config, then fit."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lmforge.cli import CONFIG_PATH, reports_errors
from lmforge.config import build
from lmforge.errors import LMForgeError
from lmforge.run import (
    check_resumable,
    check_run_settings,
    global_batch,
    holds_run_dir,
    initial_model,
    refuse_multirun_with_ranks,
    report,
    resume_from,
)


@dataclass
class RunConfig:
    """The typed pieces of a training run, validated before anything heavy is imported."""

    model: Any
    data: Any
    task: dict[str, Any]  # the task's typed sections (optim, masking, ...): constructor kwargs
    compile: str  # task.compile: auto | true | false
    activation_checkpointing: bool  # task.activation_checkpointing
    on_nonfinite: str  # task.on_nonfinite: stop | skip


def validate(cfg: DictConfig) -> RunConfig:
    """Check every user-set field; raises LMForgeError naming the key."""
    vocab = cfg.model.get("vocab_size")
    model = build(cfg.model, "model", vocab_size=vocab or 1)  # vocab checked again with the data
    data = build(cfg.data, "data")
    sections = {
        key: build(node, f"task.{key}")
        for key, node in cfg.task.items()
        if isinstance(node, DictConfig) and "_target_" in node
    }
    if getattr(data, "seq_len", 0) > model.block_size:
        raise LMForgeError(
            f"data.seq_len={data.seq_len} exceeds model.block_size={model.block_size}:"
            " lower data.seq_len or raise model.block_size"
        )
    compile_mode = str(cfg.task.get("compile", "auto")).lower()
    if compile_mode not in ("auto", "true", "false"):
        raise LMForgeError(f"task.compile={cfg.task.compile!r}: use auto (on CUDA), true or false")
    checkpointing = cfg.task.get("activation_checkpointing", False)
    if not isinstance(checkpointing, bool):
        raise LMForgeError(f"task.activation_checkpointing={checkpointing!r}: use true or false")
    on_nonfinite = str(cfg.task.get("on_nonfinite", "stop"))
    if on_nonfinite not in ("stop", "skip"):
        raise LMForgeError(f"task.on_nonfinite={on_nonfinite!r}: use stop or skip")
    check_run_settings(cfg)
    return RunConfig(model, data, sections, compile_mode, checkpointing, on_nonfinite)


def build_loggers(cfg: DictConfig) -> list:
    loggers = (hydra.utils.instantiate(node) for node in (cfg.logger or {}).values())
    return [lg for lg in loggers if lg is not None]


@holds_run_dir
def train(cfg: DictConfig) -> dict:
    """Run one training job; returns the final metrics."""
    typed = validate(cfg)

    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger, WandbLogger
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lmforge.callbacks.checkpointing import EXIT_REQUEUE, AtomicCheckpointIO, Preempted
    from lmforge.loggers import trim_metrics

    out_dir = cfg.paths.output_dir
    ckpt_path, resume_step = resume_from(cfg.resume, Path(out_dir) / "checkpoints")

    from lmforge.data.classification import ClassificationDataConfig
    from lmforge.data.config import DataConfig
    from lmforge.data.instructions import InstructionDataConfig

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if isinstance(typed.data, ClassificationDataConfig):
        dm, task = classification_setup(cfg, typed)
    elif isinstance(typed.data, InstructionDataConfig):
        dm, task = instruction_setup(cfg, typed)
    else:
        dm, task = language_model_setup(cfg, typed, ckpt_path)
    check_resumable(ckpt_path, task, dm)  # before anything in the run directory is written
    task.compile = typed.compile
    task.activation_checkpointing = typed.activation_checkpointing
    task.on_nonfinite = typed.on_nonfinite
    task.seed = cfg.seed
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs in fp32

    loggers = build_loggers(cfg)
    callbacks = [
        hydra.utils.instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None
    ]
    # Data parallelism is in the data module (each rank its rows of one global batch, its share
    # of the validation windows), not in a DistributedSampler.
    # Instruction tuning validates before fitting: metric states made under inference mode
    # could not be updated in the fit's validations, so evaluation runs under no_grad there.
    eval_mode = {"inference_mode": False} if isinstance(typed.data, InstructionDataConfig) else {}
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=callbacks,
        use_distributed_sampler=False,
        **eval_mode,
    )
    refuse_multirun_with_ranks(trainer.world_size)
    if not isinstance(typed.data, DataConfig) and trainer.world_size > 1:
        raise LMForgeError("fine-tuning runs on one device for now: use trainer=cpu or gpu")
    batch = global_batch(trainer, typed.data)
    if not isinstance(trainer.strategy, ModelParallelStrategy):  # that one stages its own writes
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    if trainer.is_global_zero:
        os.makedirs(out_dir, exist_ok=True)
        OmegaConf.save(cfg, os.path.join(out_dir, "config.yaml"), resolve=True)
    n_params = task.model.num_params()
    n_embedding = sum(
        m.weight.numel() for m in task.model.modules() if isinstance(m, torch.nn.Embedding)
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
        if isinstance(typed.data, InstructionDataConfig) and ckpt_path is None:
            trainer.validate(task, datamodule=dm, verbose=False)  # step 0: before tuning
        trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if getattr(dm, "sets", {}).get("test") is not None:  # classification: the held-out split
            trainer.test(task, datamodule=dm, verbose=False)
            metrics |= {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    except Preempted as e:
        print(f"{e}: resume with resume=auto", flush=True)
        sys.exit(EXIT_REQUEUE)
    finally:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()
    if trainer.is_global_zero:
        report(trainer, metrics, out_dir)
    return metrics


def language_model_setup(cfg: DictConfig, typed: RunConfig, ckpt_path: str | None):
    """The token data module and the pretraining task (GPT or BERT) of a run."""
    from lmforge.data.datamodule import TokenDataModule

    dm = TokenDataModule(typed.data, seed=cfg.seed, masking=typed.task.get("masking"))
    dm.prepare_data()
    tok_vocab = dm.meta["vocab_size"]
    user_vocab = cfg.model.get("vocab_size")
    if user_vocab is not None and user_vocab < tok_vocab:
        raise LMForgeError(
            f"model.vocab_size={user_vocab} is smaller than the tokenizer's {tok_vocab}:"
            " remove model.vocab_size to take the tokenizer's size"
        )
    model_cfg = build(cfg.model, "model", vocab_size=user_vocab or tok_vocab)
    task_cls = hydra.utils.get_class(cfg.task._target_)
    initial = None
    if cfg.get("init_from") and ckpt_path is None:  # a resumed run has its own weights
        initial = initial_model(
            cfg.init_from, model_cfg, tok_vocab, dm, masked="masking" in typed.task
        )
        model_cfg = initial.config
    task = task_cls(model=model_cfg, **typed.task)
    if initial is not None:
        task.model.load_state_dict(initial.state_dict())
    return dm, task


def fine_tuning_model(backbone, cfg: DictConfig, max_len: int) -> dict:
    """The pretrained model's config fields, with the run's ``model.dropout``; refuses examples
    longer than its context."""
    from dataclasses import fields

    model = {f.name: getattr(backbone.config, f.name) for f in fields(backbone.config) if f.init}
    model["dropout"] = cfg.model.get("dropout", model["dropout"])
    if max_len > model["block_size"]:
        raise LMForgeError(
            f"data.max_len={max_len} exceeds the model's block_size={model['block_size']}"
        )
    return model


def classification_setup(cfg: DictConfig, typed: RunConfig):
    """Labelled data tokenized with the pretrained model's tokenizer, and a classifier on it."""

    from lmforge.checkpoint import load_pretrained
    from lmforge.data.datamodule import ClassificationDataModule
    from lmforge.tasks.classification import ClassificationTask

    if not cfg.get("init_from"):
        raise LMForgeError(
            "classification fine-tunes a pretrained model: set init_from=<checkpoint of"
            " lmforge-train, or a transformers GPT-2 / BERT directory>"
        )
    backbone, tokenizer, family = load_pretrained(cfg.init_from)
    if tokenizer is None:
        raise LMForgeError(f"init_from={cfg.init_from} carries no tokenizer (tokenizer.json)")
    dm = ClassificationDataModule(typed.data, tokenizer, family, seed=cfg.seed)
    dm.setup("fit")
    model = fine_tuning_model(backbone, cfg, typed.data.max_len)
    task = ClassificationTask(
        model=model,
        family=family,
        labels=dm.labels,
        optim=typed.task["optim"],
        lora=typed.task.get("lora"),
        train_last_blocks=cfg.task.get("train_last_blocks"),
        class_weights=dm.class_weights().tolist() if typed.data.balance == "weights" else None,
    )
    task.load_backbone(backbone.state_dict())
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(
        f"classifier on a {family.upper()} from {cfg.init_from}: labels {dm.labels};"
        f" {trainable:,} of {sum(p.numel() for p in task.parameters()):,} parameters trained"
    )
    return dm, task


def instruction_setup(cfg: DictConfig, typed: RunConfig):
    """Instruction records tokenized with the pretrained GPT's tokenizer, and the tuning task."""

    from lightning.pytorch.utilities import rank_zero_info

    from lmforge.checkpoint import load_pretrained
    from lmforge.data.datamodule import InstructionDataModule
    from lmforge.data.instructions import render_prompt
    from lmforge.tasks.instruction import InstructionTask

    if not cfg.get("init_from"):
        raise LMForgeError("instruction tuning starts from a pretrained GPT: set init_from=...")
    backbone, tokenizer, family = load_pretrained(cfg.init_from)
    if family != "gpt" or tokenizer is None:
        raise LMForgeError(
            f"init_from={cfg.init_from}: instruction tuning needs a GPT with its tokenizer"
        )
    model = fine_tuning_model(backbone, cfg, typed.data.max_len)
    dm = InstructionDataModule(typed.data, tokenizer, seed=cfg.seed)
    dm.setup("fit")
    task = InstructionTask(model=model, optim=typed.task["optim"], lora=typed.task.get("lora"))
    missing, _ = task.model.load_state_dict(backbone.state_dict(), strict=False)
    if any("lora_" not in k for k in missing):
        raise LMForgeError(f"the pretrained weights lack {', '.join(missing[:3])}")
    task.tokenizer = tokenizer
    task.sample_prompts = [
        render_prompt(r, typed.data) for r in dm.val_records[: typed.data.sample_prompts]
    ]
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    rank_zero_info(
        f"instruction tuning a GPT from {cfg.init_from}: {trainable:,} of"
        f" {sum(p.numel() for p in task.parameters()):,} parameters trained"
    )
    return dm, task


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get("val/loss")  # the objective of Hydra sweepers


if __name__ == "__main__":
    sys.exit(main())
