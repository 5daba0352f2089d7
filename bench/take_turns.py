"""The Lightning side of bench/turns.py: ``lmforge-train ... +callbacks.turns._target_=take_turns.TakeTurns``
(with bench/ on PYTHONPATH) takes turns with the other benchmarked processes and records its
step times, start-up and, at each validation, the training seconds and the validation loss."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L

from turns import Turn


class TakeTurns(L.Callback):
    """``lmforge-train``'s side: a turn every ``every`` optimizer steps (and at each validation,
    with ``at_validation``). Records the time of every step (start to next start) and the
    training seconds (validation and waiting excluded) at each validation with its loss."""

    def __init__(self, every: int = 0, at_validation: bool = True) -> None:
        self.every, self.at_validation = every, at_validation
        self.turn = Turn()
        self.spawned = float(os.environ.get("BENCH_SPAWNED", "nan"))
        self.step_s: list[float] = []
        self.last_start: float | None = None
        self.train_s = 0.0
        self.mark = 0.0
        self.first_step_at: float | None = None
        self.records: list[dict] = []
        self.ready_wait = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        # The first wait comes before Lightning's training starts, so that no callback's clock
        # (the throughput callback's training seconds) runs while this process waits.
        before = time.time()
        self.turn.take({"event": "ready"})
        self.ready_wait = time.time() - before

    def on_train_start(self, trainer, pl_module) -> None:
        self.mark = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = time.time() - self.ready_wait
        elif self.last_start is not None:
            self.step_s.append(now - self.last_start)
        self.last_start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0:
            self._pause(trainer, {"event": "steps"})

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.train_s += time.perf_counter() - self.mark
        self.last_start = None  # the next step's time would hold the validation
        if self.at_validation:
            self._pause(trainer, {"event": "validation"}, count=False)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        loss = trainer.callback_metrics.get("val/loss")
        self.records.append(
            {"step": trainer.global_step, "train_s": self.train_s, "val_loss": float(loss)}
        )
        self.mark = time.perf_counter()

    def _pause(self, trainer, record: dict, count: bool = True) -> None:
        """Wait for the next turn; the wait counts neither in the step's time nor in training."""
        before = time.perf_counter()
        self.turn.take(record | {"step": trainer.global_step})
        waited = time.perf_counter() - before
        if self.last_start is not None:
            self.last_start += waited
        if count:
            self.mark += waited

    def on_train_end(self, trainer, pl_module) -> None:
        out = os.environ.get("BENCH_RESULT")
        if out:
            Path(out).write_text(
                json.dumps(
                    {
                        "startup_s": (self.first_step_at or float("nan")) - self.spawned,
                        "step_s": self.step_s,
                        "validations": self.records,
                        "threads": __import__("torch").get_num_threads(),
                    }
                )
            )
