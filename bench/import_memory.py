"""Peak memory of importing a sharded Llama checkpoint: lmforge fills a model built on the meta
device one tensor at a time, so the weights are never held twice.

    python bench/import_memory.py                 # ~205 M parameters, bf16 shards of 200 MB
    python bench/import_memory.py --dtype float32 --transformers

Writes a random Llama-shaped model with transformers (``save_pretrained``, sharded) into a
temporary directory, then imports it with ``lmforge.interop.hf_llama.load_hf_llama`` in a fresh
process and reads that process's peak resident set size (``VmHWM``). Reported as a multiple
of the model's fp32 bytes (parameters x 4), in total and above the process's size before the
import (Python, torch and lmforge loaded). ``--transformers`` measures
``LlamaForCausalLM.from_pretrained(dtype=float32)`` the same way, for reference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
import torch

def status_bytes(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def rss_bytes():
    return status_bytes("VmRSS")

path, how = sys.argv[1], sys.argv[2]
if how == "lmforge":
    from lmforge.interop.hf_llama import load_hf_llama
    load = load_hf_llama
else:
    import transformers
    def load(p):
        return transformers.LlamaForCausalLM.from_pretrained(p, dtype=torch.float32)
before = rss_bytes()
start = time.perf_counter()
model = load(path)
seconds = time.perf_counter() - start
params = sum(p.numel() for p in model.parameters())
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over an exec, so a child of a
# parent holding the model it just wrote would report the parent's size.
peak = status_bytes("VmHWM")
print(json.dumps({"before": before, "peak": peak, "params": params, "seconds": seconds}))
"""


def measure(path: Path, how: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), how], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--shard", default="200MB", help="save_pretrained's max_shard_size")
    p.add_argument("--transformers", action="store_true", help="measure from_pretrained too")
    args = p.parse_args()

    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(getattr(torch, args.dtype))
        model.save_pretrained(tmp, max_shard_size=args.shard)
        del model
        shards = sorted(Path(tmp).glob("*.safetensors"))
        size = sum(f.stat().st_size for f in shards)
        print(
            f"wrote {len(shards)} {args.dtype} shards, {size / 1e6:.0f} MB, in"
            f" {time.perf_counter() - start:.1f} s"
        )
        for how in ["lmforge"] + (["transformers"] if args.transformers else []):
            r = measure(Path(tmp), how)
            fp32 = r["params"] * 4
            print(
                f"{how}: {r['params'] / 1e6:.1f} M parameters ({fp32 / 1e6:.0f} MB in fp32),"
                f" import {r['seconds']:.1f} s; peak RSS {r['peak'] / 1e6:.0f} MB ="
                f" {r['peak'] / fp32:.2f}x the fp32 weights; above the {r['before'] / 1e6:.0f} MB"
                f" before the import: {(r['peak'] - r['before']) / 1e6:.0f} MB ="
                f" {(r['peak'] - r['before']) / fp32:.2f}x"
            )


if __name__ == "__main__":
    main()
