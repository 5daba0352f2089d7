"""The run directory: its name, its lock, nothing in it changed by a run that cannot continue;
and the trainer settings refused in one line before a run starts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli.train import train
from lmforge.errors import LMForgeError
from lmforge.run import run_dir_lock

from .conftest import ROOT


def tiny(train_cfg, *overrides: str):
    return train_cfg(
        "run_name=r",
        "callbacks.text_samples=null",
        "callbacks.progress_bar=null",
        "trainer.val_check_interval=5",
        "callbacks.periodic_checkpoint.every_n_train_steps=5",
        *overrides,
    )


def snapshot(run_dir: Path) -> dict[str, bytes | None]:
    """The run directory's files and their bytes; of W&B's own folders and logs only the names
    (W&B's service process goes on writing them for a moment after a run has finished)."""
    files = {}
    for p in sorted(run_dir.rglob("*")):
        parts = p.relative_to(run_dir).parts
        if parts[0] == "wandb" and parts[-1] != "run_id":
            if len(parts) == 2:
                files[str(Path(*parts))] = None
        elif p.is_file() and p.name != ".lock":
            files[str(Path(*parts))] = p.read_bytes()
    return files


def test_a_refused_resume_changes_nothing_in_the_run_directory(train_cfg):
    cfg = tiny(train_cfg, "trainer.max_steps=5")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    before = snapshot(run_dir)
    assert {"config.yaml", "csv/hparams.yaml", "csv/metrics.csv", "wandb/run_id"} <= before.keys()
    with pytest.raises(LMForgeError, match=r"different model: n_layer=2 \(this run: 3\)"):
        train(tiny(train_cfg, "trainer.max_steps=10", "resume=auto", "model.n_layer=3"))
    assert snapshot(run_dir) == before  # no config, hparams, metrics cut, nor W&B segment


def test_a_second_run_of_one_run_directory_is_refused_until_the_first_ends(train_cfg):
    """Another process holds the run directory as a running lmforge-train does; once it is
    killed (-9), the kernel has dropped its lock and the run starts."""
    cfg = tiny(train_cfg, "trainer.max_steps=2", "logger=csv")
    run_dir = Path(cfg.paths.output_dir)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from lmforge.run import run_dir_lock\n"
            "with run_dir_lock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()",
            str(run_dir),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT / "src")},
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(
            LMForgeError,
            match=rf"run directory {run_dir} is in use by another run \(pid {holder.pid} on .*\):"
            " wait for that run to end, or start this one with another run_name",
        ):
            train(cfg)
        assert not (run_dir / "config.yaml").exists()
        with pytest.MonkeyPatch.context() as mp:  # another rank of the same run shares it
            mp.setenv("LOCAL_RANK", "1")
            with run_dir_lock(run_dir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    train(cfg)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1: use a positive"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: use 1"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval=0: use a whole number"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0: use 1 or more"),
        ("seed=abc", "seed='abc': use a whole number from 0 to 4294967295"),
        ("trainer.max_steps=-5", r"trainer.max_steps=-5: use a positive .* or -1 for no limit"),
        ("trainer.precision=banana", "trainer.precision='banana': use one of .*bf16-mixed"),
        ("logger.wandb.mode=sometimes", "logger.wandb.mode='sometimes': use auto, online"),
        ("logger.wandb.log_model=all", "logger.wandb.log_model='all': use true .* or false"),
    ],
)
def test_bad_trainer_and_logger_settings_are_refused_in_one_line(train_cfg, override, message):
    cfg = train_cfg("trainer.max_steps=2", "callbacks.text_samples=null", override)
    with pytest.raises(LMForgeError, match=message):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "config.yaml").exists()


def test_a_run_directory_that_cannot_be_written_is_refused_in_one_line(train_cfg, tmp_path):
    cfg = train_cfg("trainer.max_steps=2", "logger=csv", "callbacks.text_samples=null")
    (tmp_path / "file").write_text("")
    cfg.paths.output_dir = str(tmp_path / "file" / "run")
    with pytest.raises(LMForgeError, match=r"cannot write to the run directory .*file/run"):
        train(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("run_name=../../escaped", "run_name='../../escaped' is not a plain directory name"),
        ("run_name=", "run_name='' is not a plain directory name"),
        ("paths.log_dir={tmp}/file/logs", "cannot create the run directory .* is not a directory"),
    ],
)
def test_bad_run_names_and_log_dirs_fail_before_hydra_writes(tmp_path, override, message):
    """Hydra creates the run directory before lmforge code runs: the name and the place are
    checked where Hydra resolves them, in one line with exit status 2."""
    (tmp_path / "file").write_text("")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge.cli.train",
            f"paths.log_dir={tmp_path}/a/b/logs",
            override.format(tmp=tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT / "src")},
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert re.search(message, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file"]  # nothing written anywhere
