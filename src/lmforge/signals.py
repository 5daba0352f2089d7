"""SIGTERM and SIGUSR1 outside the training loop: one line and exit status 75.

Inside the loop ``lmforge.callbacks.checkpointing.Preemption`` saves a checkpoint at the next
step boundary and stops; before the first step (preparing data, building the model, validating
first) there is nothing to save, and after the last one the checkpoints are written. This module
imports nothing heavy, so the guard is in place before Lightning loads.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped on request, run the same command (resume=auto) again

trained_to: int | None = None  # the step training ended at, once it has (Preemption sets it)


def under_slurm() -> bool:
    """Whether SLURM launched this process (Lightning's own test, loaded only then)."""
    if "SLURM_NTASKS" not in os.environ:
        return False
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGUSR1 into one line and exit 75 for the duration of the block (the
    training loop hands them to ``Preemption`` and back). Under SLURM, SIGUSR1 is left to
    Lightning's auto-requeue."""
    global trained_to
    trained_to = None

    def stop(signum, frame) -> None:
        name = signal.Signals(signum).name
        if trained_to is None:
            print(
                f"stopped by {name} before the first training step: nothing to save; the same"
                " command starts the run again",
                flush=True,
            )
        else:
            print(
                f"stopped by {name} after training ended at step {trained_to} (its checkpoints"
                " are saved): resume with resume=auto",
                flush=True,
            )
        raise SystemExit(EXIT_REQUEUE)

    caught = [signal.SIGTERM] + ([] if under_slurm() else [signal.SIGUSR1])
    previous = {sig: signal.signal(sig, stop) for sig in caught}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
