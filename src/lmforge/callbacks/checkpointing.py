"""Checkpoints that survive crashes and preemption.

``AtomicCheckpointIO`` writes every checkpoint file to a temporary name, fsyncs and renames it,
so a crash mid-write leaves the previous checkpoints as they were (sharded checkpoints are
staged the same way by ``lmforge.parallel.FSDPStrategy``). ``Preemption`` turns SIGTERM and
SIGUSR1 into a checkpoint at the next optimizer-step boundary and an exit with status 75, the
signal for a scheduler to requeue; ``resume=auto`` then continues from that checkpoint.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from lmforge.errors import LMForgeError
from lmforge.files import atomic_torch_save

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped on request, resume with resume=auto


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        try:
            atomic_torch_save(checkpoint, path)
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as
            # RuntimeError ("unexpected pos ...")
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            raise LMForgeError(
                f"writing checkpoint {path} failed ({reason[:120]}): is {path.parent} full? Free"
                " space and resume with resume=auto; the earlier checkpoints are intact"
            ) from None


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` every ``every_n_train_steps``, and also at the final step
    (``trainer.max_steps``), so a finished run always ends with a checkpoint of its last state."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if (
            final
            and self._last_global_step_saved != trainer.global_step
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


class Preempted(Exception):
    """Training stopped on SIGTERM / SIGUSR1 after saving a checkpoint."""


class Preemption(L.Callback):
    """On SIGTERM or SIGUSR1 (any rank), save ``step<N>-preempted.ckpt`` once the current
    optimizer step is done and logged, then stop with ``Preempted`` (``lmforge-train`` exits 75).

    Under SLURM with Lightning's auto-requeue, SIGUSR1 stays Lightning's (it saves and requeues
    itself). With several ranks the request is agreed on at each step boundary (one small
    all-reduce), so all ranks save and stop at the same step.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}
        self._saving = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        """The preemption checkpoint is taken between two steps, after the next batch was
        fetched but before it started: record that batch as not fetched, so that Lightning
        restores the loop as from a checkpoint saved at the end of the previous step."""
        if self._saving:
            progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
            for part in ("total", "current"):
                progress[part]["ready"] = progress[part]["started"]

    def _handler(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def on_train_start(self, trainer, pl_module) -> None:
        self.requested = None
        signals = [signal.SIGTERM]
        env = getattr(trainer.strategy, "cluster_environment", None)
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue):
            signals.append(signal.SIGUSR1)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # At a step boundary: the previous step is applied and logged, the next not begun.
        if batch_idx % trainer.accumulate_grad_batches or (
            self.requested is None and trainer.world_size == 1
        ):
            return
        stop = self.requested is not None
        if trainer.world_size > 1:  # a request on any rank stops all
            flag = torch.tensor(float(stop), device=trainer.strategy.root_device)
            stop = bool(trainer.strategy.reduce(flag, reduce_op="sum") > 0)
        if not stop:
            return
        ckpt_dir = Path(
            getattr(trainer.checkpoint_callback, "dirpath", None)
            or Path(trainer.default_root_dir) / "checkpoints"
        )
        path = ckpt_dir / f"step{trainer.global_step:06d}-preempted.ckpt"
        self._saving = True
        try:
            trainer.save_checkpoint(path)
        finally:
            self._saving = False
        why = self.requested or "a signal to another rank"
        rank_zero_info(f"{why}: saved {path} at step {trainer.global_step}")
        raise Preempted(f"stopped by {why} at step {trainer.global_step}; saved {path}")
