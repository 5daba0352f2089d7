"""What one evaluation of the multiple-choice callback costs, beside a training step.

    python bench/multiple_choice.py logs/causal_lm/<run>/checkpoints/last.ckpt
    python bench/multiple_choice.py <ckpt> --experiment gutenberg_bpe  # that geometry, random weights

Scores the set (default: the bundled data/shakespeare_mc, 200 items x 4 choices) with the
checkpoint's model and tokenizer, by the callback's code (``lmforge.downstream``), ``--repeats``
times; prints the median seconds per evaluation, the accuracies, and the median time of one
training step (forward, backward, AdamW) of ``data.batch_size`` x ``block_size`` tokens of the
same model, so the overhead reads as "one evaluation = N training steps". ``--experiment``:
build the model of that experiment's config (random weights, the checkpoint's tokenizer)
instead of the checkpoint's own.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--set", default=str(ROOT / "data/shakespeare_mc/shakespeare_mc.jsonl"))
    p.add_argument("--format", default="lmforge")
    p.add_argument("--delimiter", default="\n")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--experiment", default=None)
    p.add_argument("--train-batch", type=int, default=None, help="default: the data config's")
    args = p.parse_args()

    from lmforge.checkpoint import load_model
    from lmforge.data.tokenizer import document_separator
    from lmforge.downstream import evaluate_mc, mc_pairs, read_mc_set

    loaded = load_model(args.ckpt, causal=True)
    model, tok = loaded.model, loaded.tokenizer
    train_batch = args.train_batch or 12
    if args.experiment:
        from hydra import compose, initialize_config_dir

        import lmforge.cli  # noqa: F401  (resolvers)
        from lmforge.config import CONF_DIR, build
        from lmforge.models.registry import family_of

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={args.experiment}"])
        config = build(cfg.model, "model", vocab_size=tok.get_vocab_size())
        torch.manual_seed(0)
        model = family_of(config).build(config).eval()
        train_batch = args.train_batch or cfg.data.batch_size
    n_params = sum(p.numel() for p in model.parameters())
    block = model.config.block_size
    items = read_mc_set(args.set, args.format)
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    pairs = mc_pairs(encode, items, block, args.delimiter, document_separator(tok))
    tokens = sum(min(len(a) + len(b), block + 1) - 1 for a, b in pairs)
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        counts = evaluate_mc(model, items, pairs, block, batch_size=args.batch_size)
        seconds.append(time.perf_counter() - start)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, tok.get_vocab_size(), (train_batch, block + 1))
    steps = []
    for _ in range(6):
        start = time.perf_counter()
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - start)
    evaluation, step = statistics.median(seconds), statistics.median(steps[1:])
    print(
        f"model: {n_params / 1e6:.2f} M parameters, block {block}, vocabulary"
        f" {tok.get_vocab_size()}{' (' + args.experiment + ', random weights)' if args.experiment else ''}"
    )
    print(f"set: {len(items)} items, {len(pairs)} choices, {tokens:,} tokens scored")
    print(
        f"evaluation: {evaluation:.2f} s (median of {args.repeats}; batch {args.batch_size});"
        f" acc {counts.acc:.4f} acc_norm {counts.acc_norm:.4f} truncated {counts.truncated}"
    )
    print(
        f"training step ({train_batch} x {block} tokens): {step:.3f} s;"
        f" one evaluation = {evaluation / step:.1f} steps"
    )


if __name__ == "__main__":
    main()
