"""What an (offline) W&B run of lmforge-train holds, read back from W&B's own run file."""

import time
from pathlib import Path

from lmforge.cli.train import train

from .conftest import wandb_records, wandb_values


def test_offline_wandb_run_holds_config_counts_throughput_and_samples(train_cfg):
    cfg = train_cfg(
        "trainer.max_steps=12",
        "trainer.val_check_interval=6",
        "trainer.log_every_n_steps=2",
        "callbacks.throughput.log_every_n_steps=4",
        "callbacks.text_samples.max_new_tokens=8",
        "logger=default",
        "tags=[test,tiny]",
    )
    train(cfg)
    run_file = next(Path(cfg.paths.output_dir, "wandb").glob("offline-run-*/run-*.wandb"))
    for _ in range(100):  # W&B's service process may still be writing the file
        records = list(wandb_records(run_file))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    config, history, tags, steps = {}, set(), [], []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config |= wandb_values(record.config.update)
        elif kind == "history":
            row = wandb_values(record.history.item)
            history |= row.keys()
            steps.append((int(row["_step"]), int(row["trainer/global_step"])))
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
    # one row per logged step (every 2nd), holding all of its metrics; W&B's _step is the step
    assert steps == [(s, s) for s in range(1, 12, 2)]
    tables = {  # samples_<step>_<hash>.table.json
        int(p.name.split("_")[1]): p
        for p in run_file.parent.glob("files/media/table/samples_*.table.json")
    }
    assert sorted(tables) == [5, 11]  # after steps 6 and 12
    import json

    table = json.loads(tables[11].read_text())
    assert table["columns"] == ["step", "sample", "text"] and len(table["data"]) == 2
    assert tags == ["test", "tiny"]
