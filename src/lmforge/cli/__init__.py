"""Thin Hydra entry points: they compose the config, instantiate and call into the library."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable

from omegaconf import OmegaConf

from lmforge.config import CONF_DIR
from lmforge.errors import LMForgeError

CONFIG_PATH = str(CONF_DIR)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
OmegaConf.register_new_resolver("lmforge_root", lambda: str(CONF_DIR.parent), replace=True)


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
