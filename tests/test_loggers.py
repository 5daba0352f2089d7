import pytest

from lmforge.errors import LMForgeError
from lmforge.loggers import wandb_logger, wandb_mode


def test_auto_mode_is_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("online") == "disabled"


def test_disabled_gives_no_logger_and_bad_mode_is_refused(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_logger(mode="auto", project="p") is None
    with pytest.raises(LMForgeError, match="logger.wandb.mode"):
        wandb_mode("sometimes")
