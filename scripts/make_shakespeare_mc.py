"""Write data/shakespeare_mc/shakespeare_mc.jsonl: a multiple-choice set from the held-out tail of
Tiny Shakespeare (the last 10% of data/tinyshakespeare/input.txt, the validation split of the
shakespeare_* data configs, so no model of ours trained on it).

Each item: three consecutive lines of a speech as the context; as choices, the true next line
and three lines drawn from elsewhere in the tail (seeded), in a shuffled order. Chance: 25%.
Scored with delimiter "\\n" (each choice is the line after the context).

    python scripts/make_shakespeare_mc.py [--items 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "data/shakespeare_mc/shakespeare_mc.jsonl")
    args = p.parse_args()
    text = (ROOT / "data/tinyshakespeare/input.txt").read_text(encoding="utf-8")
    tail = text[int(len(text) * 0.9) :]
    lines = tail.split("\n")[1:]  # the first may be cut in the middle

    def speech(line: str) -> bool:  # a line of verse or prose, not a speaker's name or a gap
        return bool(line.strip()) and not line.endswith(":")

    starts = [i for i in range(len(lines) - 3) if all(speech(x) for x in lines[i : i + 4])]
    pool = sorted({x for x in lines if speech(x)})
    rng = random.Random(args.seed)
    chosen = sorted(rng.sample(starts, args.items))
    out = []
    for i in chosen:
        answer = lines[i + 3]
        others = rng.sample([x for x in pool if x != answer], 3)
        choices = [answer, *others]
        rng.shuffle(choices)
        out.append(
            {
                "context": "\n".join(lines[i : i + 3]),
                "choices": choices,
                "label": choices.index(answer),
            }
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out))
    print(f"{len(out)} items from {len(starts)} possible contexts -> {args.out}")


if __name__ == "__main__":
    main()
