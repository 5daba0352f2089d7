"""Thin Hydra entry points: they compose the config, instantiate and call into the library."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmforge.config import BUNDLED_DATA_DIR, CHECKOUT, CONF_DIR
from lmforge.errors import LMForgeError

CONFIG_PATH = str(CONF_DIR)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
# hydra.searchpath of train/prepare/eval.yaml names ./conf, which most working directories lack
warnings.filterwarnings("ignore", message="provider=hydra.searchpath in main, path=conf is not")


def default_run_name() -> str:
    """The start time; under torchrun, its rendezvous id instead, which every rank (and every
    node) sees, so that all of them resolve one run directory."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return run_id if run_id != "none" else datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=,-]{0,127}")


def check_run_name(name) -> str:
    """A run name is one plain directory name: no path separators, no ``..``, not empty."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise LMForgeError(
            f"run_name={name!r} is not a plain directory name: use 1 to 128 letters, digits and"
            " . _ - + = , starting with a letter or digit"
        )
    return name


def run_dir(parent: str, name) -> str:
    """``hydra.run.dir``: ``<parent>/<run_name>``. Hydra creates it before any lmforge code runs
    and prints a resolver's exception as a traceback, so a bad run_name or a logs directory that
    cannot be written is reported here: one line, exit status 2."""
    try:
        path = Path(parent) / check_run_name(name)
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            why = "not writable" if existing.is_dir() else "not a directory"
            raise LMForgeError(
                f"cannot create the run directory {path}: {existing} is {why}; set paths.log_dir"
                " to a writable directory"
            )
    except LMForgeError as e:
        exit_with_error(e)
    return str(path)


# paths.root_dir: the checkout lmforge runs from, else the working directory (installed)
OmegaConf.register_new_resolver("lmforge_root", lambda: str(CHECKOUT or Path.cwd()), replace=True)
OmegaConf.register_new_resolver("lmforge_bundled_data", lambda: str(BUNDLED_DATA_DIR), replace=True)
OmegaConf.register_new_resolver("lmforge_run_name", default_run_name, replace=True, use_cache=True)
OmegaConf.register_new_resolver("lmforge_run_dir", run_dir, replace=True)


def rank_suffix() -> str:
    """``_rank<N>`` in a process that torchrun or SLURM started as global rank N > 0, else
    nothing: the run's log file of each rank (``train_rank1.log``), so the ranks do not write
    into one ``train.log``. (The ranks Lightning's launcher starts get their own job name.)"""
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    return "" if rank == "0" else f"_rank{rank}"


OmegaConf.register_new_resolver("lmforge_rank_suffix", rank_suffix, replace=True)


def help_value(key: str, *, _root_: DictConfig) -> str:
    """``--help``: a key's value in the composition the command would run, as YAML writes it;
    ``-`` where the composition has no such key."""
    value = OmegaConf.select(_root_, key, default="-", throw_on_resolution_failure=False)
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    plain = isinstance(value, str) and value.isprintable() and value.strip() == value != ""
    return value if plain else json.dumps(value)


def config_options(group: str) -> str:
    """``--help``: the configs lmforge ships in a group."""
    return ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


# What each command's hydra.help.template (its --help) shows: values, options, the shipped conf/
OmegaConf.register_new_resolver("lmforge_value", help_value, replace=True)
OmegaConf.register_new_resolver("lmforge_options", config_options, replace=True)
OmegaConf.register_new_resolver("lmforge_conf_dir", lambda: str(CONF_DIR), replace=True)


def exit_with_error(e: LMForgeError):
    """Print a bad-input error as one line (``error: ...``) and exit with status 2."""
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def reports_errors(fn: Callable) -> Callable:
    """Print bad-input errors as one line (``error: ...``) and exit with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LMForgeError as e:
            exit_with_error(e)
        except InstantiationException as e:  # what a callback or strategy raised, wrapped
            if isinstance(e.__cause__, LMForgeError):
                exit_with_error(e.__cause__)
            raise

    return wrapper
