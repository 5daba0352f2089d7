"""lmforge-plot: two runs' curves in one image."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from lmforge.cli.plot import main as plot
from lmforge.cli.train import train


def test_two_runs_overlaid_in_a_png(train_cfg, tmp_path):
    runs = []
    for lr in ("1e-3", "3e-3"):
        cfg = train_cfg(
            "trainer.max_steps=20",
            "trainer.val_check_interval=10",
            "trainer.log_every_n_steps=2",
            f"task.optim.lr={lr}",
            "logger=csv",
            "callbacks.text_samples=null",
        )
        train(cfg)
        run = tmp_path / f"lr{lr}"
        shutil.move(cfg.paths.output_dir, run)
        runs.append(str(run))
    out = tmp_path / "plots" / "curves.png"
    assert plot([*runs, "-o", str(out), "--x", "tokens"]) == 0
    import matplotlib.image

    image = matplotlib.image.imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert np.asarray(image).std() > 0.05  # not a blank canvas
    assert out.with_suffix(".svg").read_text().count("<path") > 10
    with pytest.raises(SystemExit):
        plot([str(tmp_path / "nowhere")])
    assert Path(runs[0], "csv", "metrics.csv").is_file()
