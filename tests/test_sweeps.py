"""Optuna sweeps through Hydra's -m: trials, the summary, a persistent study that resumes."""

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import launch
from .conftest import ROOT

TINY = [
    "experiment=shakespeare_char_cpu",
    "trainer.max_steps=10",
    "trainer.val_check_interval=10",
    "data.max_val_windows=10",
    "logger=csv",
    "callbacks.text_samples=null",
    "callbacks.progress_bar=null",
    "trainer.enable_model_summary=false",
]


def sweep_cmd(log_dir, *extra):
    return [
        sys.executable,
        "-m",
        "lmforge.cli.train",
        "-m",
        "hparams_search=optuna_gpt",
        *TINY,
        f"paths.log_dir={log_dir}",
        *extra,
    ]


def env():
    return os.environ | {"WANDB_MODE": "disabled"}


def test_optuna_sweep_runs_trials_and_reports_the_best(tmp_path):
    proc = launch.run(sweep_cmd(tmp_path, "hydra.sweeper.n_trials=3"), cwd=ROOT, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "Best parameters:" in out and "task.optim.lr" in out
    sweep_dir = next((tmp_path / "causal_lm" / "multirun").iterdir())
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1", "2"]
    summary = subprocess.run(
        [sys.executable, "-m", "lmforge.cli.sweep", str(sweep_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    lines = summary.stdout.splitlines()
    assert lines[0].startswith("trial  val/loss") and len(lines) == 4
    values = [float(line.split()[1]) for line in lines[1:]]
    assert values == sorted(values)  # best first


def completed_trials(db: Path) -> int:
    """The study's finished trials, read without writing: optuna.load_study on a database the
    sweep is still creating would race it for the schema (UNIQUE constraint failed:
    alembic_version)."""
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:  # no trials table yet, or locked by a write
        return 0


def test_sqlite_study_resumes_after_a_kill(tmp_path):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = [f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=resumable"]
    proc = launch.launch(
        sweep_cmd(tmp_path / "a", "hydra.sweeper.n_trials=6", *study), cwd=ROOT, env=env()
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if completed_trials(tmp_path / "study.db") >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.5)
    proc.wait(timeout=60)
    proc.result()
    before = [
        t
        for t in optuna.load_study(study_name="resumable", storage=storage).trials
        if t.state.name == "COMPLETE"
    ]
    assert 2 <= len(before) < 6
    again = launch.run(
        sweep_cmd(tmp_path / "b", "hydra.sweeper.n_trials=2", *study), cwd=ROOT, env=env()
    )
    assert again.returncode == 0, again.stderr[-3000:]
    after = [
        t
        for t in optuna.load_study(study_name="resumable", storage=storage).trials
        if t.state.name == "COMPLETE"
    ]
    assert len(after) == len(before) + 2  # the killed run's trials kept, two more added
    assert {t.number for t in before} <= {t.number for t in after}
