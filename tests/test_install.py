"""lmforge as users install it: the wheel in a fresh environment, its console scripts run from an
empty directory outside the checkout with configs of the user's own; what the container image
does without a container engine (the same install steps), and the image itself where a docker
engine runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
USER_EXPERIMENT = """\
# @package _global_
defaults:
  - override /model: my-nano
run_name: from_wheel
trainer:
  enable_model_summary: false
"""


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of this checkout, built from a copy of what the build reads (as from an sdist),
    so the checkout gets no build/ directory and data/prepared/ cannot slip in."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    skip = shutil.ignore_patterns("prepared", "__pycache__", "*.egg-info")
    for name in ("src", "conf", "data"):
        shutil.copytree(ROOT / name, tree / name, symlinks=True, ignore=skip)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    flags = ["--no-deps", "--no-index", "--no-build-isolation"]
    subprocess.run([*pip, "wheel", *flags, "-w", str(tmp_path / "dist"), str(tree)], check=True)
    (wheel,) = (tmp_path / "dist").glob("lmforge-*.whl")
    return wheel


CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LMFORGE_ROOT")}


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A new virtual environment holding the wheel (pip install --no-deps --no-index), its
    dependencies read from this interpreter's site-packages through a .pth line added after the
    install: nothing is downloaded, and this environment's editable lmforge is not on the path
    (the .pth files of a directory named by a .pth line are not run)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
        + ["install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        env=CLEAN_ENV,  # the checkout on PYTHONPATH would pass for an installed lmforge
    )
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_wheel_runs_from_an_empty_directory(tmp_path):
    wheel = build_wheel(tmp_path)
    venv = fresh_venv(tmp_path, wheel)
    # Configs of the user's own: an experiment in a directory passed with --config-dir, the model
    # it names in ./conf of the working directory (found by hydra.searchpath).
    (tmp_path / "myconf" / "experiment").mkdir(parents=True)
    (tmp_path / "myconf" / "experiment" / "mine.yaml").write_text(USER_EXPERIMENT)
    work = tmp_path / "work"
    (work / "conf" / "model").mkdir(parents=True)
    nano = (ROOT / "conf" / "model" / "gpt-nano.yaml").read_text()
    (work / "conf" / "model" / "my-nano.yaml").write_text(
        re.sub(r"n_layer: \d+", "n_layer: 1", nano)
    )

    env = dict(CLEAN_ENV, WANDB_MODE="disabled", OMP_NUM_THREADS="1")

    def run(*args: str) -> subprocess.CompletedProcess:
        p = subprocess.run(
            [str(venv / "bin" / args[0]), *args[1:]],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        return p

    # the bundled Tiny Shakespeare, read from inside the installed package, prepared into ./data
    run("lmforge-prepare")
    meta = json.loads((work / "data" / "prepared" / "shakespeare_char" / "meta.json").read_text())
    assert str(venv) in json.dumps(meta) and str(ROOT) not in json.dumps(meta)

    run("lmforge-train", "--config-dir", str(tmp_path / "myconf"), "experiment=mine", "debug=fdr")
    run_dir = work / "logs" / "causal_lm" / "from_wheel"
    config = (run_dir / "config.yaml").read_text()
    assert re.search(r"\bn_layer: 1\b", config)  # the user's model, through the user's experiment
    assert str(ROOT) not in config  # nothing of the run refers to the checkout


DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_dockerfile_pins_the_tested_torch():
    """The image installs the torch the tests run on (constraints-cpu.txt pins it for CPU
    machines), and a C compiler for torch.compile."""
    pinned = re.search(r"^torch==(\S+)", (ROOT / "constraints-cpu.txt").read_text(), re.M)[1]
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pinned)}$", DOCKERFILE, re.M)
    assert torch.__version__.split("+")[0] == pinned
    assert re.search(r"apt-get install .*\bgcc\b", DOCKERFILE, re.S)


def docker_engine() -> bool:
    docker = shutil.which("docker")
    return bool(docker) and subprocess.run([docker, "info"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not docker_engine(), reason="no docker engine")
def test_image_builds_and_trains(tmp_path):
    """docker build, then 20 steps as the README runs it: volumes for logs and prepared data, the
    caller's UID; on a GPU machine with trainer=gpu (bf16, torch.compile)."""
    subprocess.run(["docker", "build", "-t", "lmforge:test", str(ROOT)], check=True)
    logs, prepared = tmp_path / "logs", tmp_path / "prepared"
    logs.mkdir()
    prepared.mkdir()
    gpu = shutil.which("nvidia-smi") is not None
    subprocess.run(
        ["docker", "run", "--rm", "--user", f"{os.getuid()}:{os.getgid()}"]
        + (["--gpus", "all"] if gpu else [])
        + ["-v", f"{logs}:/work/logs", "-v", f"{prepared}:/work/data/prepared", "lmforge:test"]
        + ["model=gpt-nano", "trainer.max_steps=20", "logger=csv", "run_name=smoke"]
        + (["trainer=gpu"] if gpu else []),
        check=True,
    )
    assert (logs / "causal_lm" / "smoke" / "checkpoints" / "last.ckpt").is_file()
    assert (prepared / "shakespeare_char" / "meta.json").is_file()
