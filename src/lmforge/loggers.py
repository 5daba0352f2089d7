"""Logger factories referenced by ``conf/logger``."""

from __future__ import annotations

import csv
import io
import netrc
import os
import secrets
from pathlib import Path
from typing import Any

from lmforge.errors import LMForgeError


def wandb_mode(mode: str) -> str:
    """Resolve ``auto`` to ``online`` when W&B credentials are configured, else ``offline``."""
    if mode not in ("auto", "online", "offline", "disabled"):
        raise LMForgeError(f"logger.wandb.mode={mode!r}: use auto, online, offline or disabled")
    env = os.environ.get("WANDB_MODE")
    if env == "disabled":
        return "disabled"
    if mode != "auto":
        return mode
    if env in ("offline", "dryrun"):
        return "offline"
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


def wandb_logger(mode: str = "auto", flush_every_s: float = 1.0, log_model: bool = False, **kwargs):
    """A Lightning ``WandbLogger`` in the resolved mode, or None when W&B is disabled.

    Offline runs are written under ``save_dir/wandb/offline-run-*``, one folder per process of
    a resumed run; ``wandb sync save_dir/wandb`` uploads them in start order into the one run.
    W&B writes its run file every ``flush_every_s`` seconds (its default, 15 s, is what a
    killed process loses). Credentials come from the environment or ``wandb login``, never the
    config. The run's summary holds the minimum of ``val/loss`` and ``val/ppl``.

    ``log_model=True`` logs, when training ends, the best checkpoint (of the checkpoint callback
    that monitors a metric) and the last one (``last.ckpt``) as versions of the artifact
    ``model-<run id>``, aliased ``best`` and ``last``. lmforge's checkpoint callbacks write the
    files; Lightning's own ``log_model`` refuses offline runs and marks a retention callback's
    newest file "best". The files are copied into W&B's staging directory (``WANDB_DATA_DIR``),
    so an offline run uploads them with ``wandb sync`` even after the run directory moved on.
    """
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(mode)
    log_model = wandb_log_model(log_model)
    if mode == "disabled":
        return None
    from lightning.fabric.loggers.logger import rank_zero_experiment
    from lightning.fabric.utilities.logger import _add_prefix
    from lightning.pytorch.utilities import rank_zero_only

    class Logger(WandbLogger):
        """W&B's history step (``_step``) is the optimizer step: a step's metrics share one row,
        and the parts of a resumed run line up in one history (rows a killed process logged after
        its last checkpoint come again, with equal values, from the resumed one). Lightning's
        logger lets W&B count its own ``_step``, which restarts at 0 in a resumed offline part."""

        step = 0

        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            if self._wandb_init.get("anonymous") is None:  # wandb warns at the bare key
                del self._wandb_init["anonymous"]
            self._saving_callbacks: dict[int, Any] = {}
            self._logged_files: dict[str, float] = {}  # path: modification time logged

        @property
        @rank_zero_experiment
        def experiment(self):
            created = self._experiment is None
            run = super().experiment
            if created:
                for key in ("val/loss", "val/ppl"):
                    run.define_metric(
                        key, step_metric="trainer/global_step", step_sync=True, summary="min"
                    )
            return run

        def after_save_checkpoint(self, checkpoint_callback) -> None:
            if log_model:
                self._saving_callbacks[id(checkpoint_callback)] = checkpoint_callback

        @rank_zero_only
        def finalize(self, status: str) -> None:
            if status == "success" and log_model and self._experiment is not None:
                self.log_checkpoints()

        def log_checkpoints(self) -> None:
            """The newest best and last checkpoint files as versions of ``model-<run id>``
            (each once; a later stage's finalize finds them logged)."""
            import wandb

            callbacks = list(self._saving_callbacks.values())
            best = [
                (c.best_model_path, {c.monitor: float(c.best_model_score)})
                for c in callbacks
                if c.monitor not in (None, "step")
                and c.best_model_path
                and c.best_model_score is not None
            ]
            last = [(c.last_model_path, {}) for c in callbacks if c.last_model_path]
            for alias, found in (("best", best), ("last", last)):
                found = [(Path(p), meta) for p, meta in found if Path(p).exists()]
                if not found:
                    continue
                path, meta = max(found, key=lambda f: f[0].stat().st_mtime)
                mtime = path.stat().st_mtime
                if self._logged_files.get(f"{alias}:{path}") == mtime:
                    continue
                artifact = wandb.Artifact(
                    f"model-{self.experiment.id}",
                    type="model",
                    metadata={"original_filename": path.name} | meta,
                )
                if path.is_dir():  # a sharded checkpoint
                    artifact.add_dir(str(path), name="model.ckpt")
                else:
                    artifact.add_file(str(path), name="model.ckpt")
                self.experiment.log_artifact(artifact, aliases=[alias])
                self._logged_files[f"{alias}:{path}"] = mtime

        @rank_zero_only
        def log_metrics(self, metrics, step=None) -> None:
            if step is not None:
                self.step = max(self.step, step)  # W&B drops rows of an earlier step
            row = dict(_add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR))
            row["trainer/global_step"] = self.step
            self.experiment.log(row, step=self.step)

    run_id = wandb_run_id(kwargs["save_dir"]) if kwargs.get("save_dir") else None
    settings = {"x_transaction_log_flush_interval": flush_every_s} | dict(
        kwargs.pop("settings", None) or {}
    )
    return Logger(offline=mode == "offline", id=run_id, resume="allow", settings=settings, **kwargs)


def wandb_log_model(value) -> bool:
    """``logger.wandb.log_model``: true (the best and last checkpoints as W&B artifacts) or
    false."""
    if not isinstance(value, bool):
        raise LMForgeError(
            f"logger.wandb.log_model={value!r}: use true (the best and last checkpoints as W&B"
            " artifacts, at the end of training) or false"
        )
    return value


def wandb_run_id(run_dir: str) -> str:
    """The W&B run id of a run directory, made and stored (``<run_dir>/wandb/run_id``) on first
    use, so that a resumed run logs into the same W&B run. Only rank 0 logs to W&B, and only it
    writes the file."""
    from lightning.pytorch.utilities import rank_zero_only

    from lmforge.files import atomic_write_bytes

    path = Path(run_dir) / "wandb" / "run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    if rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, run_id.encode())
    return run_id


def csv_logger(**kwargs):
    """Lightning's ``CSVLogger``, except that an existing ``metrics.csv`` (a resumed run's) is
    continued rather than deleted; ``lmforge-train`` first cuts it back to the resumed step."""
    from lightning.fabric.loggers.logger import rank_zero_experiment
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class Writer(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            if os.path.isfile(self.metrics_file_path):
                with open(self.metrics_file_path, newline="") as f:
                    self.metrics_keys = sorted(next(csv.reader(f), []))

    class Logger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self):
            if self._experiment is None:
                os.makedirs(self.root_dir, exist_ok=True)
                self._experiment = Writer(log_dir=self.log_dir)
            return self._experiment

    return Logger(**kwargs)


def trim_metrics(path: str | Path, step: int) -> None:
    """Drop the rows of a metrics CSV logged at ``step`` or later (a resumed run logs them again)."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        rows = [r for r in reader if r.get("step") in (None, "") or int(r["step"]) < step]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    from lmforge.files import atomic_write_bytes

    atomic_write_bytes(path, out.getvalue().encode())
