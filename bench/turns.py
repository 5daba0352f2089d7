"""Processes that take turns on the CPU: how the benchmarks interleave whole training runs.

Each benchmarked run is its own process (`lmforge-train` with the ``TakeTurns`` callback, or a
bare loop calling ``Turn.take``), so its threads, imports and start-up are its own, as a user's
would be. Only one process computes at a time: at each of its turns it reports to the
coordinator and blocks until handed the next turn, and the coordinator hands turns round-robin.
Whatever the shared machine does to one run's stretch of steps it does to the others' stretches
around it. Time spent waiting for a turn, and in validation, is not training time.

Child side: the coordinator passes a pipe pair in ``BENCH_TURN_FDS`` ("read,write"); without it
``Turn`` does nothing, so the same command also runs alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L


class Turn:
    """The child's end: ``take(record)`` reports ``record`` and waits for the next turn."""

    def __init__(self) -> None:
        fds = os.environ.get("BENCH_TURN_FDS")
        self.r = self.w = None
        if fds:
            r, w = (int(x) for x in fds.split(","))
            self.r, self.w = os.fdopen(r, "r"), os.fdopen(w, "w")

    def take(self, record: dict) -> None:
        if self.w is None:
            return
        self.w.write(json.dumps(record) + "\n")
        self.w.flush()
        if not self.r.readline():  # the coordinator is gone
            sys.exit(3)


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

    def on_train_start(self, trainer, pl_module) -> None:
        self.mark = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = time.time()
            self.turn.take({"event": "ready", "startup_s": self.first_step_at - self.spawned})
            now = self.mark = time.perf_counter()
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


@dataclass
class Child:
    name: str
    argv: list[str]
    result: Path
    env: dict = field(default_factory=dict)
    log: Path | None = None
    proc: subprocess.Popen | None = None
    to_child: object = None
    from_child: object = None
    spawned: float = 0.0
    wall_s: float = 0.0
    turns: int = 0
    ready_at: float = 0.0


def run_interleaved(children: list[Child], quiet: bool = True) -> None:
    """Start every child, then hand turns round-robin until all have exited. Each child's
    ``wall_s`` is its whole process time, spawn to exit, less the time it waited for turns."""
    for child in children:
        c2p_r, c2p_w = os.pipe()
        p2c_r, p2c_w = os.pipe()
        env = os.environ | child.env
        env |= {
            "BENCH_TURN_FDS": f"{p2c_r},{c2p_w}",
            "BENCH_RESULT": str(child.result),
            "BENCH_SPAWNED": repr(time.time()),
        }
        log = open(child.log or os.devnull, "w")  # noqa: SIM115
        child.spawned = time.perf_counter()
        child.proc = subprocess.Popen(
            child.argv, env=env, pass_fds=(p2c_r, c2p_w), stdout=log, stderr=subprocess.STDOUT
        )
        os.close(p2c_r)
        os.close(c2p_w)
        child.to_child, child.from_child = os.fdopen(p2c_w, "w"), os.fdopen(c2p_r, "r")
        # start-up alone: wait for this child's first step before starting the next
        first = child.from_child.readline()
        child.ready_at = time.perf_counter()
        if not first:
            child.proc.wait()
            raise SystemExit(f"{child.name} exited before its first step: see {child.log}")
    waiting = {c.name: 0.0 for c in children}
    paused_since = {c.name: c.ready_at for c in children}
    alive = list(children)
    while alive:
        for child in list(alive):
            waiting[child.name] += time.perf_counter() - paused_since[child.name]
            child.to_child.write("go\n")
            child.to_child.flush()
            child.turns += 1
            line = child.from_child.readline()
            paused_since[child.name] = time.perf_counter()
            if not line:
                child.proc.wait()
                child.wall_s = time.perf_counter() - child.spawned - waiting[child.name]
                alive.remove(child)
                if child.proc.returncode:
                    raise SystemExit(
                        f"{child.name} failed (exit {child.proc.returncode}): see {child.log}"
                    )
            elif not quiet:
                print(f"  {child.name}: {line.strip()}", flush=True)


def load(child: Child) -> dict:
    return json.loads(child.result.read_text())
