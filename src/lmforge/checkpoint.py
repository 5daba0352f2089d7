"""Load models saved by lmforge training runs, safely (``torch.load(weights_only=True)``)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmforge.errors import LMForgeError
from lmforge.models.gpt import GPT, GPTConfig


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(
            f"checkpoint {path} not found: pass ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, or pickled objects
        raise LMForgeError(
            f"checkpoint {path} cannot be read ({type(e).__name__}): it is corrupt or not an lmforge checkpoint"
        ) from None


def load_gpt(path: str | Path) -> tuple[GPT, Tokenizer | None]:
    """The GPT and tokenizer stored in a causal-LM checkpoint of ours, in eval mode on the CPU."""
    ckpt = load_checkpoint(path)
    try:
        model_cfg = GPTConfig(**ckpt["hyper_parameters"]["model"])
        state = {
            k.removeprefix("model."): v
            for k, v in ckpt["state_dict"].items()
            if k.startswith("model.")
        }
    except (KeyError, TypeError) as e:
        raise LMForgeError(
            f"checkpoint {path} is not a GPT checkpoint of lmforge (missing {e})"
        ) from None
    model = GPT(model_cfg)
    model.load_state_dict(state)
    tokenizer = Tokenizer.from_str(ckpt["tokenizer"]) if "tokenizer" in ckpt else None
    return model.eval(), tokenizer
