"""lmforge-plot: loss and perplexity curves of one or more runs, from their CSV logs.

    lmforge-plot logs/causal_lm/run_a logs/causal_lm/run_b -o curves.png [--x tokens|time]

Writes a PNG and an SVG beside it: training and validation loss (left) and validation
perplexity (right) against optimizer steps, tokens seen or seconds of training, one colour per
run.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from lmforge.cli import reports_errors
from lmforge.errors import LMForgeError


def read_run(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """(x, value) series of a run's metrics.csv: train/loss, val/loss, val/ppl, by step, by
    tokens (the step's train/tokens) and by training seconds (perf/train_s), the last two
    interpolated between the steps they were logged at."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        raise LMForgeError(f"{path} not found: pass run directories written with the CSV logger")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    def logged(key: str) -> list[tuple[int, float]]:
        return sorted({int(r["step"]): float(r[key]) for r in rows if r.get(key)}.items())

    def at(points: list[tuple[int, float]], step: int) -> float:
        if not points:
            return float("nan")
        before = [p for p in points if p[0] <= step]
        after = [p for p in points if p[0] > step]
        if before and after:
            (s0, v0), (s1, v1) = before[-1], after[0]
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
        return before[-1][1] if before else points[0][1]

    tokens, seconds = logged("train/tokens"), logged("perf/train_s")
    series: dict[str, list[tuple[float, float]]] = {}
    for key in ("train/loss", "val/loss", "val/ppl"):
        points = [(int(r["step"]) + 1, float(r[key])) for r in rows if r.get(key)]
        series[key] = points
        series[key + "@tokens"] = [(at(tokens, s - 1), v) for s, v in points]
        series[key + "@time"] = [(at(seconds, s - 1), v) for s, v in points]
    if not series["train/loss"] and not series["val/loss"]:
        raise LMForgeError(f"{path} holds no train/loss or val/loss")
    return series


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lmforge-plot",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  lmforge-plot logs/causal_lm/my_run
  lmforge-plot logs/causal_lm/run_a logs/causal_lm/run_b -o curves.png --x tokens
  lmforge-plot logs/causal_lm/multirun/2025-01-01_12-00-00/* -o sweep.png --title 'lr sweep'""",
    )
    parser.add_argument("runs", nargs="+", help="run directories (logs/<task>/<run_name>)")
    parser.add_argument(
        "-o", "--output", default="curves.png", help="the PNG to write (an SVG too)"
    )
    parser.add_argument(
        "--x",
        choices=["step", "tokens", "time"],
        default="step",
        help="the x-axis: optimizer steps, tokens seen, or seconds of training (validations"
        " left out; perf/train_s of the throughput callback) (default: step)",
    )
    parser.add_argument("--title", default=None, help="a title above the plots")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LMForgeError("lmforge-plot needs matplotlib: pip install 'lmforge[plot]'") from None

    suffix = {"step": "", "tokens": "@tokens", "time": "@time"}[args.x]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run in enumerate(args.runs):
        run_dir = Path(run)
        series = read_run(run_dir)
        color = f"C{i}"
        for key, ax, style in (
            ("train/loss", ax_loss, {"alpha": 0.35, "linewidth": 1}),
            ("val/loss", ax_loss, {"marker": "o", "linewidth": 2}),
            ("val/ppl", ax_ppl, {"marker": "o", "linewidth": 2}),
        ):
            points = series[key + suffix]
            if points:
                x, y = zip(*points, strict=True)
                label = f"{run_dir.name} {key}" if ax is ax_loss else run_dir.name
                ax.plot(x, y, color=color, label=label, **style)
    xlabel = {"step": "optimizer step", "tokens": "tokens seen", "time": "seconds of training"}[
        args.x
    ]
    ax_loss.set(xlabel=xlabel, ylabel="loss (nats / token)", title="loss")
    ax_ppl.set(xlabel=xlabel, ylabel="perplexity", title="validation perplexity")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    fig.savefig(out.with_suffix(".svg"))
    print(f"wrote {out} and {out.with_suffix('.svg')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
