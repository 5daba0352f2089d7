"""Run-level helpers of lmforge-train: the run directory's lock, the trainer settings, the
checkpoint to resume from, the initial weights, the global batch, the closing report. Library
code: the runner in ``cli/train.py`` only calls them."""

from __future__ import annotations

import fcntl
import functools
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from lmforge.config import build
from lmforge.errors import LMForgeError

LOCK_FILE = ".lock"
# What launchers set before any process group exists: torchrun (RANK, LOCAL_RANK, GROUP_RANK),
# Lightning's own launcher (LOCAL_RANK, NODE_RANK), SLURM (SLURM_PROCID).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "SLURM_PROCID")


def launched_as_rank_zero() -> bool:
    """Whether this process is the first rank of its run (a single process is)."""
    return all(os.environ.get(key, "0") == "0" for key in RANK_VARIABLES)


@contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` (``fcntl.flock``) while a run writes into ``run_dir``, so that a
    second run of the same run_name is refused at once instead of mixing its checkpoints and logs
    into the first's. The kernel drops the lock when the process ends, even by ``kill -9``: a
    crashed run leaves nothing to clean up. Only the first rank takes it; the other ranks of the
    run (which Lightning's launcher or torchrun start) share the directory."""
    if not launched_as_rank_zero():
        yield
        return
    path = Path(run_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise LMForgeError(
            f"cannot write to the run directory {path} ({e.strerror}): set paths.log_dir to a"
            " writable directory"
        ) from None
    with os.fdopen(fd, "r+") as f:  # closing it releases the lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip() or "another process"
            raise LMForgeError(
                f"run directory {path} is in use by another run ({holder}): wait for that run to"
                " end, or start this one with another run_name"
            ) from None
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield


def holds_run_dir(fn: Callable) -> Callable:
    """Run ``fn(cfg, ...)`` holding the lock of its run directory, ``cfg.paths.output_dir``."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig, *args, **kwargs):
        with run_dir_lock(cfg.paths.output_dir):
            return fn(cfg, *args, **kwargs)

    return wrapper


@dataclass
class TrainerSettings:
    """The keys of ``conf/trainer`` whose bad values Lightning takes silently or reports with a
    traceback (a negative clip value turns the gradient around, a zero interval divides by zero)."""

    max_steps: int = -1  # optimizer steps; -1: no limit
    val_check_interval: Any = None  # training micro-batches between validations, or a duration
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None  # the norm to clip to; 0 or null: no clipping
    log_every_n_steps: int = 50
    precision: Any = "32-true"

    def __post_init__(self) -> None:
        if self.max_steps != -1 and self.max_steps < 1:
            raise ValueError(
                f"trainer.max_steps={self.max_steps}: use a positive number of optimizer steps,"
                " or -1 for no limit"
            )
        interval = self.val_check_interval
        if isinstance(interval, bool) or (
            isinstance(interval, (int, float)) and (interval < 1 or interval != int(interval))
        ):
            raise ValueError(
                f"trainer.val_check_interval={interval}: use a whole number of training"
                " micro-batches (1 or more), or a duration 'DD:HH:MM:SS'"
            )
        if self.accumulate_grad_batches < 1:
            raise ValueError(
                f"trainer.accumulate_grad_batches={self.accumulate_grad_batches}: use 1 (no"
                " accumulation) or more micro-batches per optimizer step"
            )
        if self.gradient_clip_val is not None and self.gradient_clip_val < 0:
            raise ValueError(
                f"trainer.gradient_clip_val={self.gradient_clip_val:g}: use a positive gradient"
                " norm to clip to, or 0 / null for no clipping"
            )
        if self.log_every_n_steps < 1:
            raise ValueError(
                f"trainer.log_every_n_steps={self.log_every_n_steps}: use 1 or more optimizer steps"
            )
        accepted = lightning_precisions()
        if str(self.precision) not in accepted:
            raise ValueError(
                f"trainer.precision={self.precision!r}: use one of {', '.join(accepted)}"
            )


def lightning_precisions() -> list[str]:
    """The ``precision`` values ``lightning.Trainer`` accepts, as written in a config."""
    from typing import get_args

    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT

    def values(t) -> list:
        return [v for a in get_args(t) for v in (values(a) if get_args(a) else [a])]

    return list(dict.fromkeys(str(v) for v in values(_PRECISION_INPUT)))


def check_run_settings(cfg: DictConfig) -> TrainerSettings:
    """Check the run-level settings the runner hands to Lightning and the loggers: ``seed``, the
    keys of :class:`TrainerSettings`, the W&B mode, and that the strategy can run the optimizer.
    Raises LMForgeError naming the key."""
    from lmforge.loggers import wandb_log_model, wandb_mode

    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise LMForgeError(f"seed={seed!r}: use a whole number from 0 to {2**32 - 1}")
    keys = TrainerSettings.__dataclass_fields__.keys() & cfg.trainer.keys()
    settings = build({k: cfg.trainer[k] for k in keys}, "trainer", TrainerSettings)
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    if "fsdp" in target.lower() and cfg.get("task", {}).get("optim", {}).get("optimizer") == "muon":
        raise LMForgeError(
            "task.optim.optimizer=muon cannot run with trainer=fsdp: Muon orthogonalises whole"
            " matrices and FSDP shards them; use trainer=ddp, or task/optim=adamw"
        )
    for node in (cfg.get("logger") or {}).values():
        if isinstance(node, DictConfig) and node.get("_target_") == "lmforge.loggers.wandb_logger":
            wandb_mode(node.get("mode", "auto"))  # raises on an unknown mode
            wandb_log_model(node.get("log_model", False))
    return settings


def pad_vocab_for_device(cfg: DictConfig) -> None:
    """Set a null ``model.pad_vocab_multiple`` for the device the run trains on: 64 on a GPU
    (the output matmul in whole tiles), none on a CPU, where the padded rows are only more work
    (3% a step on nanoGPT's 65-character model, padded to 128 rows)."""
    if "pad_vocab_multiple" not in cfg.model or cfg.model.pad_vocab_multiple is not None:
        return
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator == "auto":
        import torch

        on_cpu = not torch.cuda.is_available()
    else:
        on_cpu = accelerator == "cpu"
    with open_dict(cfg):
        cfg.model.pad_vocab_multiple = 1 if on_cpu else 64


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


def check_resumable(ckpt_path: str | None, task, dm) -> None:
    """Refuse to resume from a checkpoint of another model or tokenizer before anything in the run
    directory is written (config.yaml, the loggers' files, the cut of metrics.csv): Lightning
    reads the checkpoint only after those writes. Reads the checkpoint's metadata, not its
    tensors (memory-mapped)."""
    if ckpt_path is None:
        return
    import torch

    path = Path(ckpt_path)
    if path.is_dir():  # a sharded checkpoint: its metadata lies beside the shards
        checkpoint = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    refuse_other_model(checkpoint, task.hparams.get("model", {}), dm)


def refuse_other_model(checkpoint: dict, model: dict, dm) -> None:
    """Raise LMForgeError, naming what differs, when ``checkpoint`` holds another model than the
    ``model`` hyperparameters, or was trained with another tokenizer than ``dm``'s."""
    saved = checkpoint.get("hyper_parameters", {}).get("model", {})
    diff = [
        f"{k}={saved.get(k)!r} (this run: {model.get(k)!r})"
        for k in sorted(saved.keys() | model.keys())
        if saved.get(k) != model.get(k)
    ]
    if diff:
        raise LMForgeError(
            "the checkpoint holds a different model: "
            + ", ".join(diff)
            + "; resume with the model config it was trained with, or start a new run_name"
        )
    saved_tok, tokenizer = checkpoint.get("tokenizer"), getattr(dm, "tokenizer", None)
    if saved_tok and tokenizer is not None and saved_tok != tokenizer.to_str():
        from tokenizers import Tokenizer

        data = getattr(dm.config, "dir", None)
        ours = f"{data}'s" if data else "this run's"
        raise LMForgeError(
            f"the checkpoint was trained with another tokenizer than {ours}"
            f" (vocabulary {Tokenizer.from_str(saved_tok).get_vocab_size()} vs"
            f" {tokenizer.get_vocab_size()}): resume on the data it was trained on, or start a"
            " new run_name"
        )


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


def eval_data_choice(data) -> str | None:
    """The ``data=`` choice with which lmforge-eval reads a run's prepared splits: the run's own,
    for token data (a ``DataConfig``); None for example data (labelled texts, instructions, ...)."""
    from hydra.core.hydra_config import HydraConfig

    from lmforge.data.config import DataConfig

    if not isinstance(data, DataConfig) or not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("data")


def next_commands(hparams: dict, ckpt: str, name: str, data: str | None = None) -> list[str]:
    """The commands that take a run's checkpoint ``ckpt`` next, decided as their loaders decide
    (``lmforge.checkpoint``): none for a classifier, lmforge-score and lmforge-export for a reward
    model, lmforge-export for a language model, and for one whose family generates text (a
    causal LM) lmforge-generate and lmforge-eval (on the run's data config ``data``) first."""
    import shlex

    from lmforge.checkpoint import checkpoint_family, checkpoint_kind
    from lmforge.models.registry import family as get_family

    export = f"lmforge-export {shlex.quote(ckpt)} {shlex.quote(f'exports/{name}')}"
    given = shlex.quote(f"ckpt_path={ckpt}")
    kind = checkpoint_kind(hparams)
    if kind == "classifier":
        return []
    if kind == "reward":
        return [f"lmforge-score {given} input=records.jsonl out=scored.jsonl", export]
    if not get_family(checkpoint_family(hparams)).causal:
        return [export]
    return [
        f"lmforge-generate {given} max_new_tokens=200",
        f"lmforge-eval {given}" + (f" data={shlex.quote(data)}" if data else ""),
        export,
    ]


def report(trainer, metrics: dict, out_dir: str, data: str | None = None) -> None:
    """Print the run's closing lines (rank 0): its directory, final metrics, best checkpoint,
    W&B upload, and what to run next on its last checkpoint (eval on the data config ``data``)."""
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
    saved = [cb.last_model_path or cb.best_model_path for cb in trainer.checkpoint_callbacks]
    saved = sorted((p for p in saved if p), key=lambda p: Path(p).name != "last.ckpt")
    if saved and trainer.lightning_module is not None:
        commands = next_commands(
            dict(trainer.lightning_module.hparams), saved[0], Path(out_dir).name, data
        )
        if commands:
            lines.append("next:")
            lines.extend(f"  {command}" for command in commands)
    print("\n".join(lines), flush=True)
