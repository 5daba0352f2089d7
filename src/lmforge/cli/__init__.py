"""Thin Hydra entry points: they compose the config, instantiate and call into the library."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from datetime import datetime

from omegaconf import OmegaConf

from lmforge.config import CONF_DIR
from lmforge.errors import LMForgeError

CONFIG_PATH = str(CONF_DIR)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def default_run_name() -> str:
    """The start time; under torchrun, its rendezvous id instead, which every rank (and every
    node) sees, so that all of them resolve one run directory."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return run_id if run_id != "none" else datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


OmegaConf.register_new_resolver("lmforge_root", lambda: str(CONF_DIR.parent), replace=True)
OmegaConf.register_new_resolver("lmforge_run_name", default_run_name, replace=True, use_cache=True)


def reports_errors(fn: Callable) -> Callable:
    """Print bad-input errors as one line (``error: ...``) and exit with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LMForgeError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
