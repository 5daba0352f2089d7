"""Framework overhead: our Lightning task against a bare PyTorch loop, same model, data, optimizer.

    python bench/overhead.py                    # gpt-mini on Tiny Shakespeare, CPU
    python bench/overhead.py --device cuda --model gpt2-small --batch-size 8 --seq-len 1024

Both step the same model (the same initial weights), the same batches (the same RandomWindows
stream through a DataLoader), AdamW with the same groups and schedule, and gradient clipping at
1.0. They interleave step by step in one process, so machine noise hits both alike: after each
Lightning step, a callback runs one step of the bare loop and times it. A Lightning step is timed
from the start of one step to the start of the next, less the bare step run in between, so data
loading, logging and the progress bar count. The Lightning side runs with the default callbacks
of `lmforge-train` (progress bar, learning-rate monitor, throughput, as conf/callbacks/default.yaml
sets them) and the CSV logger. Prints the median step times and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmforge.data.datasets import RandomWindows, open_split  # noqa: E402
from lmforge.models.gpt import GPTConfig  # noqa: E402
from lmforge.tasks.causal_lm import CausalLMTask  # noqa: E402
from lmforge.tasks.config import CausalLMConfig  # noqa: E402
from lmforge.tasks.optim import OptimConfig, lr_at  # noqa: E402
from shakespeare import prepare_shakespeare_char  # noqa: E402


def default_callbacks() -> list[L.Callback]:
    """lmforge-train's default callbacks that act during training steps (as conf/callbacks/default.yaml
    sets them); checkpointing and text samples act at validation, which this benchmark skips."""
    cfg = OmegaConf.load(ROOT / "conf" / "callbacks" / "default.yaml")
    return [instantiate(cfg[key]) for key in ("progress_bar", "lr_monitor", "throughput")]


class Interleave(L.Callback):
    """Times each Lightning step and runs (and times) one bare-loop step after it."""

    def __init__(self, bare_step, warmup: int) -> None:
        self.bare_step, self.warmup = bare_step, warmup
        self.lit: list[float] = []
        self.bare: list[float] = []
        self.start: float | None = None
        self.excluded = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = sync_time(pl_module.device)
        if self.start is not None and trainer.global_step > self.warmup:
            self.lit.append(now - self.start - self.excluded)
        self.start, self.excluded = now, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        t0 = sync_time(pl_module.device)
        self.bare_step()
        t1 = sync_time(pl_module.device)
        self.excluded = t1 - t0
        if trainer.global_step > self.warmup:
            self.bare.append(t1 - t0)


def sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def make_bare_step(model: torch.nn.Module, opt, sched, stream, device):
    """One step of the hand-written loop: forward, loss, backward, clip, step, schedule."""

    def step() -> None:
        x, y = next(stream)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), y.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="gpt-mini", help="a conf/model flavour")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=600, help="timed steps of each side")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="lmforge-overhead-"))
    meta = prepare_shakespeare_char(work / "data")
    flavour = OmegaConf.load(ROOT / "conf" / "model" / f"{args.model}.yaml")
    fields = {k: v for k, v in OmegaConf.to_container(flavour).items() if k != "_target_"}
    model_cfg = GPTConfig(
        **(
            fields
            | {
                "vocab_size": meta["vocab_size"],
                "block_size": max(args.seq_len, fields["block_size"]),
            }
        )
    )
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    total = args.steps + args.warmup + 1
    torch.manual_seed(0)
    lit_task = CausalLMTask(model_cfg, CausalLMConfig(optim=optim))
    bare_task = CausalLMTask(model_cfg, CausalLMConfig(optim=optim))
    bare_task.model.load_state_dict(lit_task.model.state_dict())
    bare_task.model.to(device)
    shards = open_split(work / "data", "train")
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"

    # the bare loop's optimizer: the task's own groups and schedule
    groups = bare_task.param_groups()
    bare_opt = torch.optim.AdamW(
        groups,
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        fused=True,  # as lmforge's AdamW, on every device
    )
    bare_sched = torch.optim.lr_scheduler.LambdaLR(
        bare_opt, lambda s: lr_at(s, optim, total) / optim.lr
    )
    bare_stream = iter(
        torch.utils.data.DataLoader(
            RandomWindows(shards, args.seq_len, args.batch_size, seed=1),
            batch_size=None,
            pin_memory=device.type == "cuda",
        )
    )

    interleave = Interleave(
        make_bare_step(bare_task.model, bare_opt, bare_sched, bare_stream, device), args.warmup
    )
    lit_data = RandomWindows(shards, args.seq_len, args.batch_size, seed=1)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision,
        max_steps=args.steps + args.warmup + 1,
        gradient_clip_val=1.0,
        logger=CSVLogger(work, name="csv"),
        enable_checkpointing=False,
        callbacks=[interleave, *default_callbacks()],
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(lit_task, train_dataloaders=torch.utils.data.DataLoader(lit_data, batch_size=None))
    lit_times, bare_times = interleave.lit, interleave.bare
    lit, bare = statistics.median(lit_times), statistics.median(bare_times)
    n = model_cfg.__dict__
    print(
        f"\nmodel {args.model} ({lit_task.model.num_params():,} params, n_layer={n['n_layer']}, n_embd={n['n_embd']}), "
        f"batch {args.batch_size} x {args.seq_len}, device {device}, torch {torch.__version__}, lightning {L.__version__}"
    )
    print(f"{'loop':<12}{'steps':>7}{'median ms':>11}{'mean ms':>10}")
    print(
        f"{'bare torch':<12}{len(bare_times):>7}{bare * 1e3:>11.2f}{statistics.mean(bare_times) * 1e3:>10.2f}"
    )
    print(
        f"{'lmforge':<12}{len(lit_times):>7}{lit * 1e3:>11.2f}{statistics.mean(lit_times) * 1e3:>10.2f}"
    )
    print(f"ratio lmforge / bare (median): {lit / bare:.3f}")


if __name__ == "__main__":
    main()
