"""From Hydra config nodes to typed dataclasses, with errors that name the key and the fix.

Every node whose ``_target_`` is a dataclass (model, data, task.optim, ...) is merged onto the
dataclass's schema, so an unknown key or a value of the wrong type fails before any work:

    error: model.n_layer: Value 'abc' of type 'str' could not be converted to Integer
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path
from typing import Any, TypeVar

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmforge.errors import LMForgeError

T = TypeVar("T")
# The package's resources: every config (conf/) and the small data sets it names
# (bundled_data/). In a checkout they are links to its top-level conf/ and data/; a wheel holds
# copies. CHECKOUT: the source tree lmforge runs from (an editable install), or None.
PACKAGE_DIR = Path(str(importlib.resources.files("lmforge")))
CONF_DIR = (PACKAGE_DIR / "conf").resolve()
BUNDLED_DATA_DIR = (PACKAGE_DIR / "bundled_data").resolve()
CHECKOUT = CONF_DIR.parent if (CONF_DIR.parent / "pyproject.toml").is_file() else None


def build(node: DictConfig | dict, path: str, cls: type[T] | None = None, **overrides: Any) -> T:
    """Validate ``node`` against dataclass ``cls`` (default: its ``_target_``) and construct it.

    ``path`` is the node's dotted key, used in error messages. ``overrides`` replace fields
    before construction (e.g. ``vocab_size`` taken from the data).
    """
    if not isinstance(node, DictConfig):
        node = OmegaConf.create(node)
    if cls is None:
        target = node.get("_target_")
        if target is None:
            raise LMForgeError(f"{path} has no _target_: name the config dataclass it describes")
        try:
            cls = get_class(target)
        except Exception as e:  # hydra raises ImportError or a bare Exception
            raise LMForgeError(f"{path}._target_={target!r} cannot be imported: {e}") from None
    if not dataclasses.is_dataclass(cls):
        raise LMForgeError(f"{path}._target_ must name a dataclass, got {cls!r}")
    values = OmegaConf.to_container(node, resolve=True)
    values.pop("_target_", None)
    values.update(overrides)
    derived = {f.name for f in dataclasses.fields(cls) if not f.init}
    for key in derived & values.keys():
        raise LMForgeError(
            f"{path}.{key} is derived from the other fields: remove it from the config"
        )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), values)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise LMForgeError(f"{path}.{key}: {msg}" if key else f"{path}: {msg}") from None
    except ValueError as e:  # raised by __post_init__ checks
        msg = str(e).splitlines()[0]
        raise LMForgeError(msg if msg.startswith(path) else f"{path}: {msg}") from None
    if derived:  # OmegaConf sets init=False fields after construction; compute them again
        obj.__post_init__()
    return obj
