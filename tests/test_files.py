"""lmforge replaces only directories it wrote: prepared token sets and exports refuse foreign
directories and files, leave nothing behind when killed or interrupted, and clean up after
killed processes."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.data.sources import SourceConfig
from lmforge.data.tokenizer import TokenizerConfig
from lmforge.errors import LMForgeError
from lmforge.files import MARKER
from lmforge.interop.common import write_hf_dir

from .conftest import ROOT, SHAKESPEARE


def text_cfg(*paths, **kw) -> PrepareConfig:
    return PrepareConfig(
        source=SourceConfig(paths=[str(p) for p in paths]),
        tokenizer=TokenizerConfig(kind="char"),
        split="tail",
        progress=False,
        **kw,
    )


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(SHAKESPEARE.read_text()[:20_000])
    return path


def test_prepare_replaces_only_its_own_directories(tmp_path, corpus):
    out = tmp_path / "set"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LMForgeError) as info:
        prepare(text_cfg(corpus), out)
    assert str(info.value) == (
        f"{out} holds files lmforge did not write (notes.txt): choose another data.dir"
        " (a new or empty directory)"
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    # the corpus inside the directory to be replaced
    inside = out / "corpus.txt"
    inside.write_text(corpus.read_text())
    with pytest.raises(LMForgeError, match=r"the source .*corpus.txt is inside data.dir=.*set"):
        prepare(text_cfg(inside), out)
    assert sorted(p.name for p in out.iterdir()) == ["corpus.txt", "notes.txt"]

    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(LMForgeError, match=r"a_file is a file, not a directory: choose another"):
        prepare(text_cfg(corpus), tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "mine"

    # an empty directory, a set of ours, and one written before sets carried the marker
    (tmp_path / "empty").mkdir()
    prepare(text_cfg(corpus), tmp_path / "empty")
    assert (tmp_path / "empty" / MARKER).is_file()
    prepare(text_cfg(corpus, val_fraction=0.2), tmp_path / "empty")
    (tmp_path / "empty" / MARKER).unlink()
    meta = prepare(text_cfg(corpus, val_fraction=0.3), tmp_path / "empty")
    assert meta["fingerprint"]["settings"]["val_fraction"] == 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a_file",
        "corpus.txt",
        "empty",
        "set",
    ]  # no staging directory left


def test_export_replaces_only_its_own_directories(tmp_path):
    state = {"w": torch.zeros(2)}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    (foreign / "README.md").write_text("mine")
    with pytest.raises(LMForgeError) as info:
        write_hf_dir(foreign, {"a": 1}, state)
    assert str(info.value) == (
        f"{foreign} holds files lmforge did not write (README.md): choose another output"
        " directory (a new or empty one)"
    )
    assert (foreign / "README.md").read_text() == "mine"
    assert (foreign / "config.json").read_text() == "{}"

    target = tmp_path / "model.safetensors"
    target.write_text("mine")
    with pytest.raises(LMForgeError, match=r"model.safetensors is a file, not a directory"):
        write_hf_dir(target, {"a": 1}, state)
    assert target.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "model.safetensors"]

    ours = tmp_path / "export"
    write_hf_dir(ours, {"a": 1}, state)
    write_hf_dir(ours, {"a": 2}, state)
    (ours / MARKER).unlink()  # an export written before exports carried the marker
    write_hf_dir(ours, {"a": 3}, state)
    assert json.loads((ours / "config.json").read_text()) == {"a": 3}
    assert sorted(p.name for p in ours.iterdir()) == [MARKER, "config.json", "model.safetensors"]


def wait_for(pattern, parent, proc):
    """The first entry of ``parent`` matching ``pattern`` once ``proc`` has made it."""
    for _ in range(1200):
        found = list(parent.glob(pattern))
        if found or proc.poll() is not None:
            return found
        time.sleep(0.05)
    return []


def test_killed_and_interrupted_prepare_leave_no_staging_directory(tmp_path):
    """kill -9 leaves a staging directory: the next prepare removes it (not a live process's).
    Ctrl-C stops with one line and status 130, the previous set intact, nothing left behind."""
    small = tmp_path / "small.txt"
    small.write_text(SHAKESPEARE.read_text()[:5_000])
    out = tmp_path / "set"
    before = prepare(text_cfg(small), out)
    big = tmp_path / "big.txt"
    big.write_text(SHAKESPEARE.read_text() * 20)  # 22 MB: several seconds to tokenize
    cli = [
        sys.executable,
        "-m",
        "lmforge.cli.prepare",
        f"data.prepare.source.paths=[{big}]",
        f"data.dir={out}",
    ]

    proc = subprocess.Popen(cli, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    staged = wait_for(".set.tmp-*", tmp_path, proc)
    proc.kill()
    proc.wait()
    assert staged and staged[0].exists()  # what kill -9 leaves

    live = subprocess.Popen(["sleep", "60"])
    try:
        live_dir = tmp_path / f".set.tmp-{live.pid}"
        live_dir.mkdir()
        (live_dir / MARKER).write_text("")
        proc = subprocess.Popen(cli, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        own = tmp_path / f".set.tmp-{proc.pid}"
        wait_for(own.name, tmp_path, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130
        assert err.decode().strip() == (
            f"stopped by Ctrl-C: {out} is unchanged (the previous set is intact)"
        )
        assert not staged[0].exists() and not own.exists()
        assert live_dir.is_dir()
    finally:
        live.kill()
        live.wait()
    assert json.loads((out / "meta.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["small.txt", "big.txt", "set", live_dir.name]
    )
