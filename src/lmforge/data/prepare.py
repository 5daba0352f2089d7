"""Turn a corpus into memory-mappable token shards.

Documents stream from the source (``sources.py``), are cleaned (Unicode NFC, control
characters dropped, a minimum length), de-duplicated by content hash, assigned to train or
validation by a seeded hash of their content (so no document lands on both sides), tokenized
in batches by Hugging Face ``tokenizers`` (which spreads a batch over all cores), and appended,
each followed by an end-of-document token, to fixed-size shards.

Output directory::

    tokenizer.json            the tokenizer
    train.bin | train_00000.bin, train_00001.bin, ...   token ids, uint16 (uint32 for vocabularies
    val.bin   | val_00000.bin, ...                      above 65,536); one shard keeps the plain name
    train.idx, val.idx        uint64 offsets of each document's first token in the split
    meta.json                 tokenizer hash, vocab size, dtype, per-split token and document counts,
                              what cleaning removed, the sources and their checksums, the settings

The set is built in a temporary directory and swapped in at the end: an interrupted run leaves
the previous set as it was and never a set that looks complete. Only a directory lmforge wrote
(or an empty one) is replaced; one holding other files is refused. Re-running with the same
inputs (paths, sizes, modification times) and settings does nothing; without source paths, the
set already in the directory is used as it is (``data=corpus data.dir=<a prepared set>``).

A document longer than ``chunk_bytes`` is tokenized in pieces of about that size, cut before a
space that starts a word, where every tokenizer lmforge trains (and GPT-2's) splits anyway: the
ids are those of the whole document, and memory stays bounded by the piece size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from lmforge.data.sources import Document, SourceConfig, SourceStats, documents, source_signature
from lmforge.data.tokenizer import (
    TRAINED,
    TokenizerConfig,
    document_separator,
    gpt2_tokenizer,
    load_tokenizer,
    special_ids,
    train_tokenizer,
)
from lmforge.errors import LMForgeError
from lmforge.files import atomic_write_bytes, staged_dir

META_FORMAT = "lmforge-tokens-v2"
SET_FILES = re.compile(r"(tokenizer|meta)\.json|(train|val)(_\d{5})?\.bin|(train|val)\.idx")
WORD_START = re.compile(r" (?=\S)")  # where a long document may be cut: before " word"
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # keeps \t \n \r


@dataclass
class PrepareConfig:
    """How a corpus becomes token shards."""

    source: SourceConfig = field(default_factory=SourceConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    val_fraction: float = (
        0.1  # share of documents (split=documents) or of text (split=tail) for validation
    )
    split: str = (
        "documents"  # documents: seeded by content hash | tail: the last val_fraction of the text
    )
    seed: int = 1337  # seeds the document split
    normalize: bool = True  # Unicode NFC
    drop_control: bool = True  # remove control characters other than tab and newlines
    min_chars: int = 1  # drop documents shorter than this after cleaning
    dedup: bool = True  # drop exact duplicates (by content hash)
    append_eot: bool = True  # end every document with <|endoftext|> (or [SEP])
    shard_tokens: int = 1 << 28  # tokens per shard file
    chunk_bytes: int = 4 << 20  # text per tokenizer batch (a longer document: in pieces)
    progress: bool = True  # a progress bar with MB/s and tokens/s

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise LMForgeError(
                f"data.prepare.val_fraction must be in (0, 1), got {self.val_fraction}"
            )
        if self.split not in ("documents", "tail"):
            raise LMForgeError(f"data.prepare.split={self.split!r}: use documents or tail")
        for name in ("shard_tokens", "chunk_bytes"):
            if getattr(self, name) <= 0:
                raise LMForgeError(
                    f"data.prepare.{name} must be positive, got {getattr(self, name)}"
                )


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def read_meta(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "meta.json"
    if not path.is_file():
        raise LMForgeError(f"{path} not found: prepare the data first (lmforge-prepare data=...)")
    try:
        meta = json.loads(path.read_text())
    except ValueError:
        raise LMForgeError(f"{path} is not valid JSON: re-run lmforge-prepare") from None
    if meta.get("format") != META_FORMAT:
        raise LMForgeError(
            f"{path} is not an lmforge token set ({META_FORMAT}): re-run lmforge-prepare"
        )
    return meta


@dataclass
class Counts:
    documents: int = 0
    duplicates: int = 0
    too_short: int = 0


class Cleaner:
    """Normalises, filters and de-duplicates documents; assigns each to a split."""

    def __init__(self, cfg: PrepareConfig) -> None:
        self.cfg = cfg
        self.seen: set[bytes] = set()
        self.counts = Counts()
        self.key = cfg.seed.to_bytes(8, "little", signed=True)

    def clean(self, text: str) -> str:
        if self.cfg.normalize and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        if self.cfg.drop_control:
            text = CONTROL.sub("", text)
        return text

    def __call__(self, docs: Iterator[Document]) -> Iterator[tuple[str, bool]]:
        """Yields (text, is_validation) for every kept document."""
        for doc in docs:
            self.counts.documents += 1
            text = self.clean(doc.text)
            if len(text.strip()) < self.cfg.min_chars:
                self.counts.too_short += 1
                continue
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if self.cfg.dedup:
                if digest in self.seen:
                    self.counts.duplicates += 1
                    continue
                self.seen.add(digest)
            u = int.from_bytes(
                hashlib.blake2b(digest, digest_size=8, key=self.key).digest(), "little"
            )
            yield text, u / 2**64 < self.cfg.val_fraction


class ShardWriter:
    """Appends token ids to fixed-size shard files of one split; records document starts.

    Tokens go straight to the open shard file (``*.bin.tmp``), renamed when the shard is full,
    so memory does not grow with the corpus.
    """

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.file = None
        self.fill = 0
        self.shards: list[dict] = []
        self.doc_starts: list[int] = []
        self.total = 0
        self.documents = 0
        self.bytes = 0

    def add(self, ids: np.ndarray, n_bytes: int, new_document: bool = True) -> None:
        """Append ``ids``: a new document, or (``new_document=False``) more of the last one."""
        if new_document:
            self.doc_starts.append(self.total)
            self.documents += 1
        self.bytes += n_bytes
        self.total += ids.size
        while ids.size:
            if self.file is None:
                self.file = open(self.out / f"{self._name()}.tmp", "wb")  # noqa: SIM115  (closed in flush)
            n = min(ids.size, self.shard_tokens - self.fill)
            self.file.write(ids[:n].tobytes())
            self.fill += n
            ids = ids[n:]
            if self.fill == self.shard_tokens:
                self.flush()

    def _name(self) -> str:
        return f"{self.split}_{len(self.shards):05d}.bin"

    def flush(self) -> None:
        if self.file is None:
            return
        name = self._name()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.out / f"{name}.tmp", self.out / name)
        self.shards.append({"file": name, "tokens": int(self.fill)})
        self.file, self.fill = None, 0

    def close(self) -> dict:
        self.flush()
        if len(self.shards) == 1:  # a single shard keeps the plain name (train.bin), as nanoGPT's
            os.replace(self.out / self.shards[0]["file"], self.out / f"{self.split}.bin")
            self.shards[0]["file"] = f"{self.split}.bin"
        atomic_write_bytes(
            self.out / f"{self.split}.idx", np.asarray(self.doc_starts, dtype=np.uint64).tobytes()
        )
        return {
            "tokens": self.total,
            "documents": self.documents,
            "bytes": self.bytes,
            "shards": self.shards,
            "index": f"{self.split}.idx",
        }


def tail_split(stream: Iterator[tuple[str, bool]], cut: int) -> Iterator[tuple[str, bool]]:
    """Re-split a document stream so that the text after character ``cut`` is validation."""
    pos = 0
    for text, _ in stream:
        end = pos + len(text)
        if end <= cut:
            yield text, False
        elif pos >= cut:
            yield text, True
        else:
            yield text[: cut - pos], False
            yield text[cut - pos :], True
        pos = end


class Progress:
    """A rich progress bar over source bytes, with text MB/s and tokens/s."""

    def __init__(self, enabled: bool, total_bytes: int, label: str) -> None:
        self.bar = None
        self.start = time.perf_counter()
        self.text_bytes = self.tokens = 0
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task(label, total=total_bytes or None, rate="")

    def update(self, source_bytes: int, text_bytes: int = 0, tokens: int = 0) -> None:
        self.text_bytes += text_bytes
        self.tokens += tokens
        if self.bar is not None:
            dt = max(time.perf_counter() - self.start, 1e-9)
            rate = f"{self.text_bytes / dt / 1e6:.1f} MB/s  {self.tokens / dt / 1e6:.2f} M tok/s"
            self.bar.update(self.task, completed=source_bytes, rate=rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def build_tokenizer(cfg: PrepareConfig, sample: Iterator[str] | None) -> Tokenizer:
    t = cfg.tokenizer
    if t.kind == "file":
        return load_tokenizer(t.path)
    if t.kind == "gpt2":
        return gpt2_tokenizer(t.path)
    return train_tokenizer((p for text in sample for p, _ in pieces(text, cfg.chunk_bytes)), t)


def pieces(text: str, size: int) -> Iterator[tuple[str, bool]]:
    """Cut ``text`` into pieces of about ``size`` characters (more only where no word starts),
    each cut just before a space followed by a non-space; yields (piece, is_last).

    A byte-level BPE (GPT-2's pattern), a WordPiece (BERT pre-tokenizer), a Unigram (Metaspace)
    and the char tokenizer all split there too, so the pieces' ids joined equal the whole text's.
    """
    start = 0
    while len(text) - start > size:
        cut = WORD_START.search(text, start + size)
        if cut is None:
            break
        yield text[start : cut.start()], False
        start = cut.start()
    yield text[start:], True


def limit_bytes(texts: Iterator[str], n_bytes: int) -> Iterator[str]:
    seen = 0
    for text in texts:
        yield text
        seen += len(text)
        if seen >= n_bytes:
            return


def fingerprint(cfg: PrepareConfig) -> dict:
    fp = {"format": META_FORMAT, "sources": source_signature(cfg.source), "settings": asdict(cfg)}
    fp["settings"].pop("progress")
    if cfg.tokenizer.kind in ("file", "gpt2"):
        p = Path(cfg.tokenizer.path)
        files = [p] if p.is_file() else [p / "encoder.json", p / "vocab.bpe"]
        fp["tokenizer_files"] = [
            [str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()
        ]
    return fp


def up_to_date(out: Path, fp: dict) -> dict | None:
    try:
        meta = read_meta(out)
    except LMForgeError:
        return None
    if meta.get("fingerprint") != fp:
        return None
    files = [s["file"] for split in meta["splits"].values() for s in split["shards"]]
    return meta if all((out / f).is_file() for f in files) else None


def prepare(cfg: PrepareConfig, out_dir: str | Path, force: bool = False) -> dict:
    """Prepare the corpus of ``cfg`` into ``out_dir``; returns the metadata. A no-op when up to date."""
    out = Path(out_dir)
    if not cfg.source.paths:  # no source: the prepared set in out_dir is used as it is
        if (out / "meta.json").is_file():
            return read_meta(out)
        raise LMForgeError(
            f"data.dir={out} holds no prepared set (meta.json) and data.prepare.source.paths is"
            " empty: give the corpus files, directories or globs, or the directory of a set"
            " lmforge-prepare wrote"
        )
    fp = fingerprint(cfg)
    root = out.resolve()
    for source in fp["sources"]:
        path = Path(source["path"]).resolve()
        if path.exists() and (path == root or root in path.parents):
            raise LMForgeError(
                f"the source {source['path']} is inside data.dir={out}, which prepare replaces:"
                " choose another data.dir"
            )
    if not force and (meta := up_to_date(out, fp)) is not None:
        return meta
    fix = "choose another data.dir (a new or empty directory)"
    with staged_dir(out, SET_FILES.fullmatch, fix) as tmp:
        meta = _prepare_into(cfg, tmp, fp)
    return meta


def _prepare_into(cfg: PrepareConfig, out: Path, fp: dict) -> dict:
    total_source = sum(s.get("size", 0) for s in fp["sources"])
    cut = None
    sample = None
    if (
        cfg.split == "tail"
    ):  # a first pass measures the text (and trains the tokenizer on all of it)
        texts = []
        n_chars = 0
        for text, _ in Cleaner(cfg)(documents(cfg.source, SourceStats())):
            if cfg.tokenizer.kind in TRAINED and n_chars < cfg.tokenizer.sample_bytes:
                texts.append(text)
            n_chars += len(text)
        if n_chars == 0:
            raise LMForgeError(_empty_message(cfg))
        cut = int(n_chars * (1.0 - cfg.val_fraction))
        sample = iter(texts)
    else:
        check_split(cfg)
    if cfg.split == "documents" and cfg.tokenizer.kind in TRAINED:
        # char vocabularies must cover validation text too; learned ones train on training text
        only_train = cfg.tokenizer.kind != "char"
        sample = limit_bytes(
            (
                t
                for t, is_val in Cleaner(cfg)(documents(cfg.source, SourceStats()))
                if not (only_train and is_val)
            ),
            cfg.tokenizer.sample_bytes,
        )
    tok = build_tokenizer(cfg, sample)
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    eot = document_separator(tok) if cfg.append_eot else None
    if cfg.append_eot and eot is None:
        raise LMForgeError(
            "the tokenizer has no <|endoftext|> or [SEP] token: add one, or set data.prepare.append_eot=false"
        )
    tok_json = tok.to_str()
    atomic_write_bytes(out / "tokenizer.json", tok_json.encode())

    stats = SourceStats()
    cleaner = Cleaner(cfg)
    stream = cleaner(documents(cfg.source, stats))
    if cut is not None:
        stream = tail_split(stream, cut)
    writers = {name: ShardWriter(out, name, dtype, cfg.shard_tokens) for name in ("train", "val")}
    progress = Progress(
        cfg.progress, total_source, f"tokenizing {out.name.split('.tmp-')[0].lstrip('.')}"
    )
    batch: list[tuple[str, bool, bool, bool]] = []  # (text, is_val, starts a document, ends it)
    batch_bytes = 0

    def encode(batch: list[tuple[str, bool, bool, bool]]) -> None:
        encodings = tok.encode_batch_fast([t for t, *_ in batch], add_special_tokens=False)
        n_tok = n_bytes = 0
        for (text, is_val, first, last), enc in zip(batch, encodings):
            ids = np.asarray(enc.ids, dtype=dtype)
            if last and eot is not None:
                ids = np.append(ids, np.asarray(eot, dtype=dtype))
            nb = len(text.encode("utf-8", "surrogatepass"))
            writers["val" if is_val else "train"].add(ids, nb, new_document=first)
            n_tok += ids.size
            n_bytes += nb
        progress.update(stats.bytes_read, n_bytes, n_tok)

    try:
        for text, is_val in stream:
            first = True
            for piece, last in pieces(text, cfg.chunk_bytes):
                batch.append((piece, is_val, first, last))
                batch_bytes += len(piece)
                first = False
                if batch_bytes >= cfg.chunk_bytes:
                    encode(batch)
                    batch, batch_bytes = [], 0
        if batch:
            encode(batch)
    finally:
        progress.close()
    splits = {name: w.close() for name, w in writers.items()}
    if splits["train"]["tokens"] == 0 and splits["val"]["tokens"] == 0:
        raise LMForgeError(_empty_message(cfg))
    for name in ("train", "val"):
        if splits[name]["documents"] == 0:
            raise LMForgeError(
                f"the {name} split is empty ({cleaner.counts.documents} documents kept): raise"
                " data.prepare.val_fraction, give more documents, or set data.prepare.split=tail"
            )
    elapsed = time.perf_counter() - progress.start
    meta = {
        "format": META_FORMAT,
        "tokenizer": {
            "kind": cfg.tokenizer.kind,
            "file": "tokenizer.json",
            "sha256": hashlib.sha256(tok_json.encode()).hexdigest(),
        },
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eot_id": eot,
        "special_tokens": special_ids(tok),
        "sources": stats.files,
        "splits": splits,
        "documents": {
            "read": cleaner.counts.documents,
            "duplicates_removed": cleaner.counts.duplicates,
            "too_short": cleaner.counts.too_short,
            "bad_json_skipped": stats.bad_json,
            "bad_utf8": stats.bad_utf8,
            "filtered_out": stats.filtered,
        },
        "throughput": {
            "seconds": round(elapsed, 3),
            "text_mb_per_s": round(progress.text_bytes / elapsed / 1e6, 3),
            "tokens_per_s": round(progress.tokens / elapsed),
        },
        "fingerprint": fp,
    }
    atomic_write_bytes(out / "meta.json", json.dumps(meta, indent=2).encode())
    return meta


def check_split(cfg: PrepareConfig) -> None:
    """Refuse, before any tokenizing, a document split that leaves train or validation empty
    (a few documents, one per file say). Reads documents only until both splits hold one:
    for a corpus of many documents, the first hundred or so."""
    held = {False: 0, True: 0}
    for _, is_val in Cleaner(cfg)(documents(cfg.source, SourceStats())):
        held[is_val] += 1
        if held[False] and held[True]:
            return
    kept = held[False] + held[True]
    if kept == 0:
        raise LMForgeError(_empty_message(cfg))
    empty = "validation" if held[False] else "training"
    per_file = (
        ", data.prepare.source.documents=paragraph (a document per blank-line-separated"
        " paragraph, not per file)"
        if cfg.source.kind == "text_files" and cfg.source.documents == "file"
        else ""
    )
    raise LMForgeError(
        f"the {empty} split would be empty: data.prepare.split=documents holds out whole"
        f" documents, and none of the {kept} kept fell to {empty} at"
        f" data.prepare.val_fraction={cfg.val_fraction}: set data.prepare.split=tail (the last"
        f" val_fraction of the text){per_file}, give more documents, or change"
        " data.prepare.val_fraction"
    )


def _empty_message(cfg: PrepareConfig) -> str:
    return (
        f"no text in {', '.join(cfg.source.paths)} after cleaning: check the files, "
        "data.prepare.source.text_field, .filter and data.prepare.min_chars"
    )
