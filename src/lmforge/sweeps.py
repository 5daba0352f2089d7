"""Optuna sweeps: a sampler seeded per trial, and the trials of a stored study read back.

hydra-optuna-sweeper builds its sampler from ``hydra.sweeper.sampler`` once per command, with
the seed of the config, and then opens the study. Resuming a stored study therefore restarts
the sampler's random state: Optuna's TPE sampler proposed trial 0's parameters again as the
resumed study's first trial (and trained it to trial 0's loss). ``TPESampler`` here reseeds
itself at the start of each trial from the configured seed and the trial's number in the study
(numpy's ``SeedSequence``), so trial n draws from the same seed whether the study ran in one go
or was resumed, and a resumed study, whose trials carry new numbers, adds new parameters.
Everything else is Optuna's TPE sampler, with the arguments of the sweeper's ``tpe`` config.

``study_trials`` reads every trial of a study from its storage (all the commands that ran it,
not one sweep directory) for ``lmforge-sweep``.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from lmforge.errors import LMForgeError


class TPESampler(optuna.samplers.TPESampler):
    def __init__(self, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self._base_seed = seed
        self._seeded_for: int | None = None

    def _seed_for(self, trial) -> None:
        """Before the trial's first draw: the random state of trial ``trial.number``."""
        if self._base_seed is None or self._seeded_for == trial.number:
            return
        self._seeded_for = trial.number
        seed = int(np.random.SeedSequence((self._base_seed, trial.number)).generate_state(1)[0])
        self._rng = np.random.RandomState(seed)
        self._random_sampler = optuna.samplers.RandomSampler(seed=seed)

    def infer_relative_search_space(self, study, trial):
        self._seed_for(trial)
        return super().infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        self._seed_for(trial)
        return super().sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        self._seed_for(trial)
        return super().sample_independent(study, trial, param_name, param_distribution)


def study_names(storage: str) -> list[str] | None:
    """The studies of an sqlite storage, read without writing (Optuna would create its tables
    in any file it is given); None for other databases."""
    if not storage.startswith("sqlite:///"):
        return None
    path = Path(storage.removeprefix("sqlite:///"))
    if not path.is_file():
        raise LMForgeError(
            f"{storage}: {path} does not exist; give the storage the sweep used"
            " (hydra.sweeper.storage=sqlite:///<file>)"
        )
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
            return [r[0] for r in con.execute("SELECT study_name FROM studies ORDER BY study_id")]
    except sqlite3.Error:
        raise LMForgeError(
            f"{storage}: {path} is not an Optuna storage (no studies table)"
        ) from None


def study_trials(storage: str, study_name: str | None) -> list[optuna.trial.FrozenTrial]:
    """Every trial of ``study_name`` in ``storage`` (an Optuna storage URL); the study may be
    left out when the storage holds one."""
    names = study_names(storage)
    if names is None and study_name is None:
        raise LMForgeError(f"name the study of {storage} to read with --study NAME")
    if names is not None and study_name is None:
        if len(names) != 1:
            found = ", ".join(names) if names else "none"
            raise LMForgeError(
                f"{storage} holds {len(names)} studies ({found}): name one with --study NAME"
            )
        study_name = names[0]
    if names is not None and study_name not in names:
        raise LMForgeError(
            f"{storage} holds no study {study_name!r}: its studies are {', '.join(names) or 'none'}"
        )
    return optuna.load_study(study_name=study_name, storage=storage).trials
