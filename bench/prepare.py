"""Benchmark lmforge-prepare against a bare `tokenizers` encode_batch loop on the same corpus.

    python bench/prepare.py                       # the Gutenberg corpus from ../shared/data
    python bench/prepare.py --scale 4             # also a 4x corpus (distinct copies), for peak RSS

Each phase runs in its own process so its peak RSS is its own. Prints a table (MB/s, tokens/s,
peak RSS, ratio to the bare loop) and writes JSON next to the corpus' prepared output.
"""

from __future__ import annotations

import argparse
import json
import lzma
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "gutenberg_en" / "books.jsonl.xz"


def phase_train_tokenizer(corpus: str, out: str, vocab_size: int, sample_bytes: int) -> dict:
    from lmforge.data.tokenizer import TokenizerConfig, train_tokenizer

    def texts():
        seen = 0
        with lzma.open(corpus, "rt", encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                yield text
                seen += len(text)
                if seen >= sample_bytes:
                    return

    t = time.perf_counter()
    tok = train_tokenizer(texts(), TokenizerConfig(kind="bpe", vocab_size=vocab_size))
    tok.save(out)
    return {"seconds": time.perf_counter() - t}


def phase_bare(corpus: str, tokenizer: str, chunk_bytes: int, method: str = "encode_batch") -> dict:
    """The loop a user would write: read lines, parse JSON, encode in chunks, count tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    encode = getattr(tok, method)
    opener = lzma.open if corpus.endswith(".xz") else open
    t = time.perf_counter()
    n_tokens = n_bytes = 0
    batch, size = [], 0
    with opener(corpus, "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            batch.append(text)
            size += len(text)
            if size >= chunk_bytes:
                n_tokens += sum(len(e.ids) for e in encode(batch))
                n_bytes += sum(len(x.encode()) for x in batch)
                batch, size = [], 0
    if batch:
        n_tokens += sum(len(e.ids) for e in encode(batch))
        n_bytes += sum(len(x.encode()) for x in batch)
    return {"seconds": time.perf_counter() - t, "tokens": n_tokens, "bytes": n_bytes}


def phase_prepare(corpus: str, tokenizer: str, out: str) -> dict:
    from lmforge.data.prepare import PrepareConfig, prepare
    from lmforge.data.sources import SourceConfig
    from lmforge.data.tokenizer import TokenizerConfig

    cfg = PrepareConfig(
        source=SourceConfig(kind="jsonl", paths=[corpus], text_field="text"),
        tokenizer=TokenizerConfig(kind="file", path=tokenizer),
        split="documents",
        val_fraction=0.05,
        progress=False,
    )
    t = time.perf_counter()
    meta = prepare(cfg, out, force=True)
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    n_bytes = sum(s["bytes"] for s in meta["splits"].values())
    return {
        "seconds": time.perf_counter() - t,
        "tokens": tokens,
        "bytes": n_bytes,
        "documents": meta["documents"],
    }


def run_phase(name: str, *args) -> dict:
    """Run one phase in a child process; returns its result and peak RSS."""
    code = (
        f"import json, resource, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import prepare as b; "
        f"r = b.phase_{name}(*{list(args)!r}); r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
        "print(json.dumps(r))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def scaled_corpus(corpus: Path, scale: int, dest: Path) -> Path:
    """``scale`` distinct copies of every document (a prefix makes each copy unique)."""
    path = dest / f"corpus_x{scale}.jsonl"
    with lzma.open(corpus, "rt", encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
        lines = f.readlines()  # the 1x corpus, once, to write the copies
        for k in range(scale):
            for line in lines:
                rec = json.loads(line)
                rec["text"] = f"Copy {k}.\n" + rec["text"]
                out.write(json.dumps(rec) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--sample-bytes", type=int, default=50_000_000)
    ap.add_argument("--scale", type=int, default=0, help="also prepare an N-times larger corpus")
    ap.add_argument("--out", type=Path, default=ROOT / "logs" / "bench" / "prepare")
    args = ap.parse_args()
    if not args.corpus.is_file():
        sys.exit(
            f"error: corpus {args.corpus} not found: pass --corpus or place ../shared/data beside the checkout"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    tok = str(args.out / "tokenizer.json")
    corpus = str(args.corpus)

    results = {"corpus": corpus, "corpus_mb_on_disk": args.corpus.stat().st_size / 1e6}
    results["tokenizer_training"] = run_phase(
        "train_tokenizer", corpus, tok, args.vocab_size, args.sample_bytes
    )
    results["bare_encode_batch"] = run_phase("bare", corpus, tok, 4 << 20)
    results["bare_encode_batch_fast"] = run_phase("bare", corpus, tok, 4 << 20, "encode_batch_fast")
    results["lmforge_prepare"] = run_phase("prepare", corpus, tok, str(args.out / "x1"))
    if args.scale > 1:
        with tempfile.TemporaryDirectory(dir=args.out) as tmp:
            big = scaled_corpus(args.corpus, args.scale, Path(tmp))
            results[f"lmforge_prepare_x{args.scale}"] = run_phase(
                "prepare", str(big), tok, str(Path(tmp) / "big")
            )

    bare = results["bare_encode_batch"]
    print(f"\ncorpus {corpus} ({results['corpus_mb_on_disk']:.1f} MB on disk)")
    print(
        f"BPE {args.vocab_size} trained on {args.sample_bytes / 1e6:.0f} MB in {results['tokenizer_training']['seconds']:.1f} s\n"
    )
    print(
        f"{'phase':<24}{'seconds':>9}{'MB/s':>8}{'M tok/s':>9}{'tokens':>14}{'peak RSS MB':>13}{'vs bare':>9}"
    )
    for name in [k for k in results if k.startswith(("bare", "lmforge"))]:
        r = results[name]
        mbs = r["bytes"] / r["seconds"] / 1e6
        tps = r["tokens"] / r["seconds"]
        r["mb_per_s"], r["tokens_per_s"] = mbs, tps
        ratio = tps / (bare["tokens"] / bare["seconds"])
        r["throughput_vs_bare"] = ratio
        print(
            f"{name:<24}{r['seconds']:>9.1f}{mbs:>8.2f}{tps / 1e6:>9.3f}{r['tokens']:>14,}{r['peak_rss_mb']:>13.0f}{ratio:>9.2f}"
        )
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
