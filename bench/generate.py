"""KV-cache generation against re-encoding the whole context for every new token.

    python bench/generate.py                      # gpt2-small geometry, 256 new tokens, CPU
    python bench/generate.py --model gpt2-medium --new-tokens 128 --device cuda

Random weights (the cost does not depend on them), greedy decoding, batch 1. Prints tokens/s of
both, their ratio, and whether the two produced the same tokens.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from lmforge.models.gpt import GPT, GPTConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2-small", help="a conf/model/*.yaml GPT")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    fields = yaml.safe_load((CONF / f"{args.model}.yaml").read_text())
    fields = {k: v for k, v in fields.items() if not k.startswith("_")}
    fields["vocab_size"] = fields.get("vocab_size") or 50257
    torch.manual_seed(0)
    model = GPT(GPTConfig(**fields)).to(args.device).eval()
    prompt = torch.randint(0, fields["vocab_size"], (1, args.prompt_tokens), device=args.device)
    print(
        f"{args.model}: {model.num_params() / 1e6:.0f} M parameters, {args.prompt_tokens} prompt"
        f" tokens + {args.new_tokens} new, greedy, batch 1, {args.device},"
        f" {torch.get_num_threads()} threads"
    )
    model.generate(prompt, 4, temperature=0)  # warm-up
    results = {}
    for use_cache in (True, False):
        start = time.perf_counter()
        out = model.generate(prompt, args.new_tokens, temperature=0, use_cache=use_cache)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        results[use_cache] = (out, seconds)
        name = "KV cache" if use_cache else "re-encode every step"
        print(f"  {name:<22}{seconds:8.2f} s  {args.new_tokens / seconds:8.1f} tokens/s")
    ratio = results[False][1] / results[True][1]
    same = torch.equal(results[True][0], results[False][0])
    print(f"  speed-up of the cache: {ratio:.1f}x; same tokens: {same}")


if __name__ == "__main__":
    main()
