"""Tiny Shakespeare as characters, prepared as `data=shakespeare_char` prepares it, for the benchmarks."""

from __future__ import annotations

from pathlib import Path

from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.data.sources import SourceConfig
from lmforge.data.tokenizer import TokenizerConfig

ROOT = Path(__file__).resolve().parents[1]


def prepare_shakespeare_char(out_dir: Path) -> dict:
    source = SourceConfig(
        kind="text_files", paths=[str(ROOT / "data" / "tinyshakespeare" / "input.txt")]
    )
    cfg = PrepareConfig(
        source=source,
        tokenizer=TokenizerConfig(kind="char"),
        split="tail",
        append_eot=False,
        progress=False,
    )
    return prepare(cfg, out_dir)
