"""Run lmforge's commands as processes of their own, forked from a server that imported torch,
Lightning and lmforge once.

Each launch is a real process: its own pid, signal handlers, exit status, stdout and stderr,
and it runs the module as ``python -m <module> <argv>`` does (``runpy``, ``__main__``, atexit
handlers at the end). What it skips is the 6-8 s a fresh interpreter spends importing torch,
Lightning, torchmetrics and transformers, which dominated the tests that kill and resume runs.
``ranks`` starts the processes of a multi-process run (DDP, FSDP) the way torchrun or a cluster
scheduler does: every rank at once, each told its ``LOCAL_RANK`` and the rendezvous address, so
Lightning joins them instead of launching them itself. One test keeps Lightning's own launcher and
one torchrun, and one test per command checks the console script's exit status in a fresh
interpreter.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import tempfile
from pathlib import Path

PRELOAD = [
    "torch",
    "lightning.pytorch",
    "hydra",
    "wandb",
    "lmforge.cli.train",
    "lmforge.run",
    "lmforge.callbacks.checkpointing",
    "lmforge.tasks.causal_lm",
    "lmforge.tasks.masked_lm",
    "lmforge.data.datamodule",
]
_context = None


def context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(module: str, argv: list[str], env: dict, cwd: str, out: str, err: str, fsize) -> None:
    import atexit
    import resource
    import runpy
    import signal
    import sys
    import traceback

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    # What Lightning reads from the environment when it is imported, as a fresh interpreter of
    # this rank would have read it (the server imported Lightning without a rank).
    from lightning.fabric.utilities.rank_zero import _get_rank, rank_zero_only

    rank_zero_only.rank = _get_rank() or 0
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    if fsize is not None:  # a file-size limit: a write beyond it fails like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    sys.argv = [module, *argv]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()  # what interpreter shutdown runs (a W&B run's finish, say)
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


class Launched:
    """A ``subprocess.Popen`` look-alike for ``python -m <module> <argv>``."""

    def __init__(
        self,
        module: str,
        argv: list[str],
        env: dict | None = None,
        cwd: str | Path = ".",
        fsize: int | None = None,
    ) -> None:
        self.args = [module, *argv]
        self._dir = Path(tempfile.mkdtemp(prefix="launch-"))
        self._out, self._err = self._dir / "stdout", self._dir / "stderr"
        self._process = context().Process(
            target=_child,
            args=(
                module,
                list(argv),
                dict(os.environ if env is None else env),
                str(cwd),
                str(self._out),
                str(self._err),
                fsize,
            ),
        )
        self._process.start()
        self.pid = self._process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def result(self) -> subprocess.CompletedProcess:
        out = self._out.read_text(errors="replace") if self._out.exists() else ""
        err = self._err.read_text(errors="replace") if self._err.exists() else ""
        for path in (self._out, self._err):
            path.unlink(missing_ok=True)
        self._dir.rmdir()
        return subprocess.CompletedProcess(self.args, self.poll(), out, err)


def launch(cmd: list[str], **kwargs) -> Launched:
    """``cmd`` is ``[python, "-m", module, *argv]``, as it would be given to subprocess."""
    assert cmd[1] == "-m", cmd
    return Launched(cmd[2], cmd[3:], **kwargs)


def ranks(cmd: list[str], nprocs: int = 2, env: dict | None = None, **kwargs) -> list[Launched]:
    """The ``nprocs`` processes of one multi-process run on this machine, started together."""
    import socket

    with socket.socket() as s:  # a free port for the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = dict(os.environ if env is None else env)
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0"}
    return [
        launch(cmd, env=base | rendezvous | {"LOCAL_RANK": str(i)}, **kwargs) for i in range(nprocs)
    ]


def run_ranks(
    cmd: list[str], nprocs: int = 2, timeout: float = 600, **kwargs
) -> subprocess.CompletedProcess:
    """Run ``cmd`` on ``nprocs`` ranks; rank 0's output, the first failing rank's status (the
    others are killed then) and every rank's stderr."""
    import time

    procs = ranks(cmd, nprocs, **kwargs)
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(9)
            p.wait()
    results = [p.result() for p in procs]
    code = next((r.returncode for r in results if r.returncode != 0), 0)
    err = "".join(f"--- rank {i} ---\n{r.stderr}" for i, r in enumerate(results))
    return subprocess.CompletedProcess(cmd, code, results[0].stdout, err)


def run(cmd: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    proc = launch(cmd, **kwargs)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(9)
        proc.wait()
        raise
    return proc.result()
