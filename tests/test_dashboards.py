"""What an (offline) W&B run of lmforge-train holds, read back from W&B's own run file."""

import struct
import time
from pathlib import Path

from lmforge.cli.train import train


def wandb_records(path: Path):
    """The protobuf records of a run-<id>.wandb file (LevelDB log format, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def name(item) -> str:
    return item.key or "/".join(item.nested_key)  # "a/b" keys may come split


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
    config, history, tags = {}, set(), []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config |= {name(item): item.value_json for item in record.config.update}
        elif kind == "history":
            history |= {name(item) for item in record.history.item}
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
    tables = sorted(run_file.parent.glob("files/media/table/samples_*.table.json"))
    assert len(tables) == 2  # the text samples table, after each of the two validations
    import json

    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["step", "sample", "text"] and len(table["data"]) == 2
    assert tags == ["test", "tiny"]
