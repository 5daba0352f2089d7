"""lmforge-sweep: the trials of a sweep, best first.

    lmforge-sweep logs/causal_lm/multirun/<time> [--metric val/loss] [--max]
    lmforge-sweep sqlite:///logs/sweeps.db [--study NAME] [--max]

For a sweep directory: every trial directory's swept parameters (the overrides that differ
between trials) and the last logged value of the metric, from the trial's CSV log. For an Optuna
storage: every trial of the study, from all the commands that ran or resumed it, with the value
each trial returned (lmforge-train's val/loss) and its state (a killed trial stays RUNNING).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import yaml

from lmforge.cli import reports_errors
from lmforge.errors import LMForgeError


def trials(sweep_dir: Path, metric: str) -> list[tuple[str, dict[str, str], float]]:
    found = []
    for trial in sorted(
        p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()
    ):
        overrides = yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text()) or []
        params = dict(o.split("=", 1) for o in overrides if "=" in o)
        value = math.nan
        metrics = trial / "csv" / "metrics.csv"
        if metrics.is_file():
            with open(metrics, newline="") as f:
                values = [float(r[metric]) for r in csv.DictReader(f) if r.get(metric)]
            value = values[-1] if values else math.nan
        found.append((trial.name, params, value))
    if not found:
        raise LMForgeError(f"{sweep_dir} holds no trial directories (…/<n>/.hydra/overrides.yaml)")
    return found


def stored_trials(storage: str, study: str | None) -> list[tuple[str, dict[str, str], float]]:
    """The trials of an Optuna study as (number, parameters and state, value)."""
    try:
        from lmforge.sweeps import study_trials
    except ImportError:
        raise LMForgeError(
            f"reading {storage} needs Optuna: pip install 'lmforge[sweep]'"
        ) from None
    found = [
        (
            str(t.number),
            {"state": t.state.name}
            | {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in t.params.items()},
            math.nan if t.value is None else t.value,
        )
        for t in study_trials(storage, study)
    ]
    if not found:
        raise LMForgeError(f"{storage}: study {study or ''} holds no trials yet")
    return found


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lmforge-sweep",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  lmforge-sweep logs/causal_lm/multirun/2026-01-01_12-00-00
  lmforge-sweep logs/classification/multirun/2026-01-01_12-00-00 --metric val/acc --max
  lmforge-sweep sqlite:///logs/sweeps.db --study char""",
    )
    parser.add_argument("sweep", help="logs/<task>/multirun/<time>, or an Optuna storage URL")
    parser.add_argument(
        "--metric",
        default="val/loss",
        help="a sweep directory's metric, the last value logged in each trial's CSV"
        " (default: val/loss); a storage holds the value each trial returned",
    )
    parser.add_argument("--study", help="the study of the storage (if it holds several)")
    parser.add_argument("--max", action="store_true", help="higher is better (e.g. val/acc)")
    args = parser.parse_args(argv)
    if "://" in args.sweep:
        found = stored_trials(args.sweep, args.study)
    else:
        found = trials(Path(args.sweep), args.metric)
    swept = sorted({k for _, p, _ in found for k in p if len({q.get(k) for _, q, _ in found}) > 1})
    if "state" in swept:
        swept.remove("state")
        swept.insert(0, "state")
    sign = -1 if args.max else 1
    found.sort(key=lambda t: (math.isnan(t[2]), sign * t[2] if not math.isnan(t[2]) else 0))
    head = ["trial", args.metric, *swept]
    rows = [
        [name, f"{value:.4f}", *(params.get(k, "") for k in swept)] for name, params, value in found
    ]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
