"""Held-out exact-match accuracy of the arithmetic toy's checkpoints (docs/alignment.md, ## GRPO).

    python bench/arithmetic_accuracy.py logs/causal_lm/sft_arithmetic/checkpoints/*.ckpt

Greedy answers to the 500 held-out problems of data/arithmetic/val.json, prompted as
experiment=grpo_arithmetic prompts them ("<|endoftext|>12+34="): the number GRPO's val/reward
reports at step 0 for a checkpoint, to pick how long the supervised start trains.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lmforge.checkpoint import checkpoint_step, load_model

VAL = Path(__file__).resolve().parents[1] / "data" / "arithmetic" / "val.json"


@torch.no_grad()
def accuracy(ckpt: str | Path, max_new_tokens: int = 6) -> float:
    loaded = load_model(ckpt, causal=True)
    model, tok = loaded.model, loaded.tokenizer
    eot = tok.token_to_id("<|endoftext|>")
    records = json.loads(VAL.read_text())
    by_length: dict[int, list[tuple[list[int], str]]] = {}
    for r in records:
        ids = tok.encode("<|endoftext|>" + r["instruction"]).ids
        by_length.setdefault(len(ids), []).append((ids, r["answer"]))
    right = 0
    for length, items in by_length.items():
        idx = torch.tensor([ids for ids, _ in items])
        out = model.generate(idx, max_new_tokens, temperature=0)[:, length:].tolist()
        for seq, (_, answer) in zip(out, items, strict=True):
            end = seq.index(eot) if eot in seq else len(seq)
            right += tok.decode(seq[:end]).strip() == answer
    return right / len(records)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        step = checkpoint_step(Path(path), verify=False)
        print(f"{path}\tstep {step}\theld-out exact match {accuracy(path):.3f}", flush=True)
