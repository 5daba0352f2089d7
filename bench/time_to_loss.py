"""Time to loss: how fast recipes reach a validation loss, nanoGPT's recipe beside lmforge's.

    python bench/time_to_loss.py                   # nanoGPT's recipe and speedrun_char_cpu
    python bench/time_to_loss.py --ablate          # and the speedrun with each knob turned over
    python bench/time_to_loss.py --target 1.95 --budget 20 --out /tmp/ttl

Every recipe is a whole `lmforge-train` process on Tiny Shakespeare characters, and they take
turns on the CPU (bench/turns.py): one runs at a time, each for the steps between two of its
validations, so the shared machine's noise falls on all of them. Each validates on the *whole*
validation split (111,540 tokens) at its own `trainer.val_check_interval`. Times are seconds of
training: the validations and the waits for a turn are left out (the throughput callback's
`perf/train_s`), start-up too; whole-process times are printed beside them.

- **nanoGPT**: `experiment=shakespeare_char_cpu` with nanoGPT's model (learned positions, exact
  GELU, no biases) and schedule (AdamW lr 1e-3, warmup 100, cosine to 1e-4 at 2,000 steps).
- **speedrun**: `experiment=speedrun_char_cpu`, validated every 50 steps.
- with ``--ablate``: the speedrun with one of its knobs turned off (or one more turned on), the
  same steps.

For each: the final validation loss; the training seconds and steps to reach the target (by
default nanoGPT's final loss of this very run; linear between the two validations around the
crossing); the loss at the time budget (default: 35% of nanoGPT's training seconds; the last
validation within it). Writes results.json, table.md and loss-vs-seconds curves
(`lmforge-plot --x time`) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from turns import Child, child_env, load, run_interleaved  # noqa: E402

NANOGPT = [
    "experiment=shakespeare_char_cpu",
    "model.pos_emb=learned",
    "model.gelu_approximate=none",
    "model.bias=false",
]
SPEEDRUN = ["experiment=speedrun_char_cpu", "trainer.val_check_interval=50"]
# Each knob of the speedrun turned over, at the speedrun's steps.
ABLATIONS = {
    "speedrun, AdamW instead of Muon": ["task.optim.optimizer=adamw"],
    "speedrun, cosine instead of WSD": ["task.optim.schedule=cosine"],
    "speedrun, GELU instead of ReLU²": ["model.mlp=gelu"],
    "speedrun, no QK-norm": ["model.qk_norm=false"],
    "speedrun, GPT-2 init of the projections": ["model.zero_init_proj=false"],
    "speedrun, learned positions": ["model.pos_emb=learned"],
    "speedrun + untied head": ["model.tie_weights=false"],
    "speedrun + logit soft-cap 15": ["model.logit_softcap=15"],
}
# What the benchmark leaves out of every recipe: checkpoints and text samples (not what is
# compared), W&B (CSV only); the progress bar and the throughput callback stay.
QUIET = [
    "logger=csv",
    "callbacks.periodic_checkpoint=null",
    "callbacks.model_checkpoint=null",
    "callbacks.timed_checkpoint=null",
    "callbacks.text_samples=null",
    "+callbacks.turns._target_=take_turns.TakeTurns",
]


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, training seconds, val/loss) at each validation of a run, from its metrics.csv."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    seconds = {int(r["step"]): float(r["perf/train_s"]) for r in rows if r.get("perf/train_s")}
    return [
        (int(r["step"]) + 1, seconds[int(r["step"])], float(r["val/loss"]))
        for r in rows
        if r.get("val/loss")
    ]


def crossing(points: list[tuple[int, float, float]], target: float) -> tuple[float, float] | None:
    """(steps, seconds) where the loss first reaches ``target``, linear between validations."""
    prev = (0, 0.0, float("inf"))
    for point in points:
        if point[2] <= target:
            s0, t0, l0 = prev
            s1, t1, l1 = point
            f = 1.0 if l0 == float("inf") else (l0 - target) / (l0 - l1)
            return s0 + f * (s1 - s0), t0 + f * (t1 - t0)
        prev = point
    return None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ablate", action="store_true", help="also each knob of the speedrun")
    ap.add_argument("--target", type=float, default=None, help="default: nanoGPT's final loss")
    ap.add_argument(
        "--budget", type=float, default=None, help="seconds; default: 35%% of nanoGPT's"
    )
    ap.add_argument("--out", default=None, help="results and runs here (default: a temp dir)")
    ap.add_argument("overrides", nargs="*", help="more lmforge-train overrides, for every recipe")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="lmforge-time-to-loss-"))
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    env = child_env(WANDB_MODE="disabled")
    recipes = {"nanoGPT": NANOGPT, "speedrun": SPEEDRUN}
    if args.ablate:
        recipes |= {name: SPEEDRUN + extra for name, extra in ABLATIONS.items()}
    children, run_dirs = [], {}
    for name, overrides in recipes.items():
        run_name = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        run_dirs[name] = out / "logs" / "causal_lm" / run_name
        children.append(
            Child(
                name,
                [
                    str(bin_dir / "lmforge-train"),
                    *overrides,
                    *QUIET,
                    f"paths.log_dir={out}/logs",
                    f"run_name={run_name}",
                    *args.overrides,
                ],
                out / f"{run_name}.json",
                env=env,
                log=out / f"{run_name}.log",
            )
        )
    print(f"{len(children)} recipes taking turns; logs in {out}", flush=True)
    run_interleaved(children)

    results = {}
    for child in children:
        points = curve(run_dirs[child.name])
        results[child.name] = {
            "points": points,
            "steps": points[-1][0],
            "train_s": points[-1][1],
            "final": points[-1][2],
            "process_s": child.wall_s,
            "startup_s": load(child)["startup_s"],
        }
    base = results["nanoGPT"]
    target = args.target if args.target is not None else base["final"]
    budget = args.budget if args.budget is not None else 0.35 * base["train_s"]
    lines = [
        f"Target: val/loss {target:.4f}; budget {budget:.1f} s of training.",
        "",
        "| recipe | steps | training s | whole process s | final val/loss | steps to target"
        " | training s to target | share of nanoGPT's time | val/loss within the budget |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        hit = crossing(r["points"], target)
        r["to_target"] = hit
        within = [loss for _, s, loss in r["points"] if s <= budget]
        r["at_budget"] = within[-1] if within else None
        steps_to = f"{hit[0]:.0f}" if hit else "not reached"
        seconds_to = f"{hit[1]:.1f}" if hit else "-"
        share = f"{hit[1] / base['train_s']:.0%}" if hit else "-"
        at_budget = f"{r['at_budget']:.4f}" if r["at_budget"] is not None else "-"
        lines.append(
            f"| {name} | {r['steps']} | {r['train_s']:.1f} | {r['process_s']:.1f} |"
            f" {r['final']:.4f} | {steps_to} | {seconds_to} | {share} | {at_budget} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"target": target, "budget": budget} | results))
    plotted = [str(run_dirs[n]) for n in ("nanoGPT", "speedrun")]
    subprocess.run(
        [
            str(bin_dir / "lmforge-plot"),
            *plotted,
            "-o",
            str(out / "time_to_loss.png"),
            "--x",
            "time",
            "--title",
            "Tiny Shakespeare characters, whole-split validation loss",
        ],
        check=True,
    )


if __name__ == "__main__":
    main()
