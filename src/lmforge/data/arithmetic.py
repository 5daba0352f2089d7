"""The additions of the verifiable-reward toy (``experiment=sft_arithmetic``, ``grpo_arithmetic``).

Every sum a+b of operands 0-99 (10,000 problems), split once by a seeded shuffle into held-out
problems and training problems, written as

    sft.jsonl    {"text": "12+34=46"} per training problem: the supervised (causal LM) data
    train.json   [{"instruction": "12+34=", "answer": "46"}, ...]: GRPO's training prompts
    val.json     the held-out problems, same form: val/reward is their exact-match accuracy

Run ``python -m lmforge.data.arithmetic [out_dir]`` (default ``data/arithmetic``) to write them;
the files are deterministic, so the bundled ones are what this writes.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from lmforge.files import atomic_write_bytes

HELD_OUT = 500
SEED = 0


def problems(seed: int = SEED, held_out: int = HELD_OUT) -> tuple[list[dict], list[dict]]:
    """(training, held-out) records of every a+b with 0 <= a, b <= 99."""
    records = [
        {"instruction": f"{a}+{b}=", "answer": str(a + b)} for a in range(100) for b in range(100)
    ]
    random.Random(seed).shuffle(records)
    return records[held_out:], records[:held_out]


def write(out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, val = problems()

    def records(rs: list[dict]) -> bytes:  # one record a line: readable, diffable
        return ("[\n" + ",\n".join(json.dumps(r) for r in rs) + "\n]\n").encode()

    atomic_write_bytes(out / "train.json", records(train))
    atomic_write_bytes(out / "val.json", records(val))
    text = "".join(json.dumps({"text": r["instruction"] + r["answer"]}) + "\n" for r in train)
    atomic_write_bytes(out / "sft.jsonl", text.encode())


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else "data/arithmetic")
