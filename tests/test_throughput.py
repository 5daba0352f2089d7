import time

import lightning as L
import pytest

from lmforge.callbacks.throughput import Throughput, mfu, peak_flops, precision_key
from lmforge.models.bert import Bert, BertConfig


@pytest.mark.parametrize(
    ("name", "precision", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),  # SXM
        ("NVIDIA H100 PCIe", "bf16", 756.5),
        ("NVIDIA H100 NVL", "fp32", 60.0),
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100-PCIE-40GB", "tf32", 156.0),
        ("NVIDIA A10G", "bf16", 70.0),
        ("NVIDIA A10", "bf16", 125.0),
        ("NVIDIA L4", "fp16", 121.0),
        ("NVIDIA L40S", "bf16", 362.1),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
        ("Tesla V100-SXM2-32GB", "fp16", 125.0),
    ],
)
def test_peak_table_picks_the_right_entry(name, precision, tflops):
    assert peak_flops(name, precision) == pytest.approx(tflops * 1e12)


def test_unknown_devices_and_precisions_give_no_peak():
    assert peak_flops("Some Future Accelerator", "bf16") is None
    assert peak_flops("Tesla V100-SXM2-32GB", "bf16") is None  # V100 has no bf16 units


def test_precision_keys():
    assert precision_key("bf16-mixed") == "bf16" and precision_key("bf16-true") == "bf16"
    assert precision_key("16-mixed") == "fp16"
    assert precision_key("32-true") == "fp32" and precision_key("32-true", tf32=True) == "tf32"


def test_mfu_of_a_synthetic_step():
    # 124M-parameter-like model: 6N + attention, 1024 tokens x 8 in 0.1 s on a 989.4 TFLOP/s device
    flops_per_token = 6 * 124e6 + 12 * 12 * 12 * 64 * 1024
    value = mfu(flops_per_token, tokens=8 * 1024, seconds=0.1, peak=989.4e12)
    assert value == pytest.approx(flops_per_token * 8 * 1024 / 0.1 / 989.4e12)
    assert 0.06 < value < 0.08


def test_bert_flops_count_sparse_prediction():
    c = BertConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = Bert(c)
    C, V = 32, 64
    body = (
        2 * (4 * C * C + 4 * C + 2 * 4 * C * C + 4 * C + C + 4 * C) + 2 * C
    )  # blocks + embedding LN
    head = C * C + C + 2 * C + V  # dense, LN, bias
    attention = 12 * 2 * 2 * 16 * 16
    assert model.flops_per_token(16) == 6 * body + 6 * (head + V * C) + attention
    assert model.flops_per_token(16, predicted_fraction=0.15) == int(
        6 * body + 6 * (head + V * C) * 0.15 + attention
    )


class ProgressBarProbe(L.Callback):
    """Records what the progress bar shows at the end of training."""

    seen: dict = {}

    def on_train_end(self, trainer, pl_module) -> None:
        ProgressBarProbe.seen = trainer.progress_bar_callback.get_metrics(trainer, pl_module)


PROBE = f"+callbacks.probe._target_={__name__}.ProgressBarProbe"


def test_callback_reports_tokens_per_second_without_mfu_on_cpu(train_cfg):
    import csv
    import shutil
    from pathlib import Path

    from lmforge.cli.train import train

    cfg = train_cfg(
        "trainer.max_steps=16",
        "trainer.val_check_interval=16",
        "logger=csv",
        "callbacks.throughput.log_every_n_steps=5",
        PROBE,
    )
    train(cfg)
    assert ProgressBarProbe.seen["perf/tokens_per_s"] > 0  # on the progress bar
    assert "perf/mfu" not in ProgressBarProbe.seen  # no peak for a CPU
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/step_ms")]
    assert len(rows) == 2  # steps 2..16 measured in intervals of 5 after 2 warm-up steps
    for r in rows:
        assert float(r["perf/tokens_per_s"]) == pytest.approx(
            float(r["perf/tokens_per_s_per_device"])
        )
        assert float(r["perf/samples_per_s"]) * 32 == pytest.approx(
            float(r["perf/tokens_per_s"])
        )  # gpt-nano: 32 tokens a row
        assert 0 <= float(r["perf/data_wait_frac"]) < 1
        assert not r.get("perf/mfu")
    shutil.rmtree(cfg.paths.output_dir)  # the same run directory: a fresh run, not a resume
    train(
        train_cfg(
            "trainer.max_steps=16",
            "trainer.val_check_interval=16",
            "logger=csv",
            "callbacks.throughput.log_every_n_steps=5",
            "callbacks.throughput.peak_tflops=1.0",
            PROBE,
        )
    )
    assert ProgressBarProbe.seen["perf/mfu"] > 0


def test_callback_defaults():
    cb = Throughput()
    assert cb.peak is None and cb.every == 10


class SlowValidation(L.Callback):
    """A validation that takes at least half a second more than it computes."""

    starts: list[float] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            SlowValidation.starts.append(time.perf_counter())
            time.sleep(0.5)


def test_training_seconds_leave_validations_out_and_place_the_curve(train_cfg):
    import csv
    from pathlib import Path

    from lmforge.cli.plot import read_run
    from lmforge.cli.train import train

    cfg = train_cfg(
        "trainer.max_steps=12",
        "trainer.val_check_interval=4",
        "logger=csv",
        "callbacks.text_samples=null",
        f"+callbacks.slow._target_={__name__}.SlowValidation",
    )
    SlowValidation.starts = []
    train(cfg)
    run = Path(cfg.paths.output_dir)
    with open(run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    at_val = {int(r["step"]): float(r["perf/train_s"]) for r in rows if r.get("perf/train_s")}
    val_steps = [int(r["step"]) for r in rows if r.get("val/loss")]
    assert val_steps == [3, 7, 11] and set(val_steps) <= set(at_val)
    seconds = [at_val[s] for s in val_steps]
    assert 0 < seconds[0] < seconds[1] < seconds[2]
    first, _, last = SlowValidation.starts
    assert seconds[2] - seconds[0] < last - first - 1.0  # two slow validations between them
    curve = read_run(run)["val/loss@time"]  # lmforge-plot --x time
    assert [x for x, _ in curve] == pytest.approx(seconds)
