"""What an (offline) W&B run of lmforge-train holds, read back from W&B's own run file."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lmforge.cli.train import train

from .conftest import wandb_records, wandb_values


def test_offline_wandb_run_holds_config_counts_throughput_samples_and_models(
    train_cfg, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # artifacts staged here
    cfg = train_cfg(
        "trainer.max_steps=13",  # validations after steps 6 and 12, and at the last step
        "trainer.val_check_interval=6",
        "trainer.log_every_n_steps=2",
        "callbacks.throughput.log_every_n_steps=4",
        "callbacks.text_samples.max_new_tokens=8",
        "logger=default",
        "logger.wandb.log_model=true",
        "tags=[test,tiny]",
    )
    train(cfg)
    run_file = next(Path(cfg.paths.output_dir, "wandb").glob("offline-run-*/run-*.wandb"))
    for _ in range(100):  # W&B's service process may still be writing the file
        records = list(wandb_records(run_file))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    config, history, tags, steps, summary, artifacts = {}, set(), [], [], {}, []
    val_rows, tables = {}, {}  # step: val/loss, step: samples table file
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config |= wandb_values(record.config.update)
        elif kind == "history":
            row = wandb_values(record.history.item)
            history |= row.keys()
            steps.append((int(row["_step"]), int(row["trainer/global_step"])))
            if "val/loss" in row:
                val_rows[int(row["_step"])] = float(row["val/loss"])
            if "samples/path" in row:
                tables[int(row["_step"])] = (
                    run_file.parent / "files" / json.loads(row["samples/path"])
                )
        elif kind == "summary":
            summary |= wandb_values(record.summary.update)
        elif kind == "artifact":
            artifacts.append(record.artifact)
        elif kind == "run":
            tags = list(record.run.tags)
    assert {
        "model",
        "data",
        "task",
        "trainer",
        "params/total",
        "batch/global_tokens",
    } <= config.keys()
    assert int(config["params/total"]) > 0
    assert "api_key" not in str(config).lower()
    assert {"train/loss", "val/loss", "val/ppl", "train/tokens", "train/grad_norm"} <= history
    assert {"perf/tokens_per_s", "perf/step_ms", "lr-AdamW/pg1"} <= history
    # one row per logged step (every 2nd, and the last step's validation), holding all of its
    # metrics; W&B's _step is the step
    assert steps == [(s, s) for s in [*range(1, 12, 2), 12]]
    assert sorted(val_rows) == [5, 11, 12]  # after steps 6 and 12, and 13 (the last)
    assert json.loads(summary["val/loss"]) == {"min": min(val_rows.values())}
    assert sorted(tables) == sorted(val_rows)  # each samples table in its validation's row
    table = json.loads(tables[12].read_text())
    assert table["columns"] == ["step", "sample", "text"] and len(table["data"]) == 3
    assert tags == ["test", "tiny"]
    # log_model=true offline: the best and the last checkpoint, staged for `wandb sync`
    ckpts = Path(cfg.paths.output_dir, "checkpoints")
    best = next(ckpts.glob("*val_loss*.ckpt"))
    logged = {alias: a for a in artifacts for alias in a.aliases if alias != "latest"}
    assert sorted(logged) == ["best", "last"]
    for alias, path in (("best", best), ("last", ckpts / "last.ckpt")):
        artifact = logged[alias]
        assert artifact.name.startswith("model-") and artifact.type == "model"
        assert json.loads(artifact.metadata)["original_filename"] == path.name
        (entry,) = artifact.manifest.contents
        assert Path(entry.local_path).read_bytes() == path.read_bytes()
    dry_run = subprocess.run(  # the W&B command line, not silenced
        [Path(sys.executable).parent / "wandb", "sync", "--dry-run", run_file.parent],
        capture_output=True,
        text=True,
        env=os.environ | {"WANDB_SILENT": "false"},
        timeout=120,
    )
    assert dry_run.returncode == 0 and "Would sync 1 run(s)" in dry_run.stderr + dry_run.stdout
    assert run_file.name in dry_run.stderr + dry_run.stdout
