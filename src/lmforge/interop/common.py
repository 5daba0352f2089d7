"""Reading and writing Hugging Face model directories safely (safetensors, weights_only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.errors import LMForgeError
from lmforge.files import staged_dir

EXPORT_FILES = frozenset(
    {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
)  # what write_hf_dir writes


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``rows`` (a vocabulary padded to a multiple of 64);
    the padded rows are never read, and exports cut them off again."""
    return torch.cat([t, t.new_zeros(rows - t.size(0), *t.shape[1:])]) if t.size(0) < rows else t


def read_hf_dir(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The ``config.json`` and the state dict of a ``save_pretrained`` directory."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LMForgeError(
            f"{config_file} not found: give a directory written by transformers' save_pretrained"
        )
    config = json.loads(config_file.read_text())
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        try:
            state = load_file(str(path / "model.safetensors"))
        except Exception as e:
            raise LMForgeError(
                f"{path}/model.safetensors cannot be read ({e}): the file is corrupt or truncated"
            ) from None
    elif (path / "pytorch_model.bin").is_file():
        try:
            state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise LMForgeError(
                f"{path}/pytorch_model.bin cannot be loaded safely ({type(e).__name__}): convert it to safetensors"
            ) from None
    else:
        raise LMForgeError(
            f"{path} holds neither model.safetensors nor pytorch_model.bin (sharded checkpoints are not supported)"
        )
    return config, state


def write_hf_dir(
    out: str | Path,
    config: dict,
    state: dict[str, torch.Tensor],
    tokenizer=None,
    tokenizer_config: dict | None = None,
) -> Path:
    """Write config.json, model.safetensors and tokenizer files into ``out`` (built aside, then
    renamed); an existing ``out`` is replaced only when it is an export of lmforge (or empty)."""
    from safetensors.torch import save_file

    out = Path(out)
    with staged_dir(
        out, EXPORT_FILES.__contains__, "choose another output directory (a new or empty one)"
    ) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in state.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or {}, indent=2))
    return out
