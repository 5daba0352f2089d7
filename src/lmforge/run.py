"""Run-level helpers of lmforge-train: the checkpoint to resume from, the initial weights, the
global batch, the closing report. Library code: the runner in ``cli/train.py`` only calls them."""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.errors import LMForgeError


def pretraining_model(run, tok_vocab: int):
    """The model config of a pretraining run: the vocabulary is the tokenizer's unless
    ``model.vocab_size`` asks for more."""
    from dataclasses import replace

    asked = run.cfg.model.get("vocab_size")
    if asked is not None and asked < tok_vocab:
        raise LMForgeError(
            f"model.vocab_size={asked} is smaller than the tokenizer's {tok_vocab}:"
            " remove model.vocab_size to take the tokenizer's size"
        )
    return replace(run.model, vocab_size=asked or tok_vocab)


def initial_model(run, asked, dm, ckpt_path: str | None):
    """The model a pretraining run starts from (``init_from``: a checkpoint of ours or a
    transformers directory of the same family), or None. Its architecture replaces the
    ``model`` config, which is warned about field by field, except ``dropout``, which is the
    run's. A resumed run has weights of its own: None."""
    from dataclasses import fields, replace

    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

    from lmforge.checkpoint import load_model
    from lmforge.models.registry import family_of

    source = run.cfg.get("init_from")
    if not source or ckpt_path is not None:
        return None
    fam = family_of(asked)
    loaded = load_model(source, causal=fam.causal, what=f"task={run.task.name}")
    model = loaded.model
    model.config = replace(model.config, dropout=asked.dropout)
    differ = [
        f"{f.name}={getattr(asked, f.name)!r} (init_from: {getattr(model.config, f.name)!r})"
        for f in fields(asked)
        if f.init
        and f.name not in ("dropout", "vocab_size")
        and getattr(asked, f.name) != getattr(model.config, f.name)
    ]
    if differ:
        rank_zero_warn("init_from sets the architecture; ignored: " + ", ".join(differ))
    tok_vocab = dm.meta["vocab_size"]
    if model.config.vocab_size < tok_vocab:
        raise LMForgeError(
            f"init_from={source} has a vocabulary of {model.config.vocab_size}, the data's tokenizer"
            f" {tok_vocab}: prepare the data with the model's tokenizer"
        )
    if (
        loaded.tokenizer is not None
        and loaded.ours
        and loaded.tokenizer.to_str() != dm.tokenizer.to_str()
    ):
        raise LMForgeError(
            f"init_from={source} was trained with another tokenizer than {dm.config.dir}'s:"
            " prepare the data with that tokenizer (data.prepare.tokenizer.kind=file)"
        )
    rank_zero_info(f"starting from the weights of {source}")
    return model


def pretrained_model(run, max_len: int, causal: bool | None = None):
    """(loaded, model config) of a fine-tune: the model of ``init_from`` with its tokenizer, and
    its architecture with the run's ``model.dropout`` when set (``model=pretrained``)."""
    from dataclasses import replace

    from lightning.pytorch.utilities import rank_zero_info

    from lmforge.checkpoint import load_model

    source = run.cfg.get("init_from")
    if not source:
        raise LMForgeError(
            f"task={run.task.name} fine-tunes a pretrained model: set init_from=<checkpoint of"
            " lmforge-train, or a transformers directory>"
        )
    loaded = load_model(source, causal=causal, what=f"task={run.task.name}")
    if loaded.tokenizer is None:
        raise LMForgeError(f"init_from={source} carries no tokenizer (tokenizer.json)")
    config = loaded.model.config
    if run.model.dropout is not None:
        config = replace(config, dropout=run.model.dropout)
    if max_len > config.block_size:
        raise LMForgeError(
            f"data.max_len={max_len} exceeds the model's block_size={config.block_size}:"
            " lower data.max_len"
        )
    rank_zero_info(f"{loaded.family.name.upper()} from {source}: the architecture of init_from")
    return loaded, config


def resume_from(resume: str | None, ckpt_dir: Path) -> tuple[str | None, int | None]:
    """The checkpoint to resume from and its step: ``resume=auto`` the newest intact one in this
    run's directory, ``resume=<path>`` that one. ``resume=auto`` in a directory without
    checkpoints is a fresh start at step 0 (its logs, say of a run killed before its first
    checkpoint, are cut back to nothing); in one whose checkpoints are all unreadable it stops
    rather than start again silently. Without ``resume`` a run directory that already holds
    checkpoints is refused rather than mixed with a new run."""
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

    from lmforge.checkpoint import checkpoint_step, find_resume

    existing = (
        sorted(p.name for p in ckpt_dir.iterdir() if p.suffix in (".ckpt", ".corrupt"))
        if ckpt_dir.is_dir()
        else []
    )
    if resume is None:
        if existing:
            raise LMForgeError(
                f"{ckpt_dir} already holds checkpoints ({', '.join(existing[:3])}): continue that"
                " run with resume=auto, or start a new one with another run_name"
            )
        return None, None
    if resume == "auto":
        if not existing:
            rank_zero_info(f"resume=auto: no checkpoint in {ckpt_dir}, starting from scratch")
            return None, 0
        found = find_resume(ckpt_dir, set_aside_corrupt=rank_zero_only.rank == 0)
        if found is None:
            raise LMForgeError(
                f"resume=auto: no checkpoint in {ckpt_dir} can be read (the corrupt ones are"
                " renamed *.corrupt): resume from a copy with resume=<path>, or start a new run"
                " with another run_name"
            )
        path, step = found
    else:
        path = Path(resume)
        step = checkpoint_step(path) if path.exists() else None
        if step is None:
            raise LMForgeError(
                f"resume={resume}: {'no such checkpoint' if not path.exists() else 'the checkpoint is incomplete or corrupt'};"
                " pass a checkpoint written by lmforge-train, or resume=auto"
            )
    rank_zero_info(f"resuming from {path} (step {step})")
    return str(path), step


def refuse_multirun_with_ranks(world_size: int) -> None:
    """Hydra's -m and a multi-process strategy do not mix: every rank would run the sweep itself
    (Lightning's launcher re-runs the command line in each child), and a sampling sweeper such as
    Optuna's would hand the ranks different hyperparameters."""
    if world_size <= 1:
        return
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise LMForgeError(
            f"-m (multirun) cannot drive a {world_size}-process strategy: every rank would run"
            " its own sweep. Sweep with one launch per trial instead, e.g. `for lr in 3e-4 6e-4;"
            " do lmforge-train trainer=ddp task.optim.lr=$lr; done`, or sweep with one process"
            " per trial (trainer=cpu / trainer=gpu)"
        )


def global_batch(trainer, recipe) -> dict[str, int]:
    """Derive the accumulation from the recipe's ``global_batch_tokens`` when set (token data:
    ``data.global_batch_tokens``); report the global batch."""
    from lightning.pytorch.utilities import rank_zero_info

    seq_len = recipe.seq_len  # padded examples: at most this
    per_step = recipe.batch_size * seq_len * trainer.world_size  # tokens per micro-batch step
    if recipe.global_batch_tokens is not None:
        accumulate, rest = divmod(recipe.global_batch_tokens, per_step)
        if accumulate < 1 or rest:
            raise LMForgeError(
                f"data.global_batch_tokens={recipe.global_batch_tokens} is not a multiple of"
                f" data.batch_size x data.seq_len x devices = {recipe.batch_size} x {seq_len} x"
                f" {trainer.world_size} = {per_step}: use a multiple such as"
                f" {max(1, round(recipe.global_batch_tokens / per_step)) * per_step}"
            )
        trainer.accumulate_grad_batches = accumulate
    accumulate = trainer.accumulate_grad_batches
    sequences = recipe.batch_size * accumulate * trainer.world_size
    rank_zero_info(
        f"global batch: {sequences} sequences x {seq_len} tokens = {sequences * seq_len:,}"
        f" tokens per optimizer step (batch {recipe.batch_size} x accumulate {accumulate} x"
        f" {trainer.world_size} devices)"
    )
    return {
        "batch/global_sequences": sequences,
        "batch/global_tokens": sequences * seq_len,
        "batch/accumulate": accumulate,
        "batch/world_size": trainer.world_size,
    }


def report(trainer, metrics: dict, out_dir: str) -> None:
    lines = [f"run directory: {out_dir}"]
    if "val/loss" in metrics:
        lines.append(
            f"val/loss {metrics['val/loss']:.4f}  val/ppl {metrics.get('val/ppl', float('nan')):.3f}"
        )
    if "test/acc" in metrics:
        lines.append(
            f"test/acc {metrics['test/acc']:.4f}  test/f1_macro {metrics.get('test/f1_macro', float('nan')):.4f}"
        )
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.best_model_path:
        lines.append(f"best checkpoint: {ckpt.best_model_path}")
    wandb_dir = os.path.join(out_dir, "wandb")
    offline = (
        sorted(d for d in os.listdir(wandb_dir) if d.startswith("offline-run"))
        if os.path.isdir(wandb_dir)
        else []
    )
    if len(offline) > 1:  # a resumed run: one offline segment per process, one W&B run id
        lines.append(
            f"W&B offline run ({len(offline)} segments of one run): upload with `wandb sync {wandb_dir}`"
        )
    elif offline:
        lines.append(
            f"W&B offline run: upload with `wandb sync {os.path.join(wandb_dir, offline[-1])}`"
        )
    print("\n".join(lines), flush=True)
