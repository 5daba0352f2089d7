"""End-to-end training runs on gpt-nano and a 60 kB corpus."""

import json
from pathlib import Path

import pytest
import torch

from lmforge.cli.train import train

ASSETS = Path(__file__).parent / "assets"


def read_metrics(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_short_run_writes_checkpoints_metrics_and_config(train_cfg, tmp_path):
    cfg = train_cfg(
        "model.n_layer=2", "trainer.max_steps=20", "trainer.val_check_interval=10", "logger=csv"
    )
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    best = list((run / "checkpoints").glob("step*-val_loss*.ckpt"))
    assert len(best) == 1  # the best by val/loss
    assert (run / "checkpoints" / "step000020.ckpt").is_file()  # the final step
    rows = read_metrics(run)
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 2 and val[-1] == pytest.approx(metrics["val/loss"])
    assert any(r.get("train/tokens") for r in rows)
    assert "n_layer: 2" in (run / "config.yaml").read_text()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 20
    assert ckpt["hyper_parameters"]["model"]["n_layer"] == 2
    assert "model.tok_emb.weight" in ckpt["state_dict"]
    assert '"model"' in ckpt["tokenizer"]  # tokenizer.json travels in the checkpoint


def test_default_loggers_write_offline_wandb_run(train_cfg):
    cfg = train_cfg("trainer.max_steps=4", "trainer.val_check_interval=2")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("*.wandb"))
    assert (run / "csv" / "metrics.csv").is_file()


def test_overfit_debug_config_learns_one_batch(train_cfg):
    cfg = train_cfg(
        "debug=overfit",
        "logger=none",
        "callbacks=none",
        "trainer.max_steps=150",
        "task.optim.lr=3e-3",
    )
    metrics = train(cfg)
    assert metrics["train/loss"] < 1.0  # from ~4.2 (uniform over 65 characters)


def test_golden_loss_curve(train_cfg):
    """The first 12 losses of a seeded gpt-nano run; a silent change in numerics shows up here."""
    cfg = train_cfg(
        "trainer.max_steps=12",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=12",
        "logger=csv",
        "callbacks=none",
        "seed=7",
    )
    train(cfg)
    losses = [
        float(r["train/loss"])
        for r in read_metrics(Path(cfg.paths.output_dir))
        if r.get("train/loss")
    ]
    golden_path = ASSETS / "golden_causal_lm.json"
    if not golden_path.exists():  # regenerate by deleting the file
        golden_path.write_text(json.dumps({"losses": losses}, indent=1))
    golden = json.loads(golden_path.read_text())["losses"]
    assert len(losses) == len(golden) == 12
    assert losses == pytest.approx(golden, abs=2e-4)


@pytest.mark.slow
def test_compiled_model_trains_and_saves_plain_keys(train_cfg):
    """task.compile=true compiles the model in place; checkpoints keep the model's own keys."""
    cfg = train_cfg(
        "task.compile=true",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "logger=csv",
        "callbacks.text_samples.max_new_tokens=4",
    )
    train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])


def test_bad_compile_value_is_refused(train_cfg):
    from lmforge.errors import LMForgeError

    with pytest.raises(LMForgeError, match="task.compile"):
        train(train_cfg("task.compile=sometimes"))


def test_global_batch_tokens_sets_accumulation(train_cfg):
    """12 sequences x 32 tokens per micro-batch on one device: 768 tokens = 2 micro-batches."""
    cfg = train_cfg(
        "data.global_batch_tokens=768",
        "trainer.max_steps=2",
        "trainer.val_check_interval=4",
        "logger=csv",
        "callbacks=none",
    )
    train(cfg)
    ckpt_free = Path(cfg.paths.output_dir) / "csv" / "hparams.yaml"
    hparams = ckpt_free.read_text()
    assert "batch/accumulate: 2" in hparams and "batch/global_tokens: 768" in hparams


def test_global_batch_tokens_must_be_a_multiple(train_cfg):
    from lmforge.errors import LMForgeError

    with pytest.raises(
        LMForgeError, match="not a multiple of .* = 384: use a multiple such as 768"
    ):
        train(train_cfg("data.global_batch_tokens=700", "logger=csv", "callbacks=none"))
