"""The Lightning side of bench/turns.py: ``lmforge-train ... +callbacks.turns._target_=take_turns.TakeTurns``
(with bench/ on PYTHONPATH) takes turns with the other benchmarked processes and records its
step times and start-up. Training seconds are the throughput callback's ``perf/train_s``, which
leaves the validations (where this callback waits for its turn) out."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L

from turns import Turn


class TakeTurns(L.Callback):
    """``lmforge-train``'s side: a turn every ``every`` optimizer steps and at each validation.
    Records the time of every step (start to next start, the waits taken out)."""

    def __init__(self, every: int = 0) -> None:
        self.every = every
        self.turn = Turn()
        self.spawned = float(os.environ.get("BENCH_SPAWNED", "nan"))
        self.step_s: list[float] = []
        self.last_start: float | None = None
        self.first_step_at: float | None = None
        self.ready_wait = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        # The first wait comes before Lightning's training starts, so that no callback's clock
        # (the throughput callback's training seconds) runs while this process waits.
        before = time.time()
        self.turn.take({"event": "ready"})
        self.ready_wait = time.time() - before

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = time.time() - self.ready_wait
        elif self.last_start is not None:
            self.step_s.append(now - self.last_start)
        self.last_start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0:
            self._pause(trainer, "steps")

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.last_start = None  # the next step's time would hold the validation
        self._pause(trainer, "validation")

    def _pause(self, trainer, event: str) -> None:
        """Wait for the next turn; the wait does not count in the step's time."""
        before = time.perf_counter()
        self.turn.take({"event": event, "step": trainer.global_step})
        if self.last_start is not None:
            self.last_start += time.perf_counter() - before

    def on_train_end(self, trainer, pl_module) -> None:
        out = os.environ.get("BENCH_RESULT")
        if out:
            import torch

            Path(out).write_text(
                json.dumps(
                    {
                        "startup_s": (self.first_step_at or float("nan")) - self.spawned,
                        "step_s": self.step_s,
                        "threads": torch.get_num_threads(),
                    }
                )
            )
