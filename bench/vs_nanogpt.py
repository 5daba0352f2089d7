"""`lmforge-train`'s loop against nanoGPT's bare loop, same model, interleaved, whole processes.

    python bench/vs_nanogpt.py                  # 800 steps each, turns of 10, torch's default threads
    python bench/vs_nanogpt.py --threads 1      # OMP_NUM_THREADS=1 for both

Two processes: `lmforge-train experiment=shakespeare_char_cpu` with nanoGPT's model
(`model.pos_emb=learned model.gelu_approximate=none`; biases are already off), run as a user
runs it (default callbacks: progress bar, learning-rate monitor, throughput, checkpoints; the
CSV and W&B offline loggers), and `bench/nanogpt_loop.py`, nanoGPT's loop over the same model,
twice: as nanoGPT runs it on a CPU (torch's per-tensor AdamW) and with the fused AdamW kernel that
lmforge uses on every device (the fairest bare loop: it shows the loop's own overhead). lmforge-train writes to a pseudo-terminal, as in a user's shell, so its progress bar draws as it
does there (``--no-tty``: to a file, where Rich does not animate). They take turns of ``--every``
steps (bench/turns.py), so the machine's noise falls on both and
neither's threads compete with the other's. Each times its own steps (start of one to the start
of the next, the waits for a turn taken out) and its start-up (process spawned to first step
begun). Prints the mean and median step time of each, their ratios, the start-up and the whole
process time (spawned to exited, waits taken out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from turns import Child, child_env, load, run_interleaved  # noqa: E402

NANOGPT_MODEL = ["model.pos_emb=learned", "model.gelu_approximate=none", "model.bias=false"]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=800, help="steps of each loop")
    ap.add_argument("--every", type=int, default=10, help="steps in a turn")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both")
    ap.add_argument(
        "--no-tty",
        action="store_true",
        help="lmforge-train's output to a file (default: a terminal, where its bar draws)",
    )
    ap.add_argument("--out", default=None, help="keep the runs' logs here (default: a temp dir)")
    ap.add_argument("overrides", nargs="*", help="more lmforge-train overrides")
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="lmforge-vs-nanogpt-"))
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [bin_dir / "lmforge-prepare", "data=shakespeare_char"], check=True, capture_output=True
    )
    env = child_env(WANDB_MODE="offline")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    lmforge = Child(
        "lmforge-train",
        [
            str(bin_dir / "lmforge-train"),
            "experiment=shakespeare_char_cpu",
            *NANOGPT_MODEL,
            f"trainer.max_steps={args.steps}",
            f"trainer.val_check_interval={args.steps}",
            f"run_name=vs-nanogpt-{os.getpid()}",
            f"paths.log_dir={work}/logs",
            "+callbacks.turns._target_=take_turns.TakeTurns",
            f"+callbacks.turns.every={args.every}",
            *args.overrides,
        ],
        work / "lmforge.json",
        env=env,
        log=work / "lmforge.log",
        tty=not args.no_tty,
    )

    def bare_loop(name: str, *extra: str) -> Child:
        return Child(
            name,
            [
                sys.executable,
                str(ROOT / "bench" / "nanogpt_loop.py"),
                f"--steps={args.steps}",
                f"--every={args.every}",
                f"--data={ROOT / 'data' / 'prepared' / 'shakespeare_char'}",
                *extra,
            ],
            work / f"{name.replace(' ', '_')}.json",
            env=env,
            log=work / f"{name.replace(' ', '_')}.log",
        )

    bare = bare_loop("nanoGPT loop")
    fused = bare_loop("+ fused AdamW", "--fused")
    children = [bare, fused, lmforge]
    run_interleaved(children)
    rows = {}
    for child in children:
        r = load(child)
        steps = r["step_s"][5:]  # the first steps warm the allocator and caches
        rows[child.name] = (
            len(steps),
            statistics.mean(steps) * 1e3,
            statistics.median(steps) * 1e3,
            r["startup_s"],
            child.wall_s,
            r["threads"],
        )
    print(f"\n{args.steps} steps each, turns of {args.every}; logs in {work}")
    print(
        f"{'loop':<15}{'threads':>8}{'steps':>7}{'mean ms':>9}{'median ms':>11}"
        f"{'start-up s':>12}{'process s':>11}"
    )
    for name, (n, mean, median, startup, wall, threads) in rows.items():
        print(
            f"{name:<15}{threads:>8}{n:>7}{mean:>9.2f}{median:>11.2f}{startup:>12.2f}{wall:>11.2f}"
        )
    lm = rows["lmforge-train"]
    for name in ("nanoGPT loop", "+ fused AdamW"):
        b = rows[name]
        print(
            f"lmforge / {name}: mean {lm[1] / b[1]:.3f}, median {lm[2] / b[2]:.3f};"
            f" start-up {lm[3] - b[3]:+.2f} s; whole process {lm[4] / b[4]:.2f}x"
        )


if __name__ == "__main__":
    main()
