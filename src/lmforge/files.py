"""Writes that never leave a half-written file or directory behind."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from lmforge.errors import LMForgeError


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator:
    """A binary file to write ``path`` through: written under a temporary name beside it,
    fsynced and renamed over ``path`` when the block ends; removed if the block fails."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a new file: never truncate one left behind (it may be a link)
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_torch_save(obj, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        torch.save(obj, f)


def atomic_copy(src: Path, path: Path) -> None:
    with open(src, "rb") as fin, atomic_open(path) as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)


def atomic_link(src: Path, path: Path) -> None:
    """Make ``path`` a hard link of ``src`` (one copy of the bytes on disk), replacing ``path``
    by a rename; a byte copy where the file system refuses links. ``path`` is only ever replaced,
    never written in place, so a later rewrite of either name leaves the other as it was."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (some network and FAT file systems), or across devices
        atomic_copy(src, path)
        return
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


MARKER = ".lmforge"  # written into every directory lmforge builds with staged_dir
MARKER_TEXT = b"Written by lmforge, which may replace this directory as a whole.\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Remove the staging directories (``.NAME.tmp-PID``, ``.NAME.old-PID``) that a killed
    lmforge process left beside ``out``: only those that carry the marker and whose process is
    gone. A set moved aside by a process killed before it renamed the new one in is put back."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)")
    for entry in out.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m is None or not (entry / MARKER).is_file() or entry.is_symlink():
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and _alive(pid):  # our own pid: left by an earlier process
            continue
        if m.group(1) == "old" and not out.exists():
            os.replace(entry, out)
        else:
            shutil.rmtree(entry)


def foreign_entries(out: Path, owned: Callable[[str], bool]) -> list[str]:
    """The entries of directory ``out`` that lmforge did not write there: anything but regular
    files that are the marker or whose names ``owned`` accepts. A directory holding only such
    files is lmforge's own, with the marker or without it (one written before the marker)."""
    return sorted(
        e.name
        for e in out.iterdir()
        if e.is_symlink() or not e.is_file() or not (e.name == MARKER or owned(e.name))
    )


@contextlib.contextmanager
def staged_dir(out: Path, owned: Callable[[str], bool], fix: str) -> Iterator[Path]:
    """Yield an empty directory beside ``out``; when the block succeeds it replaces ``out``
    (the previous ``out`` is moved aside first, never deleted before the new one is in place);
    when it fails or is interrupted, ``out`` stays as it was and the staging directory is removed.

    Only a directory lmforge wrote is replaced: ``out`` must be new, empty, or hold only the
    marker and files whose names ``owned`` accepts; anything else (a file, a directory with
    other files) is refused with ``fix`` (what to do instead) before anything is written.
    The new directory carries the marker. Staging directories of killed processes are removed.
    """
    out = Path(out)
    if out.is_symlink() and out.is_dir():  # a link to a data disk: replace the real directory
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise LMForgeError(f"{out} is a file, not a directory: {fix}")
    if out.is_dir() and (foreign := foreign_entries(out, owned)):
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise LMForgeError(f"{out} holds files lmforge did not write ({shown}): {fix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    tmp.mkdir()  # ours from here on: mkdir refuses an existing name
    moved = False  # whether ``out`` (checked to be ours above) was moved to ``old``
    try:
        (tmp / MARKER).write_bytes(MARKER_TEXT)
        yield tmp
        if out.exists():
            os.replace(out, old)
            moved = True
        os.replace(tmp, out)
    finally:
        if moved:
            if not out.exists():  # interrupted between the two renames
                os.replace(old, out)
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
