"""Can the data module keep up? Batches per second it serves against what a training step consumes.

    python bench/dataloader.py                                   # Tiny Shakespeare, gpt-mini shapes
    python bench/dataloader.py --data-dir data/prepared/gutenberg_bpe --batch-size 16 --seq-len 1024
    python bench/dataloader.py --masked --data-dir data/prepared/shakespeare_wordpiece --seq-len 128

Serves batches from a prepared token set through the same DataLoader settings training uses
(`RandomWindows`, or masked-LM batches with --masked) and prints batches/s and tokens/s, with the
time one batch takes. Compare with the step time from the throughput callback (perf/step_ms) or
bench/overhead.py: the loader must serve a batch in a small fraction of a step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmforge.data.config import DataConfig  # noqa: E402
from lmforge.data.datamodule import TokenDataModule  # noqa: E402
from lmforge.data.masking import MaskingConfig  # noqa: E402
from shakespeare import prepare_shakespeare_char  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="a prepared token set (default: Tiny Shakespeare, char)",
    )
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument(
        "--masked", action="store_true", help="masked-LM batches (a WordPiece token set)"
    )
    args = ap.parse_args()
    data_dir = args.data_dir
    if data_dir is None:
        data_dir = ROOT / "logs" / "bench" / "dataloader" / "shakespeare_char"
        prepare_shakespeare_char(data_dir)
    cfg = DataConfig(
        dir=str(data_dir),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        num_workers=args.num_workers,
    )
    dm = TokenDataModule(cfg, seed=0, masking=MaskingConfig() if args.masked else None)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(20):  # warm up (workers start, pages come into the cache)
        next(it)
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(it)
    seconds = time.perf_counter() - start
    ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
    assert ids.shape == (args.batch_size, args.seq_len) and ids.dtype == torch.long
    per_s = args.batches / seconds
    print(
        f"{data_dir}: {'masked-LM' if args.masked else 'causal'} batches of {args.batch_size} x {args.seq_len}, "
        f"{args.num_workers} workers, torch {torch.__version__}"
    )
    print(
        f"{per_s:,.0f} batches/s, {per_s * ids.numel() / 1e6:,.2f} M tokens/s, {1e3 / per_s:.3f} ms a batch"
    )


if __name__ == "__main__":
    main()
