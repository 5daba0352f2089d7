"""Turn a text corpus into memory-mappable token shards.

Output directory layout::

    tokenizer.json   the tokenizer (Hugging Face ``tokenizers`` format)
    train.bin        raw token ids, uint16 (or uint32 when the vocabulary needs it)
    val.bin
    meta.json        written last: tokenizer kind and hash, vocab size, dtype, token counts,
                     the source's checksum and the settings; its presence marks a complete set

Every file is written under a temporary name and renamed, so an interrupted run never leaves
a set that looks complete. Re-running with the same source and settings does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmforge.data.tokenizer import KINDS, load_tokenizer, train_tokenizer
from lmforge.errors import LMForgeError

META_FORMAT = "lmforge-tokens-v1"


@dataclass
class PrepareConfig:
    """How a corpus becomes token shards."""

    source: str  # a UTF-8 text file
    tokenizer: str = "char"  # "char", "bpe", or the path of an existing tokenizer.json
    vocab_size: int = 8192  # for tokenizers trained here ("bpe")
    val_fraction: float = 0.1  # the last fraction of the text becomes the validation split


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def read_meta(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "meta.json"
    if not path.is_file():
        raise LMForgeError(f"{path} not found: prepare the data first (lmforge-prepare data=...)")
    meta = json.loads(path.read_text())
    if meta.get("format") != META_FORMAT:
        raise LMForgeError(
            f"{path} is not an lmforge token set ({META_FORMAT}): re-run lmforge-prepare"
        )
    return meta


def prepare(cfg: PrepareConfig, out_dir: str | Path, force: bool = False) -> dict:
    """Prepare ``cfg.source`` into ``out_dir``; returns the metadata. A no-op when up to date."""
    out = Path(out_dir)
    src = Path(cfg.source)
    if not src.is_file():
        raise LMForgeError(f"source file {src} not found: check data.prepare.source")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise LMForgeError(f"data.prepare.val_fraction must be in (0, 1), got {cfg.val_fraction}")
    tok_path = Path(cfg.tokenizer)
    if cfg.tokenizer not in KINDS and not tok_path.is_file():
        raise LMForgeError(
            f"data.prepare.tokenizer={cfg.tokenizer!r}: use one of {KINDS} or a tokenizer.json path"
        )

    source_sha = sha256_file(src)
    settings = asdict(cfg) | {"source": str(src)}
    fingerprint = {"source_sha256": source_sha, "settings": settings}
    meta_path = out / "meta.json"
    if meta_path.is_file() and not force:
        old = json.loads(meta_path.read_text())
        if old.get("fingerprint") == fingerprint and all(
            (out / s["file"]).is_file() for split in old["splits"].values() for s in split["shards"]
        ):
            return old

    raw = src.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LMForgeError(
            f"{src}: invalid UTF-8 at byte {e.start}: convert the file to UTF-8"
        ) from None
    if not text.strip():
        raise LMForgeError(f"{src} is empty: point data.prepare.source at a non-empty text file")

    cut = int(len(text) * (1.0 - cfg.val_fraction))
    parts = {"train": text[:cut], "val": text[cut:]}
    if cfg.tokenizer in KINDS:
        tok = train_tokenizer(
            [text] if cfg.tokenizer == "char" else text.splitlines(keepends=True),
            cfg.tokenizer,
            cfg.vocab_size,
        )
    else:
        tok = load_tokenizer(tok_path)
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)

    out.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # the old set is no longer complete
    tok_json = tok.to_str()
    atomic_write_bytes(out / "tokenizer.json", tok_json.encode())
    splits = {}
    for name, part in parts.items():
        ids = np.asarray(tok.encode(part).ids, dtype=dtype)
        atomic_write_bytes(out / f"{name}.bin", ids.tobytes())
        splits[name] = {
            "tokens": int(ids.size),
            "chars": len(part),
            "bytes": len(part.encode("utf-8")),
            "shards": [{"file": f"{name}.bin", "tokens": int(ids.size)}],
        }
    meta = {
        "format": META_FORMAT,
        "tokenizer": {
            "kind": cfg.tokenizer if cfg.tokenizer in KINDS else "file",
            "file": "tokenizer.json",
            "sha256": hashlib.sha256(tok_json.encode()).hexdigest(),
        },
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "sources": [{"path": str(src), "sha256": source_sha, "bytes": len(raw)}],
        "splits": splits,
        "fingerprint": fingerprint,
    }
    atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
    return meta
