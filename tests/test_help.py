"""Each console script's --help: what the command does, its most used keys, three examples that
run as written (they compose), and nothing of Hydra's generic help."""

from __future__ import annotations

import re
import shlex
import string
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lmforge.cli import consolidate, eval, export, generate, plot, prepare, sweep, train
from lmforge.config import CONF_DIR

from .conftest import compose_cli

HYDRA_CLIS = {"train": train, "prepare": prepare, "eval": eval, "generate": generate}


def hydra_help(capsys, monkeypatch, name: str, *overrides: str) -> str:
    """``lmforge-<name> --help [overrides]`` in this process."""
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", [f"lmforge-{name}", "--help", *overrides])
    with pytest.raises(SystemExit) as e:
        HYDRA_CLIS[name].main()
    assert e.value.code == 0
    GlobalHydra.instance().clear()
    return capsys.readouterr().out


def examples(text: str, command: str) -> list[list[str]]:
    """The arguments of the help's example command lines."""
    lines = re.findall(rf"^\s+{command} (.+)$", text.split("xamples:", 1)[1], re.M)
    return [shlex.split(line, comments=True) for line in lines]


@pytest.mark.parametrize("name", HYDRA_CLIS)
def test_hydra_cli_help(name):
    """The help text of each command, from its composed hydra.help.template (Hydra's --help
    itself lists every config group, a second or more: it runs once, in the next test)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        template = compose(name, return_hydra_config=True).hydra.help.template
    text = string.Template(template).safe_substitute(APP_CONFIG_GROUPS="")
    assert text.startswith(f"lmforge-{name}: ")
    assert "powered by" not in text.lower() and "Most used keys" in text
    runs = examples(text, f"lmforge-{name}")
    assert len(runs) == 3
    for args in runs:  # every example names keys and options that exist
        compose_cli(name, *args)
    if name != "train":  # Hydra's list of groups would show the training ones too
        assert "$APP_CONFIG_GROUPS" not in template
        assert not re.search(r"\b(trainer|experiment|callbacks|logger)\b", text)


def test_train_help(capsys, monkeypatch):
    """lmforge-train --help as run: no Hydra banner, the groups, the keys' values in the
    composition asked for."""
    text = hydra_help(capsys, monkeypatch, "train", "experiment=shakespeare_bpe_cpu")
    assert text.startswith("lmforge-train: ") and "powered by" not in text.lower()
    assert re.search(r"^experiment: .*shakespeare_bpe_cpu", text, re.M)
    cfg = compose_cli("train", "experiment=shakespeare_bpe_cpu")
    assert re.search(rf"trainer.max_steps .*\[{cfg.trainer.max_steps}\]", text)
    assert re.search(rf"model.block_size .*\[{cfg.model.block_size}\]", text)
    assert "[-]" not in text  # every key it names exists


@pytest.mark.parametrize("cli", [consolidate, export, plot, sweep], ids=lambda m: m.__name__)
def test_argparse_cli_help(capsys, cli):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    name = f"lmforge-{cli.__name__.rsplit('.', 1)[1]}"
    assert f"{name}: " in text
    assert len(re.findall(rf"^  {name} ", text.split("examples:", 1)[1], re.M)) == 3
