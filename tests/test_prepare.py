"""Corpus preparation: sources, cleaning, de-duplication, document splits, shards, bad inputs."""

import gzip
import json
import lzma
import unicodedata

import numpy as np
import pytest

from lmforge.data.datasets import RandomWindows, document_starts, open_split
from lmforge.data.prepare import PrepareConfig, prepare, read_meta
from lmforge.data.sources import SourceConfig
from lmforge.data.tokenizer import EOT, TokenizerConfig, gpt2_tokenizer, load_tokenizer
from lmforge.errors import LMForgeError
from lmforge.models.registry import family

from .conftest import ROOT, SHAKESPEARE, SHARED_DATA


def corpus_docs(n: int = 120) -> list[str]:
    """Distinct documents cut from Tiny Shakespeare."""
    lines = SHAKESPEARE.read_text().split("\n\n")
    return [f"Doc {i}. " + lines[i] for i in range(n)]


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def jsonl_cfg(path, kind="bpe", **kw) -> PrepareConfig:
    source = SourceConfig(**({"kind": "jsonl", "paths": [str(path)]} | kw.pop("source", {})))
    return PrepareConfig(
        source=source,
        tokenizer=TokenizerConfig(kind=kind, vocab_size=kw.pop("vocab_size", 400)),
        progress=False,
        **kw,
    )


def split_documents(out, split) -> list[list[int]]:
    """The token ids of every document of a split, cut at the index offsets."""
    meta = read_meta(out)
    ids = np.concatenate([np.asarray(s) for s in open_split(out, split)])
    starts = list(document_starts(out, split)) + [ids.size]
    docs = [ids[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]
    assert all(d[-1] == meta["eot_id"] for d in docs)
    return [d[:-1] for d in docs]


def test_validation_and_training_share_no_document(tmp_path):
    docs = corpus_docs()
    records = [{"text": d} for d in docs] + [{"text": docs[3]}, {"text": docs[7]}]  # two duplicates
    meta = prepare(
        jsonl_cfg(write_jsonl(tmp_path / "c.jsonl", records), val_fraction=0.2), tmp_path / "out"
    )
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    train = {tok.decode(d) for d in split_documents(tmp_path / "out", "train")}
    val = {tok.decode(d) for d in split_documents(tmp_path / "out", "val")}
    assert not train & val
    assert train | val == set(docs)
    assert 0.1 * len(docs) < len(val) < 0.3 * len(docs)
    assert meta["documents"]["duplicates_removed"] == 2
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(docs)


def test_split_is_seeded(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in corpus_docs(60)])
    a = prepare(jsonl_cfg(path, seed=1), tmp_path / "a")["splits"]["val"]["documents"]
    b = prepare(jsonl_cfg(path, seed=1), tmp_path / "b")["splits"]["val"]["documents"]
    assert a == b
    va = (tmp_path / "a" / "val.bin").read_bytes()
    assert va == (tmp_path / "b" / "val.bin").read_bytes()
    prepare(jsonl_cfg(path, seed=2), tmp_path / "c")
    assert (tmp_path / "c" / "val.bin").read_bytes() != va


def test_decoded_shards_reproduce_cleaned_text(tmp_path):
    raw = [
        "Cafe\u0301 au lait\x07 and\x00 more",
        "Tab\tand\nnewline\r\nkept\x1b[0m",
        "x",
        *corpus_docs(30),
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in raw])
    prepare(jsonl_cfg(path, min_chars=2, val_fraction=0.2), tmp_path / "out")
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    decoded = {
        tok.decode(d)
        for split in ("train", "val")
        for d in split_documents(tmp_path / "out", split)
    }
    expected = {
        unicodedata.normalize("NFC", d.replace("\x07", "").replace("\x00", "").replace("\x1b", ""))
        for d in raw
        if d != "x"
    }
    assert decoded == expected
    assert "Café au lait and more" in decoded
    assert read_meta(tmp_path / "out")["documents"]["too_short"] == 1


def test_token_counts_match_multi_shard_sizes(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in corpus_docs(80)])
    meta = prepare(jsonl_cfg(path, shard_tokens=1000), tmp_path / "out")
    train = meta["splits"]["train"]
    assert len(train["shards"]) > 3 and train["shards"][0]["file"] == "train_00000.bin"
    for split in meta["splits"].values():
        sizes = [(tmp_path / "out" / s["file"]).stat().st_size // 2 for s in split["shards"]]
        assert sizes == [s["tokens"] for s in split["shards"]]
        assert sum(sizes) == split["tokens"]
        assert all(s == 1000 for s in sizes[:-1])


def test_windows_aligned_to_document_starts(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in corpus_docs(80)])
    meta = prepare(jsonl_cfg(path, shard_tokens=3000), tmp_path / "out")
    shards = open_split(tmp_path / "out", "train")
    starts = document_starts(tmp_path / "out", "train")
    ds = RandomWindows(shards, 16, 64, seed=0, doc_starts=starts)
    x, _ = ds.batch(0)
    all_ids = np.concatenate([np.asarray(s) for s in shards])
    firsts = {tuple(all_ids[s : s + 16]) for s in starts}
    assert all(tuple(row) in firsts for row in x.tolist())
    # unaligned windows start mid-document
    x2, _ = RandomWindows(shards, 16, 64, seed=0).batch(0)
    assert not all(tuple(row) in firsts for row in x2.tolist())
    assert meta["eot_id"] == load_tokenizer(tmp_path / "out" / "tokenizer.json").token_to_id(EOT)


def test_compressed_jsonl_and_filter(tmp_path):
    docs = corpus_docs(40)
    records = [{"text": d, "lang": "en" if i % 2 else "fr"} for i, d in enumerate(docs)]
    write_jsonl(tmp_path / "a.jsonl.gz", records[:20], gzip.open)
    write_jsonl(tmp_path / "b.jsonl.xz", records[20:], lzma.open)
    import zstandard

    with open(tmp_path / "c.jsonl.zst", "wb") as f:
        f.write(
            zstandard.ZstdCompressor().compress(
                json.dumps({"text": "zstd doc " * 20, "lang": "en"}).encode()
            )
        )
    cfg = jsonl_cfg(f"{tmp_path}/*.jsonl.*", source={"filter": {"lang": "en"}}, val_fraction=0.3)
    meta = prepare(cfg, tmp_path / "out")
    assert meta["documents"]["read"] == 21 and meta["documents"]["filtered_out"] == 20
    assert len(meta["sources"]) == 3 and all(len(s["sha256"]) == 64 for s in meta["sources"])


def test_parquet_and_hf_dataset_sources(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    docs = corpus_docs(30)
    pq.write_table(pa.table({"content": docs, "n": list(range(30))}), tmp_path / "c.parquet")
    m1 = prepare(
        jsonl_cfg(tmp_path / "c.parquet", source={"kind": "parquet", "text_field": "content"}),
        tmp_path / "p",
    )
    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(tmp_path / "hf"))
    m2 = prepare(
        jsonl_cfg(tmp_path / "hf", source={"kind": "hf_dataset", "text_field": "content"}),
        tmp_path / "h",
    )
    for m in (m1, m2):
        assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 30
    assert m1["splits"]["train"]["tokens"] == m2["splits"]["train"]["tokens"]


def test_rerun_is_a_no_op_and_changes_reprepare(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in corpus_docs(30)])
    cfg = jsonl_cfg(path)
    prepare(cfg, tmp_path / "out")
    stamp = (tmp_path / "out" / "meta.json").stat().st_mtime_ns
    prepare(cfg, tmp_path / "out")
    assert (tmp_path / "out" / "meta.json").stat().st_mtime_ns == stamp
    write_jsonl(path, [{"text": d} for d in corpus_docs(31)])
    assert prepare(cfg, tmp_path / "out")["documents"]["read"] == 31


def test_interrupted_prepare_keeps_the_previous_set(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in corpus_docs(30)])
    before = prepare(jsonl_cfg(path), tmp_path / "out")
    write_jsonl(path, [{"text": d} for d in corpus_docs(30)] + ["{not json"])
    with pytest.raises(LMForgeError, match=r"c.jsonl:31 is not a JSON object"):
        prepare(jsonl_cfg(path), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out"]  # no temporary left


def test_gpt2_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    import shutil

    folder = ROOT / "data" / "gpt2_bpe"
    ours = gpt2_tokenizer(folder)
    # The files under the names of the GPT-2 checkpoint's tokenizer (vocab.json, merges.txt).
    shutil.copy(folder / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(folder / "vocab.bpe", tmp_path / "merges.txt")
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    samples = [
        "Hello world! It's a test of GPT-2's tokenizer.\n\n  Indented   spaces.",
        "def f(x):\n    return {'a': x ** 2}  # code\n",
        "Emoji: 😀👍🏽🇫🇷 and ünïcödé",
        "中文分词测试：床前明月光，疑是地上霜。",
        "<|endoftext|>After the end",
    ]
    for s in samples:
        assert ours.encode(s).ids == ref(s)["input_ids"], s
        assert ours.decode(ours.encode(s).ids, skip_special_tokens=False) == s
    assert ours.get_vocab_size() == 50257 and ours.token_to_id(EOT) == 50256


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_trained_tokenizers_handle_text_without_spaces(tmp_path, kind):
    text = "床前明月光，疑是地上霜。举头望明月，低头思故乡。" * 5
    docs = [text[i:] + f" Document {i} in English." for i in range(40)]
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    meta = prepare(jsonl_cfg(path, kind=kind, vocab_size=400), tmp_path / "out")
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    enc = tok.encode("明月光，故乡。Document 地上霜")
    unk = tok.token_to_id("[UNK]") if kind == "wordpiece" else tok.token_to_id("<unk>")
    assert unk is None or unk not in enc.ids
    if kind != "wordpiece":  # byte-level and byte-fallback vocabularies decode exactly
        assert tok.decode(enc.ids) == "明月光，故乡。Document 地上霜"
        assert tok.decode(tok.encode("Zebra 鯨").ids) == "Zebra 鯨"  # unseen characters too
    if kind == "wordpiece":
        assert all(
            t in meta["special_tokens"] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
        )
        assert meta["eot_id"] == tok.token_to_id("[SEP]")


def test_large_vocabulary_switches_to_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000, EOT: 70_001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOT])
    tok.save(str(tmp_path / "tok.json"))
    docs = [" ".join(f"w{(i * 997 + j * 7919) % 70_000}" for j in range(50)) for i in range(20)]
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    cfg = PrepareConfig(
        source=SourceConfig(kind="jsonl", paths=[str(path)]),
        tokenizer=TokenizerConfig(kind="file", path=str(tmp_path / "tok.json")),
        progress=False,
        val_fraction=0.3,
    )
    meta = prepare(cfg, tmp_path / "out")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002
    ids = np.concatenate([np.asarray(s) for s in open_split(tmp_path / "out", "train")])
    assert ids.dtype == np.uint32 and ids.max() >= 65_536


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", r"no files match .*missing\*\.jsonl.*check data.prepare.source.paths"),
        ("empty", r"no text in .*after cleaning"),
        ("bad_json", r"c.jsonl:3 is not a JSON object: .*on_bad_json=skip"),
        (
            "no_field",
            r"c.jsonl:1 has no field 'text' \(fields: body\): set data.prepare.source.text_field",
        ),
        ("binary", r"c.jsonl:1: NUL bytes, the file looks binary"),
        ("bad_utf8", r"c.jsonl:2: invalid UTF-8 at byte 3: .*on_bad_utf8=skip or =replace"),
    ],
)
def test_bad_inputs_fail_with_one_line_errors(tmp_path, setup, message):
    path = tmp_path / "c.jsonl"
    good = [json.dumps({"text": d}) for d in corpus_docs(10)]
    if setup == "missing":
        path = tmp_path / "missing*.jsonl"
    elif setup == "empty":
        write_jsonl(path, [{"text": "   "}, {"text": ""}])
    elif setup == "bad_json":
        write_jsonl(path, good[:2] + ["{oops"] + good[2:])
    elif setup == "no_field":
        write_jsonl(path, [{"body": "x"}])
    elif setup == "binary":
        path.write_bytes(b"\x00\x01\x02binary\n")
    elif setup == "bad_utf8":
        path.write_bytes(
            (good[0] + "\n").encode() + b'{"t\xff\xfe": 1}\n' + (good[1] + "\n").encode()
        )
    with pytest.raises(LMForgeError, match=message) as info:
        prepare(jsonl_cfg(path), tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_lines_can_be_skipped_and_counted(tmp_path):
    good = [json.dumps({"text": d}) for d in corpus_docs(20)]
    path = tmp_path / "c.jsonl"
    path.write_bytes(
        ("\n".join(good[:5] + ["not json", "[1, 2]"] + good[5:]) + "\n").encode()
        + b'{"text": "caf\xe9 latin-1"}\n'
    )
    meta = prepare(
        jsonl_cfg(path, source={"on_bad_json": "skip", "on_bad_utf8": "skip"}), tmp_path / "a"
    )
    assert meta["documents"]["bad_json_skipped"] == 2 and meta["documents"]["bad_utf8"] == 1
    assert meta["documents"]["read"] == 20
    meta = prepare(
        jsonl_cfg(path, source={"on_bad_json": "skip", "on_bad_utf8": "replace"}), tmp_path / "b"
    )
    assert meta["documents"]["read"] == 21


@pytest.mark.skipif(
    not (SHARED_DATA / "chinese_poetry").is_dir(),
    reason="../shared/data is not beside the checkout",
)
@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_chinese_corpus_prepares_and_trains(tmp_path, kind, train_cfg):
    from lmforge.cli.train import train

    with lzma.open(SHARED_DATA / "chinese_poetry" / "tang300_traditional.txt.xz", "rt") as f:
        text = f.read()[:60_000]
    src = tmp_path / "tang.txt"
    src.write_text(text)
    cfg = train_cfg(
        f"data.prepare.source.paths=[{src}]",
        f"data.prepare.tokenizer.kind={kind}",
        "+data.prepare.tokenizer.vocab_size=1000",
        f"data.dir={tmp_path}/zh",
        "trainer.max_steps=10",
        "trainer.val_check_interval=5",
        "logger=csv",
    )
    metrics = train(cfg)
    meta = read_meta(tmp_path / "zh")
    tok = load_tokenizer(tmp_path / "zh" / "tokenizer.json")
    val = np.fromfile(tmp_path / "zh" / "val.bin", dtype=meta["dtype"]).tolist()
    assert tok.decode(val) == text[int(len(text) * 0.9) :]
    assert metrics["val/loss"] > 0


def test_one_document_per_file_without_validation_fails_before_tokenizing(tmp_path, monkeypatch):
    """Classical Chinese as the shared data holds it: a few files, each one document; a
    document split at 1% holds none of them out. The refusal comes before the tokenizer."""
    import lmforge.data.prepare as prep

    def no_training(*args, **kwargs):
        raise AssertionError("a tokenizer was trained before the split was checked")

    monkeypatch.setattr(prep, "train_tokenizer", no_training)
    (tmp_path / "zh").mkdir()
    for name, text in (
        ("shijing.txt", "關關雎鳩，在河之洲。"),
        ("lunyu.txt", "學而時習之，不亦說乎？"),
    ):
        (tmp_path / "zh" / name).write_text(text)
    cfg = PrepareConfig(
        source=SourceConfig(kind="text_files", paths=[str(tmp_path / "zh")]),
        tokenizer=TokenizerConfig(kind="bpe", vocab_size=400),
        val_fraction=0.01,
        progress=False,
    )
    message = (
        r"the validation split would be empty: .* none of the 2 kept .*"
        r"data.prepare.split=tail .*data.prepare.source.documents=paragraph"
    )
    with pytest.raises(LMForgeError, match=message) as info:
        prepare(cfg, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    cfg.split = "tail"  # the fix the message names
    meta = prepare(cfg, tmp_path / "out")
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 2


def test_a_prepared_directory_trains_without_its_source(tmp_path, tiny_text):
    """``lmforge-train data=corpus data.dir=<a set lmforge-prepare wrote>``: no source paths,
    the set is used as it is (its char tokenizer, though data=corpus names a BPE)."""
    from lmforge.cli.train import train

    from .conftest import compose_train

    source = SourceConfig(kind="text_files", paths=[str(tiny_text)])
    cfg = PrepareConfig(source=source, split="tail", progress=False)
    prepare(cfg, tmp_path / "set")
    written = (tmp_path / "set" / "meta.json").read_bytes()
    run = compose_train(
        [
            "model=gpt-nano",
            "data=corpus",
            f"data.dir={tmp_path}/set",
            "trainer.max_steps=1",
            "data.max_val_windows=2",
            "callbacks.text_samples=null",
            "trainer.enable_model_summary=false",
            "logger=csv",
        ],
        tmp_path,
    )
    assert train(run)["val/loss"] > 0
    assert (tmp_path / "set" / "meta.json").read_bytes() == written  # not rebuilt
    with pytest.raises(LMForgeError, match=r"holds no prepared set \(meta.json\) and data.prepa"):
        prepare(PrepareConfig(progress=False), tmp_path / "nothing")


def transformers_style_tokenizer_file(path, docs):
    """A WordPiece saved as sentence-transformers and BERT files are: padding and truncation to
    128 and a [CLS] $A [SEP] post-processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        docs, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=128)
    tok.enable_truncation(128)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.save(str(path))
    assert len(Tokenizer.from_file(str(path)).encode("a b").ids) == 128
    return path


def test_tokenizer_file_is_used_without_padding_truncation_or_template(tmp_path):
    from tokenizers import Tokenizer

    docs = [" ".join(corpus_docs(200)[i : i + 8]) for i in range(0, 160, 8)]  # long documents
    tok_file = transformers_style_tokenizer_file(tmp_path / "tokenizer.json", docs)
    words = Tokenizer.from_file(str(tok_file))
    words.no_padding(), words.no_truncation()
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    cfg = PrepareConfig(
        source=SourceConfig(kind="jsonl", paths=[str(path)]),
        tokenizer=TokenizerConfig(kind="file", path=str(tok_file)),
        progress=False,
        val_fraction=0.3,
    )
    prepare(cfg, tmp_path / "out")
    want = {tuple(words.encode(d, add_special_tokens=False).ids) for d in docs}
    got = [tuple(d) for split in ("train", "val") for d in split_documents(tmp_path / "out", split)]
    assert set(got) == want and len(got) == len(docs)
    assert max(len(d) for d in got) > 128

    from lmforge.checkpoint import hf_tokenizer
    from lmforge.data.classification import ClassificationDataConfig, encode

    cfg = ClassificationDataConfig(train="-", val="-", max_len=64)
    examples = [("a short text", "x"), (docs[0], "y")]
    for tok in (load_tokenizer(tok_file), hf_tokenizer(tmp_path)):
        encoded, counts = encode(examples, ["x", "y"], tok, family("bert").frame, cfg, "train")
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        short = words.encode("a short text", add_special_tokens=False).ids
        assert encoded.ids[0] == [cls, *short, sep]
        assert encoded.ids[1][0] == cls and encoded.ids[1][-1] == sep
        assert encoded.ids[1][1:-1] == words.encode(docs[0], add_special_tokens=False).ids[:62]
        assert counts["truncated"] == 1


LONG_DOCUMENT = (
    "It's the  end\tof days;\n\nthe 2nd   of   May, 1605 —  ‘quoth’ he:  Zebra 鯨 明月光,"
    " don't     stop!\n  Indented line.\r\nWindows line \t\t tabs  and    runs   of spaces. "
)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram", "char"])
def test_long_documents_are_tokenized_in_pieces_to_the_same_ids(tmp_path, kind):
    from lmforge.data.prepare import pieces
    from lmforge.data.tokenizer import train_tokenizer

    long = "".join(f"{i} {LONG_DOCUMENT}" for i in range(40))  # about 5,600 characters
    docs = [*corpus_docs(40), long, "Short one. " + long[::-1]]
    tok_cfg = TokenizerConfig(kind=kind, vocab_size=400)
    tok = train_tokenizer(docs, tok_cfg)
    parts = list(pieces(long, 300))
    assert len(parts) > 10 and all(len(p) <= 310 for p, last in parts if not last)
    assert "".join(p for p, _ in parts) == long and [last for _, last in parts][-1]
    ids = [i for p, _ in parts for i in tok.encode(p, add_special_tokens=False).ids]
    assert ids == tok.encode(long, add_special_tokens=False).ids

    if kind in ("bpe", "char"):  # WordPiece and Unigram training vary run to run in tokenizers
        again = train_tokenizer((p for d in docs for p, _ in pieces(d, 300)), tok_cfg)
        assert again.to_str() == tok.to_str()

    # the whole preparation with this tokenizer, in pieces of 300 characters and at once
    tok.save(str(tmp_path / "tok.json"))
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    runs = []
    for name, chunk in (("a", 300), ("b", 4 << 20)):
        cfg = PrepareConfig(
            source=SourceConfig(kind="jsonl", paths=[str(path)]),
            tokenizer=TokenizerConfig(kind="file", path=str(tmp_path / "tok.json")),
            chunk_bytes=chunk,
            progress=False,
        )
        runs.append(prepare(cfg, tmp_path / name))
    assert runs[0]["splits"] == runs[1]["splits"]
    for name in ("train.bin", "val.bin", "train.idx", "val.idx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    got = split_documents(tmp_path / "a", "train") + split_documents(tmp_path / "a", "val")
    assert tok.encode(long, add_special_tokens=False).ids in got
