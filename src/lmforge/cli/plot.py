"""lmforge-plot: loss and perplexity curves of one or more runs, from their CSV logs.

    lmforge-plot logs/causal_lm/run_a logs/causal_lm/run_b -o curves.png [--x tokens]

Writes a PNG and an SVG beside it: training and validation loss (left) and validation
perplexity (right) against optimizer steps or tokens seen, one colour per run.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from lmforge.cli import reports_errors
from lmforge.errors import LMForgeError


def read_run(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """(x, value) series of a run's metrics.csv: train/loss, val/loss, val/ppl, by step and by
    tokens (the step's train/tokens, interpolated between logged steps)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        raise LMForgeError(f"{path} not found: pass run directories written with the CSV logger")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    tokens = sorted(
        (int(r["step"]), float(r["train/tokens"])) for r in rows if r.get("train/tokens")
    )

    def tokens_at(step: int) -> float:
        if not tokens:
            return float("nan")
        before = [t for s, t in tokens if s <= step]
        after = [(s, t) for s, t in tokens if s > step]
        if before and after:
            (s0, t0), (s1, t1) = [p for p in tokens if p[0] <= step][-1], after[0]
            return t0 + (t1 - t0) * (step - s0) / (s1 - s0)
        return before[-1] if before else tokens[0][1]

    series: dict[str, list[tuple[float, float]]] = {}
    for key in ("train/loss", "val/loss", "val/ppl"):
        points = [(int(r["step"]) + 1, float(r[key])) for r in rows if r.get(key)]
        series[key] = points
        series[key + "@tokens"] = [(tokens_at(s - 1), v) for s, v in points]
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
        "--x", choices=["step", "tokens"], default="step", help="the x-axis (default: step)"
    )
    parser.add_argument("--title", default=None, help="a title above the plots")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LMForgeError("lmforge-plot needs matplotlib: pip install 'lmforge[plot]'") from None

    suffix = "@tokens" if args.x == "tokens" else ""
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
    xlabel = "tokens seen" if args.x == "tokens" else "optimizer step"
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
