"""KV-cache generation against re-encoding the whole context for every new token.

    python bench/generate.py                      # gpt2-small geometry, 256 new tokens, CPU
    python bench/generate.py --model gpt2-medium --new-tokens 128 --device cuda

Random weights (the cost does not depend on them), greedy decoding, batch 1. The baseline is
the fair one: re-encoding the context with the output head on the last position only, as
``GPT.generate(use_cache=False)`` does (the head is 38 M of gpt2-small's 124 M parameters). A
third row runs the head on every position, as a naive loop over ``model(idx)[:, -1]`` does, to
show what that costs. The three alternate for ``--repeats`` rounds (the machine's noise falls on
all); prints the median time of each, the cache's speed-up over both baselines, and whether all
produced the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
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
    p.add_argument("--repeats", type=int, default=3, help="rounds of the three, alternating")
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

    @torch.no_grad()
    def every_position(n: int) -> torch.Tensor:
        idx = prompt
        for _ in range(n):
            logits = model(idx[:, -model.config.block_size :])[:, -1]  # head on every position
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
        return idx

    runs = {
        "KV cache": lambda: model.generate(prompt, args.new_tokens, temperature=0),
        "re-encode, head on the last position": lambda: model.generate(
            prompt, args.new_tokens, temperature=0, use_cache=False
        ),
        "re-encode, head on every position": lambda: every_position(args.new_tokens),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = run()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in median.items():
        print(f"  {name:<38}{seconds:8.2f} s  {args.new_tokens / seconds:8.1f} tokens/s")
    cache = median["KV cache"]
    fair, naive = (median[n] / cache for n in list(runs)[1:])
    same = all(torch.equal(outputs["KV cache"], out) for out in outputs.values())
    print(
        f"  speed-up of the cache: {fair:.2f}x over re-encoding with the head on the last"
        f" position ({naive:.2f}x over the head on every position); same tokens: {same}"
    )


if __name__ == "__main__":
    main()
