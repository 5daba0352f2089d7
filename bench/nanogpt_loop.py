"""nanoGPT's training loop, bare, over lmforge's GPT: the baseline `bench/vs_nanogpt.py` times.

    python bench/nanogpt_loop.py --steps 200     # alone; under vs_nanogpt.py it takes turns

The loop of nanoGPT's train.py as it runs on a CPU (no compile, fp32, no GradScaler): random
windows drawn from the memory-mapped training split with ``torch.randint`` and stacked, the next
batch fetched right after the forward pass, the learning rate set on every group by hand
(linear warmup, cosine to min_lr), ``F.cross_entropy`` on the flattened logits, backward,
clipping at 1.0, AdamW (weight decay on the >= 2-D tensors, none on the rest, torch's default
per-tensor implementation on a CPU; ``--fused``: the fused kernel, which nanoGPT asks for on
CUDA only), ``zero_grad(set_to_none=True)``. No logging, no progress bar.

The model is nanoGPT's for this recipe: lmforge's ``GPT`` with learned positions, no biases,
the exact GELU and the vocabulary unpadded (65 rows), 4 layers, 4 heads, width 128, context 64,
batch 12. nanoGPT leaves torch's thread count at its default, as this does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from lmforge.models.gpt import GPT, GPTConfig  # noqa: E402
from turns import Turn  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT / "data" / "prepared" / "shakespeare_char"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=50, help="steps between turns")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument(
        "--fused", action="store_true", help="torch's fused AdamW (nanoGPT: on CUDA only)"
    )
    args = ap.parse_args()
    spawned = float(os.environ.get("BENCH_SPAWNED", "nan"))
    turn = Turn()

    meta = json.loads((Path(args.data) / "meta.json").read_text())
    data = np.memmap(Path(args.data) / "train.bin", dtype=meta["dtype"], mode="r")
    torch.manual_seed(1337)
    config = GPTConfig(
        vocab_size=meta["vocab_size"],
        block_size=args.block_size,
        n_layer=4,
        n_head=4,
        n_embd=128,
        bias=False,
        pos_emb="learned",
        gelu_approximate="none",
        pad_vocab_multiple=1,
    )
    model = GPT(config)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
        **({"fused": True} if args.fused else {}),
    )

    def get_batch():
        ix = torch.randint(len(data) - args.block_size, (args.batch_size,))
        x = torch.stack(
            [torch.from_numpy(data[i : i + args.block_size].astype(np.int64)) for i in ix]
        )
        y = torch.stack(
            [torch.from_numpy(data[i + 1 : i + 1 + args.block_size].astype(np.int64)) for i in ix]
        )
        return x, y

    def get_lr(it: int) -> float:
        if it < args.warmup:
            return args.lr * (it + 1) / (args.warmup + 1)
        ratio = (it - args.warmup) / (args.steps - args.warmup)
        return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)

    step_s: list[float] = []
    X, Y = get_batch()
    first = time.time()
    turn.take({"event": "ready", "startup_s": first - spawned})
    last = time.perf_counter()
    for it in range(args.steps):
        lr = get_lr(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(X)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), Y.view(-1), ignore_index=-1)
        X, Y = get_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        step_s.append(now - last)
        if args.every and (it + 1) % args.every == 0 and it + 1 < args.steps:
            turn.take({"event": "steps", "step": it + 1, "loss": loss.item()})
            now = time.perf_counter()
        last = now
    out = os.environ.get("BENCH_RESULT")
    if out:
        Path(out).write_text(
            json.dumps(
                {"startup_s": first - spawned, "step_s": step_s, "threads": torch.get_num_threads()}
            )
        )
    print(f"step {args.steps}: train loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
