"""Stream documents from text files, JSONL, parquet and Hugging Face datasets, never whole.

Each source yields ``Document(text, origin)`` one at a time; ``origin`` (``file:line``) names
where a document came from in error messages. Files are hashed as they are read, so the
checksums in ``meta.json`` cost no second pass.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import lzma
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LMForgeError

KINDS = ("text_files", "jsonl", "parquet", "hf_dataset")
SUFFIXES = {  # what a directory in `paths` is searched for, by source kind
    "text_files": (".txt", ".txt.gz", ".txt.xz", ".txt.zst", ".md"),
    "jsonl": (".jsonl", ".jsonl.gz", ".jsonl.xz", ".jsonl.zst", ".json"),
    "parquet": (".parquet",),
}


@dataclass
class SourceConfig:
    """Where documents come from."""

    kind: str = "text_files"  # text_files | jsonl | parquet | hf_dataset
    paths: list[str] = field(
        default_factory=list
    )  # files, directories or globs; hf_dataset: a saved dir or hub name
    text_field: str = "text"  # jsonl / parquet / hf_dataset: the field holding the text
    documents: str = (
        "file"  # text_files: "file" (one document per file) or "paragraph" (blank-line separated)
    )
    filter: dict[str, Any] = field(
        default_factory=dict
    )  # keep records whose field equals the value (or is in the list)
    hf_split: str = "train"  # hf_dataset: which split
    on_bad_json: str = (
        "error"  # jsonl: "error" or "skip" (and count) a line that is not a JSON object
    )
    on_bad_utf8: str = "error"  # "error", "skip" (the document) or "replace" (with U+FFFD)

    def __post_init__(self) -> None:
        checks = {
            "kind": KINDS,
            "documents": ("file", "paragraph"),
            "on_bad_json": ("error", "skip"),
            "on_bad_utf8": ("error", "skip", "replace"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise LMForgeError(
                    f"data.prepare.source.{name}={getattr(self, name)!r}: use one of {', '.join(allowed)}"
                )
        if isinstance(self.paths, str):
            self.paths = [self.paths]


@dataclass
class Document:
    text: str
    origin: str


@dataclass
class SourceStats:
    """What reading the sources found; filled while documents stream."""

    files: list[dict] = field(default_factory=list)  # path, bytes, sha256
    bytes_read: int = 0  # bytes read from disk so far (compressed size for compressed files)
    bad_json: int = 0
    bad_utf8: int = 0
    filtered: int = 0


class HashingReader(io.RawIOBase):
    """A binary file wrapper that hashes and counts the bytes read through it."""

    def __init__(self, path: Path, stats: SourceStats) -> None:
        self.f = open(path, "rb")  # noqa: SIM115  (closed in close())
        self.sha = hashlib.sha256()
        self.stats = stats
        self.n = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        if n:
            self.sha.update(memoryview(b)[:n])
            self.stats.bytes_read += n
            self.n += n
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def resolve_paths(patterns: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    """Expand files, directories (recursively, by suffix) and globs into a sorted, unique file list."""
    if not patterns:
        raise LMForgeError(
            "data.prepare.source.paths is empty: give the corpus files, directories or globs"
        )
    files: list[Path] = []
    for pattern in patterns:
        p = Path(os.path.expanduser(pattern))
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not found:
            raise LMForgeError(f"no files match {pattern!r}: check data.prepare.source.paths")
        files.extend(found)
    return list(dict.fromkeys(files))


def open_binary(path: Path, stats: SourceStats):
    """Open ``path`` for reading bytes, decompressing .gz / .xz / .zst; returns (stream, raw reader)."""
    raw = HashingReader(path, stats)
    buffered = io.BufferedReader(raw, buffer_size=1 << 20)
    name = path.name
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=buffered), raw
    if name.endswith(".xz"):
        return lzma.LZMAFile(buffered), raw
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise LMForgeError(
                f"{path}: reading .zst needs the zstandard package: pip install zstandard"
            ) from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(buffered)), raw
    return buffered, raw


def decode(data: bytes, origin: str, policy: str, stats: SourceStats) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        stats.bad_utf8 += 1
        if policy == "error":
            raise LMForgeError(
                f"{origin}: invalid UTF-8 at byte {e.start}: convert the file to UTF-8, or set "
                "data.prepare.source.on_bad_utf8=skip or =replace"
            ) from None
        return None if policy == "skip" else data.decode("utf-8", errors="replace")


def keep(record: dict, filters: dict) -> bool:
    for key, want in filters.items():
        value = record.get(key)
        if (
            isinstance(want, list | tuple)
            and value not in want
            or not isinstance(want, list | tuple)
            and value != want
        ):
            return False
    return True


def _finish(path: Path, raw: HashingReader, stats: SourceStats) -> None:
    stats.files.append({"path": str(path), "bytes": raw.n, "sha256": raw.sha.hexdigest()})


def text_documents(cfg: SourceConfig, stats: SourceStats) -> Iterator[Document]:
    for path in resolve_paths(cfg.paths, SUFFIXES["text_files"]):
        stream, raw = open_binary(path, stats)
        with stream:
            data = stream.read()
        _finish(path, raw, stats)
        if b"\x00" in data[:8192]:
            raise LMForgeError(
                f"{path} looks binary (NUL bytes): give text files, or JSONL/parquet with source.kind"
            )
        text = decode(data, str(path), cfg.on_bad_utf8, stats)
        if text is None:
            continue
        if cfg.documents == "file":
            yield Document(text, str(path))
        else:
            for i, para in enumerate(text.split("\n\n")):
                if para.strip():
                    yield Document(para, f"{path}#{i}")


def jsonl_documents(cfg: SourceConfig, stats: SourceStats) -> Iterator[Document]:
    for path in resolve_paths(cfg.paths, SUFFIXES["jsonl"]):
        stream, raw = open_binary(path, stats)
        with stream:
            for lineno, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                origin = f"{path}:{lineno}"
                if b"\x00" in line:
                    raise LMForgeError(
                        f"{origin}: NUL bytes, the file looks binary: check data.prepare.source.paths"
                    )
                text = decode(line, origin, cfg.on_bad_utf8, stats)
                if text is None:
                    continue
                try:
                    record = json.loads(text)
                    if not isinstance(record, dict):
                        raise ValueError("not an object")
                except ValueError:
                    stats.bad_json += 1
                    if cfg.on_bad_json == "skip":
                        continue
                    raise LMForgeError(
                        f"{origin} is not a JSON object: fix the line or set data.prepare.source.on_bad_json=skip"
                    ) from None
                if cfg.filter and not keep(record, cfg.filter):
                    stats.filtered += 1
                    continue
                if cfg.text_field not in record:
                    raise LMForgeError(
                        f"{origin} has no field {cfg.text_field!r} (fields: {', '.join(record)}):"
                        " set data.prepare.source.text_field"
                    )
                yield Document(str(record[cfg.text_field]), origin)
        _finish(path, raw, stats)


def parquet_documents(cfg: SourceConfig, stats: SourceStats) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LMForgeError("reading parquet needs pyarrow: pip install pyarrow") from None
    for path in resolve_paths(cfg.paths, SUFFIXES["parquet"]):
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise LMForgeError(
                f"{path} is not a readable parquet file ({e}): check data.prepare.source.paths"
            ) from None
        names = pf.schema_arrow.names
        if cfg.text_field not in names:
            raise LMForgeError(
                f"{path} has no column {cfg.text_field!r} (columns: {', '.join(names)}): set data.prepare.source.text_field"
            )
        columns = list(dict.fromkeys([cfg.text_field, *cfg.filter]))
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            for record in batch.to_pylist():
                row += 1
                if cfg.filter and not keep(record, cfg.filter):
                    stats.filtered += 1
                    continue
                if record[cfg.text_field] is not None:
                    yield Document(str(record[cfg.text_field]), f"{path}:row {row}")
        stats.bytes_read += path.stat().st_size
        stats.files.append(
            {"path": str(path), "bytes": path.stat().st_size, "sha256": _sha256(path)}
        )


def hf_documents(cfg: SourceConfig, stats: SourceStats) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise LMForgeError(
            "reading Hugging Face datasets needs the datasets package: pip install datasets"
        ) from None
    for name in cfg.paths:
        if Path(name).exists():
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if cfg.hf_split not in ds:
                    raise LMForgeError(
                        f"{name} has no split {cfg.hf_split!r} (splits: {', '.join(ds)}): set data.prepare.source.hf_split"
                    )
                ds = ds[cfg.hf_split]
            fingerprint = getattr(ds, "_fingerprint", "")
        else:
            try:
                ds = datasets.load_dataset(name, split=cfg.hf_split, streaming=True)
            except Exception as e:
                raise LMForgeError(
                    f"cannot load dataset {name!r} ({type(e).__name__}): save it with save_to_disk and give the directory"
                ) from None
            fingerprint = name
        features = list(ds.features or {})
        if features and cfg.text_field not in features:
            raise LMForgeError(
                f"{name} has no field {cfg.text_field!r} (fields: {', '.join(features)}): set data.prepare.source.text_field"
            )
        for i, record in enumerate(ds):
            if cfg.filter and not keep(record, cfg.filter):
                stats.filtered += 1
                continue
            text = record[cfg.text_field]
            stats.bytes_read += len(text)
            yield Document(text, f"{name}[{i}]")
        stats.files.append({"path": name, "bytes": stats.bytes_read, "sha256": fingerprint})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def documents(cfg: SourceConfig, stats: SourceStats) -> Iterator[Document]:
    reader = {
        "text_files": text_documents,
        "jsonl": jsonl_documents,
        "parquet": parquet_documents,
        "hf_dataset": hf_documents,
    }[cfg.kind]
    return reader(cfg, stats)


def source_signature(cfg: SourceConfig) -> list[dict]:
    """Cheap identity of the inputs (path, size, mtime) for the up-to-date check."""
    if cfg.kind == "hf_dataset":
        sig = []
        for name in cfg.paths:
            p = Path(name)
            files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
            sig.append(
                {
                    "path": name,
                    "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
                }
            )
        return sig
    return [
        {"path": str(f), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
        for f in resolve_paths(cfg.paths, SUFFIXES[cfg.kind])
    ]
