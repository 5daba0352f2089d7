"""Lightning's Rich progress bar, drawing its metrics only when it redraws, and Lightning's model
summary without the FLOPs it cannot count.

The bar draws in the training thread, between steps, at most every ``min_redraw_s`` seconds:
Lightning's draws from a refresh thread of its own, which in a terminal competes with torch's
compute threads (bench/vs_nanogpt.py). Lightning's ``RichProgressBar`` also collects the
progress-bar metrics after every training batch,
whatever its ``refresh_rate``; that costs ~0.2 ms a step, 0.5% of a fast CPU step. This
subclass collects them only on the steps it redraws, and also shows the ``progress_bar_metrics``
that callbacks hold (the throughput callback's tokens/s and MFU), which would otherwise go
through ``self.log`` at ~1.5 ms a call. A run counted in optimizer steps (the data stream is
endless, ``max_epochs`` -1) is described as "step N/max_steps", not Lightning's "Epoch 0/-2";
the logger's version number (``v_num``, meaningless in a named run directory) is not shown.
Everything else is Lightning's.

Lightning's summary counts FLOPs only for a module with an ``example_input_array``, which
lmforge's tasks do not have: it printed a column of zeros and "Total FLOPs: 0".
``ModelSummary`` prints the same table without them (the throughput callback measures MFU).
"""

from __future__ import annotations

import math
import time

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.callbacks.model_summary import log
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table


class ProgressBar(RichProgressBar):
    def __init__(self, *args, min_redraw_s: float = 0.25, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.min_redraw_s = min_redraw_s
        self._drawn_at = -math.inf

    def refresh(self, hard: bool = False) -> None:
        """Draw now, in the training thread between steps, at most every ``min_redraw_s``.

        Lightning's bar draws from a thread of its own at the next tick after a step asks; in a
        terminal that thread's drawing preempts one of torch's compute threads mid-operation,
        and every thread of the operation then waits for it (3% of a step on a 2-core CPU)."""
        now = time.monotonic()
        if self.progress and (hard or now - self._drawn_at >= self.min_redraw_s):
            self._drawn_at = now
            self.progress.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # resuming mid-epoch
        self._update(self.train_progress_bar_id, batch_idx + 1)
        if (batch_idx + 1) % max(1, self.refresh_rate) == 0:
            if self.progress is not None and self._counts_steps():
                description = self._get_train_description(trainer.current_epoch)
                if self.theme.description:  # styled as Lightning's _add_task styles it
                    description = f"[{self.theme.description}]{description}"
                self.progress.update(self.train_progress_bar_id, description=description)
            self._update_metrics(trainer, pl_module)
            self.refresh()

    def _counts_steps(self) -> bool:
        trainer = self.trainer
        return trainer.max_epochs in (None, -1) and (trainer.max_steps or -1) > 0

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._counts_steps():
            return super()._get_train_description(current_epoch)
        description = f"step {self.trainer.global_step}/{self.trainer.max_steps}"
        # as wide as the validation bar's, so that the bars do not jump
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        for callback in trainer.callbacks:
            items.update(getattr(callback, "progress_bar_metrics", None) or {})
        return items


class ModelSummary(LightningModelSummary):
    """Lightning's model summary (parameters, sizes, modes) without the FLOPs column and total."""

    @staticmethod
    def summarize(
        summary_data,
        total_parameters,
        trainable_parameters,
        model_size,
        total_training_modes,
        total_flops,
        **summarize_kwargs,
    ) -> None:
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, 0, *columns
        )
        log.info("\n" + table.rpartition("\n")[0])  # the last line: "0  Total Flops"


def summary_without_flops(trainer) -> None:
    """Replace the summary that ``enable_model_summary`` gave ``trainer`` by ``ModelSummary``."""
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) in (LightningModelSummary, RichModelSummary):
            trainer.callbacks[i] = ModelSummary(max_depth=callback._max_depth)
