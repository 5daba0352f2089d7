"""Throughput and model FLOPs utilisation (MFU), measured honestly.

MFU = achieved model FLOPs / the device's peak for the precision in use, where model FLOPs per
token come from the model's ``flops_per_token()`` (PaLM: 6N + 12·L·H·Q·T, the backward pass
included; activation recomputation is not counted). The peak comes from a per-device table
keyed by the device name and the precision, or from ``peak_tflops`` in the config. On a device
the table does not know, tokens/s are still reported, MFU is not, and the reason is printed once.

Step time is measured between the starts of consecutive optimizer steps (no synchronisation is
added inside the step: the GPU queue is drained once per logging interval), and the time spent
waiting for the data loader is measured as the gap between a step's end and the next batch.
An interval that a validation interrupts starts again after it.

``perf/train_s`` is the wall time the run has spent training, validations left out and carried
across a resume: logged with the throughput and at each validation, it is the x-axis of
``lmforge-plot --x time`` (the loss a run reaches in a given time).
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

# Dense (no sparsity) peak TFLOP/s per device, from the vendors' datasheets. The first pattern
# that the lower-cased device name contains wins, so specific names come before general ones.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("h200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("h100 pcie", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("h100 nvl", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.8, "fp32": 60.0}),
    ("h100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM ("H100 80GB HBM3")
    ("a100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("l40s", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("l4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("a10g", {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    ("a10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("rtx 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    ("rtx 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    ("v100", {"fp16": 125.0, "fp32": 15.7}),
    ("t4", {"fp16": 65.0, "fp32": 8.1}),
]


def precision_key(trainer_precision: str, tf32: bool = False) -> str:
    """'bf16' | 'fp16' | 'tf32' | 'fp32' for a Lightning precision string."""
    p = str(trainer_precision)
    if p.startswith("bf16"):
        return "bf16"
    if p.startswith("16"):
        return "fp16"
    if p.startswith("32"):
        return "tf32" if tf32 else "fp32"
    return p


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of one device for a precision key, or None when the table has no entry."""
    name = device_name.lower()
    for pattern, peaks in PEAK_TFLOPS:
        if pattern in name:
            return peaks[precision] * 1e12 if precision in peaks else None
    return None


def mfu(flops_per_token: float, tokens: int, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation of ``tokens`` processed in ``seconds`` on a device of ``peak`` FLOP/s."""
    return flops_per_token * tokens / seconds / peak


class Throughput(L.Callback):
    """Logs perf/tokens_per_s (per device and global), perf/samples_per_s, perf/step_ms,
    perf/data_wait_frac and perf/mfu every ``log_every_n_steps`` optimizer steps."""

    def __init__(
        self, log_every_n_steps: int = 10, peak_tflops: float | None = None, warmup_steps: int = 2
    ) -> None:
        self.every, self.peak_override, self.warmup = log_every_n_steps, peak_tflops, warmup_steps
        self.peak: float | None = None
        self.flops_per_token = 0.0
        self.progress_bar_metrics: dict[str, float] = {}  # shown by lmforge's ProgressBar
        self.train_s = 0.0  # training wall time so far, validations left out
        self.mark: float | None = None  # when the current stretch of training began

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        device = trainer.strategy.root_device
        tf32 = (
            torch.backends.cuda.matmul.allow_tf32
            or torch.get_float32_matmul_precision() != "highest"
        )
        precision = precision_key(trainer.precision, tf32=tf32 and device.type == "cuda")
        name = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} device"
        )
        if self.peak_override:
            self.peak = self.peak_override * 1e12
        elif device.type == "cuda":
            self.peak = peak_flops(name, precision)
        if self.peak is None:
            rank_zero_info(
                f"throughput: no peak FLOP/s known for {name} in {precision}; reporting tokens/s"
                " without MFU (set callbacks.throughput.peak_tflops to enable it)"
            )
        else:
            rank_zero_info(
                f"throughput: MFU against {self.peak / 1e12:.1f} TFLOP/s ({name}, {precision})"
            )
        self._reset()

    def _reset(self) -> None:
        self.t0: float | None = None
        self.tokens = self.samples = 0
        self.wait = 0.0
        self.last_end: float | None = None
        self.steps = 0

    def state_dict(self) -> dict:
        return {"train_s": self.train_s}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_s = state_dict.get("train_s", 0.0)

    def on_train_start(self, trainer, pl_module) -> None:
        self.mark = time.perf_counter()

    def _train_seconds(self, trainer) -> float:
        if self.mark is not None:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.train_s += now - self.mark
            self.mark = now
        return self.train_s

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.mark is None:
            return
        seconds = self._train_seconds(trainer)
        self.mark = None
        for logger in trainer.loggers:
            logger.log_metrics({"perf/train_s": seconds}, step=trainer.global_step - 1)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.mark = time.perf_counter()
        warm = self.t0 is not None
        self._reset()  # the interval the validation interrupted starts again
        if warm:
            self.t0 = self.mark

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if isinstance(batch, dict) and not any(k.endswith("input_ids") for k in batch):
            return  # prompts (task=grpo): the tokens are sampled in the step, not measured here
        now = time.perf_counter()
        if self.last_end is not None and self.t0 is not None:
            self.wait += now - self.last_end
        if self.t0 is None and trainer.global_step >= self.warmup:
            self.t0 = now
        # A dict's sequences: input_ids, or a preference pair's chosen_ and rejected_input_ids.
        seqs = (
            [v for k, v in batch.items() if k.endswith("input_ids")]
            if isinstance(batch, dict)
            else [batch[0]]
        )
        if self.t0 is not None:
            self.tokens += sum(ids.numel() for ids in seqs)
            self.samples += sum(ids.size(0) for ids in seqs)
            if not self.flops_per_token:
                self.flops_per_token = self._flops_per_token(pl_module, seqs[0].size(1))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_end = time.perf_counter()
        if self.t0 is None or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        self.steps += 1
        if self.steps < self.every:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # once per interval: the queued work is part of the interval
        seconds = time.perf_counter() - self.t0
        world = trainer.world_size
        metrics = {
            "perf/tokens_per_s": self.tokens * world / seconds,
            "perf/tokens_per_s_per_device": self.tokens / seconds,
            "perf/samples_per_s": self.samples * world / seconds,
            "perf/step_ms": 1000 * seconds / self.steps,
            "perf/data_wait_frac": self.wait / seconds,
            "perf/train_s": self._train_seconds(trainer),
        }
        if self.peak:
            metrics["perf/mfu"] = mfu(self.flops_per_token, self.tokens, seconds, self.peak)
        # Straight to the loggers (as Lightning's LearningRateMonitor does), and to the progress
        # bar through progress_bar_metrics: self.log costs ~1.5 ms a call on a CPU.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step - 1)  # the step just taken
        self.progress_bar_metrics = {
            k: metrics[k] for k in ("perf/tokens_per_s", "perf/mfu") if k in metrics
        }
        self._reset()
        self.t0 = time.perf_counter()
        self.last_end = None

    @staticmethod
    def _flops_per_token(pl_module, seq_len: int) -> float:
        if hasattr(pl_module, "flops_per_token"):  # a task that counts its own (classification)
            return pl_module.flops_per_token(seq_len)
        model = pl_module.model
        fraction = getattr(getattr(pl_module, "masking", None), "mask_prob", None)
        if fraction is not None:
            return model.flops_per_token(seq_len, predicted_fraction=fraction)
        return model.flops_per_token(seq_len)
