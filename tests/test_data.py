import json

import numpy as np
import pytest
import torch

from lmforge.data.datasets import RandomWindows, SequentialWindows, open_split
from lmforge.data.prepare import PrepareConfig, prepare, read_meta
from lmforge.data.sources import SourceConfig
from lmforge.data.tokenizer import TokenizerConfig, load_tokenizer
from lmforge.errors import LMForgeError


def text_cfg(path, kind="char", **kw) -> PrepareConfig:
    """A single text file split nanoGPT-style: the last 10% of the text is validation."""
    return PrepareConfig(
        source=SourceConfig(kind="text_files", paths=[str(path)]),
        tokenizer=TokenizerConfig(kind=kind, vocab_size=kw.pop("vocab_size", 8192)),
        split="tail",
        append_eot=False,
        progress=False,
        **kw,
    )


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_shards_round_trip_to_source(tmp_path, tiny_text, kind):
    meta = prepare(text_cfg(tiny_text, kind, vocab_size=300), tmp_path)
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    text = tiny_text.read_text()
    cut = int(len(text) * 0.9)
    decoded = {
        split: tok.decode(np.fromfile(tmp_path / f"{split}.bin", dtype=meta["dtype"]).tolist())
        for split in ("train", "val")
    }
    assert decoded["train"] == text[:cut]
    assert decoded["val"] == text[cut:]
    assert meta["vocab_size"] == tok.get_vocab_size()
    if kind == "bpe":
        assert meta["vocab_size"] == 300


def test_meta_counts_equal_shard_sizes(tmp_path, tiny_text):
    meta = prepare(text_cfg(tiny_text), tmp_path)
    for split in meta["splits"].values():
        for shard in split["shards"]:
            n = (tmp_path / shard["file"]).stat().st_size // np.dtype(meta["dtype"]).itemsize
            assert n == shard["tokens"]
        assert split["tokens"] == sum(s["tokens"] for s in split["shards"])
    assert meta["dtype"] == "uint16"
    assert meta["splits"]["train"]["tokens"] != 0
    assert read_meta(tmp_path) == meta


def test_char_ids_follow_sorted_alphabet(tmp_path, tiny_text):
    prepare(text_cfg(tiny_text), tmp_path)
    vocab = load_tokenizer(tmp_path / "tokenizer.json").get_vocab()
    chars = sorted(set(tiny_text.read_text()))
    assert [vocab[c] for c in chars] == list(range(len(chars)))
    assert vocab["<|endoftext|>"] == len(chars)


def test_prepare_is_a_no_op_when_up_to_date_and_redoes_on_change(tmp_path, tiny_text):
    cfg = text_cfg(tiny_text)
    prepare(cfg, tmp_path)
    mtime = (tmp_path / "train.bin").stat().st_mtime_ns
    prepare(cfg, tmp_path)
    assert (tmp_path / "train.bin").stat().st_mtime_ns == mtime
    meta = prepare(text_cfg(tiny_text, val_fraction=0.2), tmp_path)
    assert meta["fingerprint"]["settings"]["val_fraction"] == 0.2
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.parent.glob(".*tmp-*"))


def test_bad_sources_fail_with_clear_errors(tmp_path):
    with pytest.raises(LMForgeError, match="no files match"):
        prepare(text_cfg(tmp_path / "missing.txt"), tmp_path / "out")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(LMForgeError, match="empty"):
        prepare(text_cfg(empty), tmp_path / "out")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"abc\xff\xfe\x00")
    with pytest.raises(LMForgeError, match="binary"):
        prepare(text_cfg(binary), tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_truncated_shard_is_refused(tmp_path, tiny_text):
    prepare(text_cfg(tiny_text), tmp_path)
    with open(tmp_path / "val.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(LMForgeError, match="truncated"):
        open_split(tmp_path, "val")


def test_missing_shard_and_mismatched_meta_are_refused(tmp_path, tiny_text):
    prepare(text_cfg(tiny_text), tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["splits"]["train"]["shards"][0]["tokens"] += 7  # meta.json no longer matches the shard
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(LMForgeError, match="meta.json says .* stale, re-run lmforge-prepare"):
        open_split(tmp_path, "train")
    (tmp_path / "val.bin").unlink()
    with pytest.raises(LMForgeError, match="val.bin is missing: re-run lmforge-prepare"):
        open_split(tmp_path, "val")
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(LMForgeError, match="not valid JSON: re-run lmforge-prepare"):
        open_split(tmp_path, "train")


def test_random_windows_are_a_function_of_seed_rank_step(tmp_path, tiny_text):
    prepare(text_cfg(tiny_text), tmp_path)
    shards = open_split(tmp_path, "train")
    a = RandomWindows(shards, seq_len=16, batch_size=4, seed=1)
    x5, y5 = a.batch(5)
    assert torch.equal(x5[:, 1:], y5[:, :-1])  # targets are inputs shifted by one
    it = iter(RandomWindows(shards, 16, 4, seed=1, start_step=5))
    assert torch.equal(next(it)[0], x5)
    assert not torch.equal(a.batch(6)[0], x5)
    assert not torch.equal(RandomWindows(shards, 16, 4, seed=2).batch(5)[0], x5)
    # Ranks hold slices of one global batch: 2 ranks of 4 rows = 1 process of 8 rows.
    whole = RandomWindows(shards, 16, 8, seed=1).batch(5)[0]
    ranks = [RandomWindows(shards, 16, 4, seed=1, rank=r, world_size=2).batch(5)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(ranks), whole)
    assert not torch.equal(ranks[0], ranks[1])
    with pytest.raises(ValueError, match="rank 2"):
        RandomWindows(shards, 16, 4, seed=1, rank=2, world_size=2)


def test_random_windows_cover_every_shard(tmp_path):
    shards = [np.full(50, 1, dtype=np.uint16), np.full(30, 2, dtype=np.uint16)]
    ds = RandomWindows(shards, seq_len=9, batch_size=400, seed=0)
    x, _ = ds.batch(0)
    rows = set(x[:, 0].tolist())
    assert rows == {1, 2}  # windows stay inside one shard, both shards drawn
    assert all(len(set(r.tolist())) == 1 for r in x)


def test_validation_windows_sweep_in_order(tmp_path, tiny_text):
    meta = prepare(text_cfg(tiny_text), tmp_path)
    ds = SequentialWindows(open_split(tmp_path, "val"), seq_len=32)
    assert len(ds) == (meta["splits"]["val"]["tokens"] - 1) // 32
    x0, y0 = ds[0]
    x1, _ = ds[1]
    assert torch.equal(x1[0], y0[-1])  # consecutive windows share the seam token
    raw = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert x0.tolist() == raw[:32].tolist()


def test_meta_json_marks_completion(tmp_path, tiny_text):
    prepare(text_cfg(tiny_text), tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    import hashlib

    assert meta["sources"][0]["sha256"] == hashlib.sha256(tiny_text.read_bytes()).hexdigest()
    (tmp_path / "meta.json").unlink()
    with pytest.raises(LMForgeError, match="prepare the data first"):
        open_split(tmp_path, "train")
