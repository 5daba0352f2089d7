"""End-to-end training runs on gpt-nano and a 60 kB corpus."""

import json
from pathlib import Path

import lightning as L
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


class BarProbe(L.Callback):
    """Records what the progress bar shows when training ends."""

    seen: dict = {}

    def on_train_end(self, trainer, pl_module) -> None:
        bar = trainer.progress_bar_callback
        BarProbe.seen = {
            "metrics": bar.get_metrics(trainer, pl_module),
            "description": bar._get_train_description(trainer.current_epoch),
        }


def test_progress_bar_and_summary_show_what_a_step_bounded_run_has(train_cfg, caplog):
    """The bar says "step 4/4", not Lightning's "Epoch 0/-2"; no logger version (v_num); no FLOPs counted
    as 0 in the model summary."""
    import logging

    cfg = train_cfg(
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "trainer.enable_model_summary=true",
        "logger=wandb",  # offline; its run id was the bar's v_num
        "callbacks.text_samples=null",
        f"+callbacks.probe._target_={__name__}.BarProbe",
    )
    summary = logging.getLogger("lightning.pytorch.callbacks.model_summary")
    summary.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=summary.name):
            train(cfg)
    finally:
        summary.removeHandler(caplog.handler)
    assert "val/loss" in BarProbe.seen["metrics"] and "v_num" not in BarProbe.seen["metrics"]
    assert BarProbe.seen["description"].strip() == "step 4/4"
    table = caplog.text
    assert "Total params" in table and "Trainable params" in table
    assert "FLOPs" not in table and "Flops" not in table


def test_report_names_the_next_commands_with_the_checkpoint(train_cfg, capsys):
    cfg = train_cfg("trainer.max_steps=2", "logger=csv", "callbacks.text_samples=null")
    train(cfg)
    out = capsys.readouterr().out
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert f"lmforge-generate ckpt_path={last} " in out
    assert f"lmforge-eval ckpt_path={last} data=shakespeare_char" in out
    assert f"lmforge-export {last} exports/run" in out


def test_next_commands_follow_what_the_checkpoint_holds():
    from lmforge.run import next_commands

    gpt, bert = {"family": "gpt", "model": {}}, {"family": "bert", "model": {}}
    assert [c.split()[0] for c in next_commands(gpt, "c.ckpt", "r")] == [
        "lmforge-generate",
        "lmforge-eval",
        "lmforge-export",
    ]
    assert [c.split()[0] for c in next_commands(bert, "c.ckpt", "r")] == ["lmforge-export"]
    reward = next_commands(gpt | {"reward": True}, "c.ckpt", "r")
    assert [c.split()[0] for c in reward] == ["lmforge-score", "lmforge-export"]
    assert next_commands(gpt | {"labels": ["neg", "pos"]}, "c.ckpt", "r") == []


@pytest.mark.parametrize(
    ("overrides", "multiple"),
    [
        ((), 1),  # trainer=cpu: padded rows would only be more work
        (("trainer.accelerator=gpu",), 64),  # whole tiles for the output matmul
        (("trainer.accelerator=gpu", "model.pad_vocab_multiple=8"), 8),  # set by the user
    ],
)
def test_vocabulary_padding_follows_the_device(train_cfg, overrides, multiple):
    from lmforge.cli.train import validate

    run = validate(train_cfg("model.vocab_size=65", *overrides))
    assert run.model.pad_vocab_multiple == multiple
    assert run.model.padded_vocab_size == -(-65 // multiple) * multiple
