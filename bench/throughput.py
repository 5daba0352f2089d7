"""Training throughput and MFU of gpt2-small (seq 1024) and bert-base (seq 512) over a matrix of
settings: eager vs torch.compile, fp32 vs bf16 autocast, batch sizes.

    python bench/throughput.py --device cuda                     # the full matrix on a GPU
    python bench/throughput.py --device cpu --quick              # a smoke run of tiny shapes on a CPU

Each cell times `--steps` training steps (forward, loss, backward, fused AdamW on CUDA) on random
token ids after `--warmup` untimed steps (compilation happens there), synchronising once at each
end. BERT steps run the MLM head on 15% of the positions, as training does. MFU uses the model's
flops_per_token() (PaLM 6N + 12·L·H·Q·T) over the peak of lmforge's device table for the precision
(bf16, or tf32 for fp32 matmuls on CUDA). Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmforge.callbacks.throughput import peak_flops  # noqa: E402
from lmforge.models.bert import Bert, BertConfig  # noqa: E402
from lmforge.models.gpt import GPT, GPTConfig  # noqa: E402

MODELS = {
    "gpt2-small": (lambda: GPT(GPTConfig(vocab_size=50257, block_size=1024)), 1024),
    "bert-base": (lambda: Bert(BertConfig(vocab_size=30522, block_size=512, dropout=0.0)), 512),
}
QUICK = {
    "gpt2-small": (
        lambda: GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64)),
        64,
    ),
    "bert-base": (
        lambda: Bert(
            BertConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
        ),
        64,
    ),
}


def step_fn(model, vocab: int, mask_prob: float = 0.15):
    is_bert = isinstance(model, Bert)

    def step(ids: torch.Tensor) -> torch.Tensor:
        if is_bert:
            hidden = model.hidden(ids)
            selected = torch.rand(ids.shape, device=ids.device) < mask_prob
            logits = model.lm_logits(hidden, selected)
            return F.cross_entropy(logits.float(), ids[selected])
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))

    return step


def run_cell(
    name: str,
    build,
    seq: int,
    batch: int,
    compiled: bool,
    bf16: bool,
    device: torch.device,
    steps: int,
    warmup: int,
) -> dict:
    torch.manual_seed(0)
    model = build().to(device)
    vocab = model.config.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    if compiled:
        model.compile()
    step = step_fn(model, vocab)
    ids = torch.randint(
        0, vocab, (batch, seq + (0 if isinstance(model, Bert) else 1)), device=device
    )

    def one() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = step(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    tokens = batch * seq
    fpt = (
        model.flops_per_token(seq, predicted_fraction=0.15)
        if isinstance(model, Bert)
        else model.flops_per_token(seq)
    )
    precision = "bf16" if bf16 else ("tf32" if device.type == "cuda" else "fp32")
    peak = (
        peak_flops(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else None
    )
    result = {
        "model": name,
        "seq": seq,
        "batch": batch,
        "compile": compiled,
        "precision": precision,
        "step_ms": seconds * 1e3,
        "tokens_per_s": tokens / seconds,
        "tflops": fpt * tokens / seconds / 1e12,
        "mfu": fpt * tokens / seconds / peak if peak else None,
    }
    if device.type == "cuda":
        result["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="gpt2-small,bert-base")
    ap.add_argument("--batch-sizes", default="8,16")
    ap.add_argument("--compile", default="false,true", help="the compile settings to try")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke run)")
    ap.add_argument("--out", type=Path, default=ROOT / "logs" / "bench" / "throughput.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    table = QUICK if args.quick else MODELS
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}")
    print(
        f"{'model':<12}{'seq':>6}{'batch':>6}{'compile':>9}{'prec':>6}{'ms/step':>10}{'tok/s':>12}{'TFLOP/s':>9}{'MFU':>7}"
    )
    results = []
    for model_name, batch, compiled, precision in itertools.product(
        args.models.split(","),
        map(int, args.batch_sizes.split(",")),
        [c == "true" for c in args.compile.split(",")],
        args.precisions.split(","),
    ):
        build, seq = table[model_name]
        try:
            r = run_cell(
                model_name,
                build,
                seq,
                batch,
                compiled,
                precision == "bf16",
                device,
                args.steps,
                args.warmup,
            )
        except torch.OutOfMemoryError:
            print(f"{model_name:<12}{seq:>6}{batch:>6}{compiled!s:>9}{precision:>6}  out of memory")
            torch.cuda.empty_cache()
            continue
        results.append(r)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(
            f"{model_name:<12}{seq:>6}{batch:>6}{compiled!s:>9}{r['precision']:>6}{r['step_ms']:>10.1f}"
            f"{r['tokens_per_s']:>12,.0f}{r['tflops']:>9.1f}{mfu:>7}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"device": name, "torch": torch.__version__, "results": results}, indent=2)
    )
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
