"""Shared fixtures: a tiny corpus, composed configs, W&B kept offline inside the test's tmp dir."""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import lmforge.cli  # noqa: F401  (registers the lmforge_root resolver)
from lmforge.config import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "tinyshakespeare" / "input.txt"
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    """The first 60 kB of Tiny Shakespeare."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(SHAKESPEARE.read_text()[:60_000])
    return path


def compose_train(overrides: list[str], tmp_path: Path, config_name: str = "train") -> DictConfig:
    """Compose a config as `lmforge-train` would, with every output under ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name=config_name,
            return_hydra_config=True,
            overrides=[f"paths.log_dir={tmp_path}/logs", *overrides],
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        del cfg.hydra
    return cfg


def train_run(log_dir: Path, name: str, *overrides: str) -> DictConfig:
    """Train in this process what ``lmforge-train paths.log_dir=<log_dir> run_name=<name>
    <overrides>`` trains in its own, into the same run directory (<log_dir>/<task>/<name>):
    the one-process reference runs of tests that compare with launched ones."""
    from lmforge.cli.train import train

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            return_hydra_config=True,
            overrides=[f"paths.log_dir={log_dir}", f"run_name={name}", *overrides],
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(log_dir) / cfg.task.name / name)
        del cfg.hydra
    train(cfg)
    return cfg


def compose_cli(config_name: str, *overrides: str) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line ``overrides``, as the console script
    ``lmforge-<config_name>`` would (Hydra parses the same override strings)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def run_cli(
    capfd, main: Callable, config_name: str, *overrides: str
) -> subprocess.CompletedProcess:
    """Run a CLI's Hydra ``main`` in this process on ``compose_cli(config_name, *overrides)``:
    its exit status (0 when it returns, else the code of its SystemExit: 2 for an
    ``error: ...`` line) and what it wrote to stdout and stderr (file descriptors included),
    as a subprocess of the console script would report them, without its seconds of imports.
    Any other exception propagates: a traceback fails the test."""
    cfg = compose_cli(config_name, *overrides)
    capfd.readouterr()  # only what this run writes
    returncode = 0
    try:
        main(cfg)
    except SystemExit as e:
        returncode = e.code
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess([config_name, *overrides], returncode, out, err)


@pytest.fixture
def train_cfg(tmp_path, tiny_text):
    """A builder of tiny training configs on the tiny corpus (char tokens, gpt-nano)."""

    def make(*overrides: str) -> DictConfig:
        return compose_train(
            [
                "model=gpt-nano",
                f"data.dir={tmp_path}/data",
                f"data.prepare.source.paths=[{tiny_text}]",
                "trainer.enable_model_summary=false",
                *overrides,
            ],
            tmp_path,
        )

    return make


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs one worker per core) every worker and the runs it
    launches use one thread: two workers of two threads each on two cores spin in each other's
    OpenMP barriers and run several times slower than one worker alone."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".pytest_cache" / "inductor"))
    # Tests that share a module-scoped fixture (the runs of tests/test_distributed.py, say) go to
    # one xdist worker (--dist loadgroup), which builds the fixture once.
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        params = getattr(getattr(item, "callspec", None), "params", {})
        shared = sorted(
            f"{name}={params[name]}" if name in params else name
            for name, defs in (info.name2fixturedefs.items() if info else ())
            if defs and defs[-1].scope == "module"
        )
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}:{'+'.join(shared)}"))
    # The modules whose tests launch training processes first, so that the workers do not end
    # with one of them running alone (a module's tests stay together).
    first = ("test_distributed", "test_reliability", "test_sweeps")
    items.sort(
        key=lambda item: (
            first.index(n)
            if (n := item.module.__name__.rpartition(".")[2]) in first
            else len(first)
        )
    )


def wandb_records(path: Path):
    """The protobuf records of a run-<id>.wandb file (LevelDB log format, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_values(items) -> dict[str, str]:
    """A config update's or history row's items as {key: JSON value} ("a/b" keys may come
    split into nested_key)."""
    return {item.key or "/".join(item.nested_key): item.value_json for item in items}
