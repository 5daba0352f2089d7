"""Lightning's ``LearningRateMonitor``, which refuses a run without loggers with a traceback;
under ``logger=none`` this one stays silent instead (the progress bar still shows the loss)."""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor as _LightningMonitor


class LearningRateMonitor(_LightningMonitor):
    _enabled = True

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        self._enabled = bool(trainer.loggers)
        if self._enabled:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if self._enabled:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if self._enabled:
            super().on_train_epoch_start(trainer, *args, **kwargs)
