"""Optuna sweeps through Hydra's -m: trials, the summary, a persistent study that resumes."""

import contextlib
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from . import launch
from .conftest import ROOT

TINY = [
    "experiment=shakespeare_char_cpu",
    "trainer.max_steps=10",  # shorter than the experiment's val_check_interval (250)
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
    assert not any(math.isnan(v) for v in values)  # every trial validated at its last step
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


def test_sqlite_study_resumes_after_a_kill(tmp_path, capsys):
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
    new = [t.params for t in after if t.number not in {b.number for b in before}]
    assert all(p not in [b.params for b in before] for p in new)  # new parameters, not replays
    groups = {  # the W&B group of every trial of both commands
        yaml.safe_load(p.read_text())["sweep_name"]
        for p in tmp_path.glob("*/*/multirun/*/*/config.yaml")
    }
    assert groups == {"resumable"}
    from lmforge.cli.sweep import main as sweep_main

    capsys.readouterr()
    assert sweep_main([storage]) == 0  # every trial of the study, from both commands
    rows = capsys.readouterr().out.splitlines()[1:]
    stored = optuna.load_study(study_name="resumable", storage=storage).trials
    assert sorted(int(r.split()[0]) for r in rows) == [t.number for t in stored]
    assert [r.split()[1] for r in rows[: len(after)]] == [
        f"{v:.4f}" for v in sorted(t.value for t in after)
    ]


def test_the_sampler_draws_each_trial_from_its_number():
    """A resumed study builds its sampler afresh: its trials must not replay the first ones."""
    optuna = pytest.importorskip("optuna")
    from lmforge.sweeps import TPESampler

    space = {"x": optuna.distributions.UniformDistribution(0.0, 1.0)}

    def ask(study, n: int) -> list[float]:
        return [study.ask(space).params["x"] for _ in range(n)]

    study = optuna.create_study(sampler=TPESampler(seed=3))
    first = ask(study, 2)
    study.sampler = TPESampler(seed=3)  # what a resumed sweep does
    more = ask(study, 2)
    assert not set(first) & set(more)
    again = optuna.create_study(sampler=TPESampler(seed=3))
    assert ask(again, 4) == first + more  # trial n draws from its own seed, resumed or not


@pytest.mark.filterwarnings("ignore:.*is experimental")  # optuna's create_trial, add_trial
def test_the_summary_of_a_storage_lists_its_trials_or_names_what_is_wrong(tmp_path, capsys):
    optuna = pytest.importorskip("optuna")
    from lmforge.cli.sweep import main

    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as e:
            main(list(argv))
        assert e.value.code == 2
        return capsys.readouterr().err.strip()

    db = tmp_path / "study.db"
    storage = f"sqlite:///{db}"
    assert error(storage) == (
        f"error: {storage}: {db} does not exist; give the storage the sweep used"
        " (hydra.sweeper.storage=sqlite:///<file>)"
    )
    assert not db.exists()  # not created by reading it
    (tmp_path / "notes.db").write_text("not a database")
    assert error(f"sqlite:///{tmp_path / 'notes.db'}") == (
        f"error: sqlite:///{tmp_path / 'notes.db'}: {tmp_path / 'notes.db'} is not an Optuna"
        " storage (no studies table)"
    )
    assert error("postgresql://host/optuna") == (
        "error: name the study of postgresql://host/optuna to read with --study NAME"
    )
    x = optuna.distributions.UniformDistribution(0.0, 1.0)
    for name in ("a", "b"):
        study = optuna.create_study(study_name=name, storage=storage)
    for value in (0.5, 0.25):
        study.add_trial(
            optuna.trial.create_trial(params={"x": value}, distributions={"x": x}, value=value)
        )
    capsys.readouterr()  # Optuna's own log lines of the studies created here
    assert error(storage) == f"error: {storage} holds 2 studies (a, b): name one with --study NAME"
    assert error(storage, "--study", "c") == (
        f"error: {storage} holds no study 'c': its studies are a, b"
    )
    assert error(storage, "--study", "a") == f"error: {storage}: study a holds no trials yet"
    assert main([storage, "--study", "b"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "trial  val/loss  x   ",
        "1      0.2500    0.25",
        "0      0.5000    0.5 ",
    ]
