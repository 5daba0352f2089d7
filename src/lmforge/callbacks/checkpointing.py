"""Checkpoints that survive crashes and preemption.

``AtomicCheckpointIO`` writes every checkpoint file to a temporary name, fsyncs and renames it,
so a crash mid-write leaves the previous checkpoints as they were (sharded checkpoints are
staged the same way by ``lmforge.parallel.FSDPStrategy``). ``Preemption`` turns SIGTERM and
SIGUSR1 into a checkpoint at the next optimizer-step boundary and an exit with status 75, the
signal for a scheduler to requeue; ``resume=auto`` then continues from that checkpoint.
"""

from __future__ import annotations

import copy
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from lmforge import signals
from lmforge.errors import LMForgeError
from lmforge.files import atomic_link, atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary name and renames it. A checkpoint that holds the
    same state as the one saved just before it (the savers that fire at one step: the periodic
    step file and ``last.ckpt``, the best and ``last.ckpt`` after a validation) is not written
    again: its name becomes a hard link of that file (a byte copy where links fail). Every name
    is only ever replaced by a rename, never rewritten in place, so a later ``last.ckpt`` leaves
    the step file it was linked to as it was."""

    def __init__(self) -> None:
        super().__init__()
        self._previous: _Saved | None = None

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        previous, self._previous = self._previous, None
        try:
            if previous is not None and previous.holds(checkpoint):
                atomic_link(previous.path, path)
            else:
                atomic_torch_save(checkpoint, path)
                previous = _Saved(path, checkpoint)
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as
            # RuntimeError ("unexpected pos ...")
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            raise LMForgeError(
                f"writing checkpoint {path} failed ({reason[:120]}): is {path.parent} full? Free"
                " space and resume with resume=auto; the earlier checkpoints are intact"
            ) from None
        self._previous = previous


class _Saved:
    """A checkpoint file just written and the state it holds: the checkpoint's plain values, and
    its tensors with their version counters (bumped by every in-place change, as an optimizer
    step makes). The tensors are kept: the model's and optimizer's are views of the live ones
    (no memory of their own), a copy (an RNG state) stays as it was saved."""

    def __init__(self, path: Path, checkpoint: dict) -> None:
        self.path = path
        self.values = _plain(checkpoint)  # a copy: a callback's state may be its live dict
        self.tensors = _tensors(checkpoint)
        self.versions = [t._version for t in self.tensors]
        self.stat = _identity(path)

    def holds(self, checkpoint: dict) -> bool:
        """Whether ``checkpoint`` holds the state written to ``path`` (still that file)."""
        if _identity(self.path) != self.stat or not _same(self.values, _plain(checkpoint)):
            return False
        old, new = self.tensors, _tensors(checkpoint)
        return len(old) == len(new) and all(
            a.dtype == b.dtype
            and a.shape == b.shape
            and a.device == b.device
            and (
                a._version == version == b._version and _same_memory(a, b)
                if a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                else torch.equal(a, b)
            )
            for a, b, version in zip(old, new, self.versions, strict=True)
        )


def _identity(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.storage_offset() == b.storage_offset() and a.stride() == b.stride()


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


class _Tensor:
    """A tensor's place in ``_plain``."""


def _plain(obj):
    """``obj`` with its containers copied and its tensors replaced by ``_Tensor``."""
    if isinstance(obj, torch.Tensor):
        return _Tensor
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj) if type(obj) in (list, tuple) else obj
    return copy.deepcopy(obj)


def _same(a, b) -> bool:
    """Equal plain values (``_plain``)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # an object without a plain equality (a numpy array): not the same
        return False


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, made exact for a run that is resumed, moved or copied:

    - it saves only at optimizer-step boundaries: with gradient accumulation the micro-batches
      of a step end with the step counter unchanged, and a checkpoint taken there (on a resumed
      run's first micro-batch, say, which Lightning takes again for the resumed step) holds a
      half-accumulated state that no resume reproduces;
    - a run directory moved or copied keeps its file names and retention: the paths restored
      from the checkpoint are taken into the new directory, where Lightning would forget them
      and write ``last-v1.ckpt`` beside a stale ``last.ckpt``;
    - retention also removes the checkpoint the run resumed from once it falls out of the
      kept ones (Lightning keeps that one forever);
    - a run killed after writing a step's checkpoint but before its ``last.ckpt`` resumes from
      the step's file; ``last.ckpt`` (what export, eval and fine-tuning read) is brought up to
      that file (a hard link of it) before training goes on, so it is never left behind, not even
      when the resumed step is the final one and nothing more is saved;
    - the first step's file already names ``last.ckpt`` as the last checkpoint, so that it
      holds the same state as the ``last.ckpt`` saved with it (and is written once).
    """

    _step_at_batch_start: int | None = None
    _mid_step = False

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        if self.save_last is True and not self.last_model_path and self.dirpath:
            # the step's file names last.ckpt already, as last.ckpt's own state does: the two
            # hold one state, which AtomicCheckpointIO then writes once
            self.last_model_path = self.format_checkpoint_name(
                monitor_candidates, self.CHECKPOINT_NAME_LAST
            )
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.ckpt_path:  # the resumed step has its checkpoint: never saved twice
            self._last_global_step_saved = trainer.global_step

    def on_fit_start(self, trainer, pl_module) -> None:
        # here, not in on_train_start: a run resumed at its final step skips the training loop
        if trainer.ckpt_path and self.save_last and self.dirpath and trainer.is_global_zero:
            self._bring_last_up_to(Path(trainer.ckpt_path))

    def _bring_last_up_to(self, resumed: Path) -> None:
        last = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        if not resumed.is_file() or resumed.parent.absolute() != last.parent.absolute():
            return  # a checkpoint from elsewhere, or a sharded (directory) one
        if resumed.name == last.name:
            return
        from lmforge.checkpoint import checkpoint_step

        step = checkpoint_step(last, verify=False) if last.is_file() else None
        if step is None or step < (checkpoint_step(resumed, verify=False) or 0):
            atomic_link(resumed, last)
            self.last_model_path = str(last)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mid_step = trainer.global_step == self._step_at_batch_start  # no optimizer step
        if not self._mid_step:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._mid_step:  # no checkpoint of a validation between two micro-batches
            super().on_validation_end(trainer, pl_module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and Path(old) != Path(self.dirpath):

            def moved(p):
                return (
                    str(Path(self.dirpath) / Path(p).name)
                    if p and Path(p).parent == Path(old)
                    else p
                )

            state_dict = state_dict | {
                "dirpath": self.dirpath,
                "best_k_models": {moved(k): v for k, v in state_dict["best_k_models"].items()},
            }
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                state_dict[key] = moved(state_dict.get(key))
        super().load_state_dict(state_dict)

    def _should_remove_checkpoint(self, trainer, previous: str, current: str) -> bool:
        return (
            previous != current
            and Path(previous).parent.absolute() == Path(self.dirpath).absolute()
        )


class StepCheckpoint(RunCheckpoint):
    """A ``RunCheckpoint`` every ``every_n_train_steps``, and also at the final step
    (``trainer.max_steps``), so a finished run always ends with a checkpoint of its last state."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if (
            final
            and self._every_n_train_steps > 0
            and not self._mid_step
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
        self._at_boundary = True  # the last batch ended an optimizer step (or none ran yet)
        self._step_at_batch_start = 0

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
        self._at_boundary = True  # a run starts, or resumes, between two optimizer steps
        signals = [signal.SIGTERM]
        env = getattr(trainer.strategy, "cluster_environment", None)
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue):
            signals.append(signal.SIGUSR1)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_end(self, trainer, pl_module) -> None:
        signals.trained_to = trainer.global_step  # what a signal after training ends reports
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._at_boundary = trainer.global_step != self._step_at_batch_start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # At a step boundary (the previous batch applied an optimizer step, which is logged; the
        # next not begun), not between two micro-batches of one step: ranks agree on that, as
        # their step counters move together.
        self._step_at_batch_start = trainer.global_step
        if not self._at_boundary or (self.requested is None and trainer.world_size == 1):
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
