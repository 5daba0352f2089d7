"""Validation at the last step of every run.

Lightning validates every ``trainer.val_check_interval`` micro-batches. A run whose
``max_steps`` is not a multiple of it (a sweep trial shorter than the interval, say), or whose
last epoch does not end on one (a fine-tune of ``max_epochs`` validated every N steps), would end
without validating its final weights, or without any val/loss at all, and a sweeper would get no
objective. Asking the trainer to stop on the last micro-batch of the last step makes Lightning's
own loop validate there (it validates before stopping when asked to), once, followed by the
checkpoints a validation triggers; a run whose last step is a validation step is unchanged.
"""

from __future__ import annotations

import lightning as L


class LastStepValidation(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last_epoch = 0 < (trainer.max_epochs or 0) <= trainer.current_epoch + 1
        if (0 < trainer.max_steps <= trainer.global_step) or (
            last_epoch and batch_idx + 1 >= trainer.num_training_batches
        ):
            trainer.should_stop = True
