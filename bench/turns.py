"""Processes that take turns on the CPU: how the benchmarks interleave whole training runs.

Each benchmarked run is its own process (`lmforge-train` with the ``TakeTurns`` callback of
bench/take_turns.py, or a bare loop calling ``Turn.take``), so its threads, imports and start-up are its own, as a user's
would be. Only one process computes at a time: at each of its turns it reports to the
coordinator and blocks until handed the next turn, and the coordinator hands turns round-robin.
Whatever the shared machine does to one run's stretch of steps it does to the others' stretches
around it. Time spent waiting for a turn, and in validation, is not training time.

Child side: the coordinator passes a pipe pair in ``BENCH_TURN_FDS`` ("read,write"); without it
``Turn`` does nothing, so the same command also runs alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


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
    ready_at: float = 0.0
    tty: bool = False  # stdout and stderr a pseudo-terminal (else the log file)


def run_interleaved(children: list[Child]) -> None:
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
        log = open(child.log or os.devnull, "wb")  # noqa: SIM115
        out = log
        if child.tty:  # a terminal, as a user's: the progress bar draws as it does there
            master, out = pty.openpty()
            fcntl.ioctl(out, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            env |= {"TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
            threading.Thread(target=_drain, args=(master, log), daemon=True).start()
        child.spawned = time.perf_counter()
        child.proc = subprocess.Popen(
            child.argv, env=env, pass_fds=(p2c_r, c2p_w), stdout=out, stderr=subprocess.STDOUT
        )
        if child.tty:
            os.close(out)
        os.close(p2c_r)
        os.close(c2p_w)
        child.to_child, child.from_child = os.fdopen(p2c_w, "w"), os.fdopen(c2p_r, "r")
        # start-up alone: the next child starts once this one reports ready (before its steps)
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
            try:
                child.to_child.write("go\n")
                child.to_child.flush()
                line = child.from_child.readline()
            except BrokenPipeError:  # it exited while waiting (a crash: its log says why)
                line = ""
            paused_since[child.name] = time.perf_counter()
            if not line:
                child.proc.wait()
                child.wall_s = time.perf_counter() - child.spawned - waiting[child.name]
                alive.remove(child)
                if child.proc.returncode:
                    raise SystemExit(
                        f"{child.name} failed (exit {child.proc.returncode}): see {child.log}"
                    )


def _drain(fd: int, log) -> None:
    """Copy a child's terminal output to its log as it comes (a full pty would block it)."""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            return
        if not data:
            return
        log.write(data)


def child_env(**extra: str) -> dict:
    """The environment a benchmarked child needs beyond ours: bench/ importable first."""
    bench = str(Path(__file__).resolve().parent)
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [bench, os.environ.get("PYTHONPATH")]))
    } | extra


def load(child: Child) -> dict:
    return json.loads(child.result.read_text())
