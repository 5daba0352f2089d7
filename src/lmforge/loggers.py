"""Logger factories referenced by ``conf/logger``."""

from __future__ import annotations

import netrc
import os

from lmforge.errors import LMForgeError


def wandb_mode(mode: str) -> str:
    """Resolve ``auto`` to ``online`` when W&B credentials are configured, else ``offline``."""
    if mode not in ("auto", "online", "offline", "disabled"):
        raise LMForgeError(f"logger.wandb.mode={mode!r}: use auto, online, offline or disabled")
    env = os.environ.get("WANDB_MODE")
    if env == "disabled":
        return "disabled"
    if mode != "auto":
        return mode
    if env in ("offline", "dryrun"):
        return "offline"
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


def wandb_logger(mode: str = "auto", **kwargs):
    """A Lightning ``WandbLogger`` in the resolved mode, or None when W&B is disabled.

    Offline runs are written under ``save_dir/wandb/offline-run-*``; upload them with
    ``wandb sync``. Credentials come from the environment or ``wandb login``, never the config.
    """
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(mode)
    if mode == "disabled":
        return None
    return WandbLogger(offline=mode == "offline", **kwargs)
