"""A run killed at any moment carries on as if nothing happened; faults fail cleanly.

The kill tests launch ``lmforge-train`` as a separate process, kill it (SIGKILL, or SIGTERM for
a graceful stop) at a random step after its first checkpoint, resume with ``resume=auto`` and
compare with an uninterrupted run: the final weights bitwise, the logged loss of every step.
Dropout is on, so the random-number streams must continue exactly too.
"""

from __future__ import annotations

import contextlib
import csv
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import lightning as L
import pytest
import torch

from lmforge.checkpoint import find_resume, load_checkpoint
from lmforge.cli.train import train
from lmforge.errors import LMForgeError
from lmforge.tasks.causal_lm import CausalLMTask
from lmforge.tasks.config import CausalLMConfig

from . import launch
from .conftest import ROOT, SHAKESPEARE, train_run, wandb_records, wandb_values

STEPS = 60


SETTINGS = [
    "logger=csv",
    "callbacks.text_samples=null",
    "callbacks.progress_bar=null",
    "trainer.enable_model_summary=false",
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=30",
    "trainer.log_every_n_steps=1",
    "callbacks.periodic_checkpoint.every_n_train_steps=10",
    "model.dropout=0.1",
]


def command(log_dir: Path, name: str, *overrides: str) -> list[str]:
    """``lmforge-train`` with the kill tests' settings, as a command for a process of its own
    (``train_run(log_dir, name, *SETTINGS, *overrides)`` trains the same in this process)."""
    return [
        sys.executable,
        "-m",
        "lmforge.cli.train",
        f"paths.log_dir={log_dir}",
        f"run_name={name}",
        *SETTINGS,
        *overrides,
    ]


def run(
    cmd: list[str], wandb: str = "disabled", fresh: bool = False, fsize: int | None = None
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a process of its own: forked from the launch server (tests/launch.py),
    or with ``fresh`` a new interpreter, as the console script runs."""
    env = os.environ | {"WANDB_MODE": wandb}
    if fresh:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    return launch.run(cmd, env=env, cwd=ROOT, fsize=fsize)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run_dir: Path) -> dict[int, str]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {int(r["step"]): r["train/loss"] for r in rows}


def interrupt(
    cmd: list[str], run_dir: Path, sig: int, rng: random.Random, wandb: str = "disabled"
) -> int:
    """Start ``cmd``, send ``sig`` once it has logged a random step past its first checkpoint;
    returns the exit status."""
    kill_after = rng.randint(12, 45)
    env = os.environ | {"WANDB_MODE": wandb}
    proc = launch.launch(cmd, env=env, cwd=ROOT)
    metrics = run_dir / "csv" / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "checkpoints" / "step000010.ckpt").exists() and metrics.exists():
            logged = [r for r in metrics.read_text().splitlines()[1:] if r]
            if len(logged) >= kill_after:
                proc.send_signal(sig)
                break
        time.sleep(0.005)
    status = proc.wait(timeout=300)
    proc.result()
    assert status != 0, "the run finished before it could be interrupted"
    return status


def final_weights(run_dir: Path, steps: int = STEPS) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == steps
    return ckpt["state_dict"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def assert_same_run(
    resumed: Path, whole: Path, proc: subprocess.CompletedProcess, steps: int = STEPS
) -> None:
    """The logged loss of every step (to the last digit printed), then the final weights,
    bitwise; a failure names the checkpoint the run resumed from and the first step that
    differs."""
    where = next(
        (line for line in (proc.stdout + proc.stderr).splitlines() if "resuming from" in line),
        "no 'resuming from' line",
    )
    got, want = losses(resumed), losses(whole)
    differ = sorted(s for s in want.keys() | got.keys() if got.get(s) != want.get(s))
    assert not differ, f"{where}; the loss differs from step {differ[0]} ({len(differ)} steps)"
    assert_bitwise_equal(final_weights(resumed, steps), final_weights(whole, steps))


def kill_and_resume(
    logs: Path, task: str, name: str, common: list[str], seed: int
) -> subprocess.CompletedProcess:
    """SIGKILL `lmforge-train <common> run_name=<name>` at a random step past its first
    checkpoint, then run it again with resume=auto to the end; returns the resumed run."""
    cmd = command(logs, name, *common)
    interrupt(cmd, logs / task / name, signal.SIGKILL, random.Random(seed))
    return ok(run(command(logs, name, *common, "resume=auto")))


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    logs = tmp_path_factory.mktemp("kill")
    corpus = logs / "tiny.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:60_000])
    common = [
        "model=gpt-nano",
        "data.batch_size=64",  # steps slow enough to be caught mid-run
        f"data.dir={logs}/data",
        f"data.prepare.source.paths=[{corpus}]",
    ]
    train_run(logs, "whole", *SETTINGS, *common)  # the reference, in this process
    return logs, common


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_killed_gpt_run_resumes_bitwise(gpt, sig):
    logs, common = gpt
    name = f"killed-{sig.name}"
    status = interrupt(
        command(logs, name, *common), logs / "causal_lm" / name, sig, random.Random(sig)
    )
    if sig == signal.SIGTERM:
        assert status == 75  # saved, then "requeue me"
        assert list((logs / "causal_lm" / name / "checkpoints").glob("*-preempted.ckpt"))
    proc = ok(run(command(logs, name, *common, "resume=auto")))
    whole, resumed = logs / "causal_lm" / "whole", logs / "causal_lm" / name
    assert_same_run(resumed, whole, proc)
    assert len(losses(whole)) == STEPS


def test_killed_bert_run_resumes_bitwise(tmp_path):
    """Masked LM: the masks, like the windows and dropout, continue exactly (30 steps)."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:60_000])
    common = [
        "experiment=bert_shakespeare_mlm_cpu",
        "model=bert-nano",
        "data.batch_size=16",
        f"data.dir={tmp_path}/wp",
        f"data.prepare.source.paths=[{corpus}]",
        "data.prepare.tokenizer.vocab_size=500",
        "data.max_val_windows=16",
        "trainer.max_steps=30",
    ]
    train_run(tmp_path, "whole", *SETTINGS, *common)
    runs = tmp_path / "masked_lm"
    proc = kill_and_resume(tmp_path, "masked_lm", "killed", common, seed=3)
    assert_same_run(runs / "killed", runs / "whole", proc, steps=30)


@pytest.fixture(scope="module")
def dpo(gpt):
    """DPO from the gpt fixture's model on short synthetic pairs (8 pairs a batch, 7 batches an
    epoch: the kill lands mid-epoch), reference log-probs precomputed; the uninterrupted run."""
    import json

    logs, _ = gpt
    polite = ["Gladly, here it is.", "With pleasure, friend.", "Of course, good sir."]
    rude = ["No. Go away.", "Ask someone else.", "Why should I care?"]
    words = [
        "the",
        "king",
        "and",
        "his",
        "lords",
        "went",
        "forth",
        "to",
        "see",
        "the",
        "queen",
        "at",
        "court",
    ]
    pairs = [
        {
            "instruction": f"Tell of {w}",
            "input": "",
            "chosen": polite[i % 3],
            "rejected": rude[i % 3],
        }
        for i, w in enumerate(words * 6)
    ]
    for split, part in (("train", pairs[:56]), ("val", pairs[56:66])):
        (logs / f"pairs_{split}.json").write_text(json.dumps(part))
    common = [
        "experiment=dpo_gpt",
        f"init_from={logs / 'causal_lm' / 'whole' / 'checkpoints' / 'last.ckpt'}",
        f"data.train={logs / 'pairs_train.json'}",
        f"data.val={logs / 'pairs_val.json'}",
        "data.test=null",
        "data.max_len=32",
        "data.prompt='{instruction} {input}: '",
        "data.prompt_no_input='{instruction}: '",
        "trainer.max_epochs=-1",
        "trainer.check_val_every_n_epoch=null",  # validation every 30 batches, across epochs
        "task.precompute_reference=true",
        "task.optim.lr=1e-3",
    ]
    train_run(logs, "dpo-whole", *SETTINGS, *common)
    return logs, common


def test_killed_dpo_run_resumes_bitwise(dpo):
    """The data order across epochs, dropout, and the reference log-probs (read back from
    beside the run) continue exactly."""
    logs, common = dpo
    runs = logs / "dpo"
    proc = kill_and_resume(logs, "dpo", "dpo-killed", common, seed=5)
    assert "reference log-probs read from" in proc.stdout + proc.stderr
    assert_same_run(runs / "dpo-killed", runs / "dpo-whole", proc)


def test_precomputed_reference_logps_are_the_reference_models(dpo):
    """The cached log-probs equal those of the init_from model computed here, pair by pair."""
    from omegaconf import OmegaConf

    from lmforge.checkpoint import load_model
    from lmforge.config import build
    from lmforge.tasks.dpo import DPODataModule, collate, pair_logps

    logs, _ = dpo
    run_dir = logs / "dpo" / "dpo-whole"
    cache = load_checkpoint(run_dir / "reference_logps.pt")
    data = build(OmegaConf.load(run_dir / "config.yaml").data, "data")
    loaded = load_model(logs / "causal_lm" / "whole" / "checkpoints" / "last.ckpt")
    dm = DPODataModule(data, loaded.tokenizer, settings=loaded.tokenizer_settings)
    dm.setup()
    for split in ("train", "val"):
        batch = collate(dm.sets[split], dm.pad_id)
        with torch.no_grad():
            chosen, rejected = pair_logps(loaded.model.eval(), batch)
        want = torch.stack([chosen, rejected], 1)
        assert cache[split].shape == want.shape
        torch.testing.assert_close(cache[split], want, rtol=0, atol=1e-4)


# In-process runs of gpt-nano on the tiny corpus (conftest's train_cfg).
def tiny(train_cfg, *overrides: str):
    return train_cfg(
        "run_name=r",
        "logger=csv",
        "callbacks.text_samples=null",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=0",  # no validation: only the periodic checkpoints
        "callbacks.periodic_checkpoint.every_n_train_steps=10",
        "model.dropout=0.1",
        *overrides,
    )


def test_truncated_newest_checkpoint_falls_back_to_the_previous(train_cfg, tmp_path):
    train(tiny(train_cfg, "trainer.max_steps=30"))
    ckpts = Path(tiny(train_cfg).paths.output_dir) / "checkpoints"
    for name in ("step000030.ckpt", "last.ckpt"):  # both of step 30: cut in half
        data = (ckpts / name).read_bytes()
        (ckpts / name).write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        path, step = find_resume(ckpts, set_aside_corrupt=False)
    assert (path.name, step) == ("step000020.ckpt", 20)
    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        train(tiny(train_cfg, "trainer.max_steps=40", "resume=auto"))
    resumed = load_checkpoint(ckpts / "last.ckpt")
    assert resumed["global_step"] == 40
    reference_dir = tmp_path / "reference"
    cfg = tiny(train_cfg, "trainer.max_steps=40")
    cfg.paths.output_dir = str(reference_dir)
    train(cfg)
    assert_bitwise_equal(
        resumed["state_dict"],
        load_checkpoint(reference_dir / "checkpoints" / "last.ckpt")["state_dict"],
    )


def test_a_kill_between_the_final_checkpoint_and_last_ckpt_leaves_no_stale_last(train_cfg):
    """Killed after step000030.ckpt was written, before last.ckpt: last.ckpt still holds step
    20. Resuming at the final step trains nothing more, yet last.ckpt becomes step 30."""
    train(tiny(train_cfg, "trainer.max_steps=30", "callbacks.periodic_checkpoint.save_top_k=-1"))
    ckpts = Path(tiny(train_cfg).paths.output_dir) / "checkpoints"
    (ckpts / "step000020.ckpt").replace(ckpts / "last.ckpt")
    train(tiny(train_cfg, "trainer.max_steps=30", "resume=auto"))
    assert (ckpts / "last.ckpt").read_bytes() == (ckpts / "step000030.ckpt").read_bytes()
    assert load_checkpoint(ckpts / "last.ckpt")["global_step"] == 30


class NaNAtStep3(CausalLMTask):
    """A fault injected into the loss of the 4th optimizer step (global_step 3), or of every
    step from ``from_step`` on."""

    from_step: int | None = None

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        step = self.trainer.global_step
        bad = step == 3 if self.from_step is None else step >= self.from_step
        return loss * float("nan") if bad else loss


class NaNFromStep2(NaNAtStep3):
    from_step = 2


@dataclass
class NaNAtStep3Config(CausalLMConfig):
    module: ClassVar[str] = f"{__name__}.NaNAtStep3"


@dataclass
class NaNFromStep2Config(CausalLMConfig):
    module: ClassVar[str] = f"{__name__}.NaNFromStep2"


def test_nan_is_skipped_under_skip(train_cfg):
    cfg = tiny(
        train_cfg,
        "trainer.max_steps=8",
        "task.on_nonfinite=skip",
        f"task._target_={__name__}.NaNAtStep3Config",
    )
    train(cfg)
    ckpt = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 8 and ckpt["skipped_steps"] == 1
    adam_steps = {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert adam_steps == {7}  # AdamW applied 7 of the 8 steps
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        skipped = [r for r in csv.DictReader(f) if r.get("train/skipped_steps")]
    assert [(r["step"], float(r["train/skipped_steps"])) for r in skipped] == [("3", 1.0)]


def test_skipping_stops_after_max_skipped_steps_in_a_row(train_cfg):
    cfg = tiny(
        train_cfg,
        "trainer.max_steps=20",
        "task.on_nonfinite=skip",
        "task.max_skipped_steps=3",
        f"task._target_={__name__}.NaNFromStep2Config",
    )
    with pytest.raises(LMForgeError, match="4 steps in a row were non-finite .*step 6"):
        train(cfg)


def test_nan_stops_the_run_under_stop_keeping_the_last_good_checkpoint(train_cfg):
    cfg = tiny(
        train_cfg,
        "trainer.max_steps=8",
        "callbacks.periodic_checkpoint.every_n_train_steps=2",
        f"task._target_={__name__}.NaNAtStep3Config",
    )
    with pytest.raises(
        LMForgeError, match=r"non-finite values at step 4 \(loss .*, gradient norm nan\)"
    ):
        train(cfg)
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == [
        "last.ckpt",
        "step000002.ckpt",
    ]  # nothing saved after the fault
    assert load_checkpoint(ckpts / "last.ckpt")["global_step"] == 2


def test_preempted_run_continues_its_offline_wandb_run(gpt):
    """SIGTERM, resume: one W&B run (id kept in <run>/wandb/run_id) whose history, read back
    from W&B's own transaction logs, is the uninterrupted run's, step for step."""
    logs, common = gpt
    name = "preempted-wandb"
    cmd = command(logs, name, *common, "logger=default")
    run_dir = logs / "causal_lm" / name
    assert interrupt(cmd, run_dir, signal.SIGTERM, random.Random(7), wandb="offline") == 75
    ok(run([*cmd, "resume=auto"], wandb="offline"))
    run_id = (run_dir / "wandb" / "run_id").read_text()
    # W&B writes each process's transaction log into its own offline-run-<time>-<id> folder;
    # both belong to this run and `wandb sync <run>/wandb` uploads them in start order.
    parts = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(parts) == 2
    histories = []
    for part in parts:
        records = list(wandb_records(part))
        assert {r.run.run_id for r in records if r.HasField("run")} == {run_id}
        rows = [wandb_values(r.history.item) for r in records]
        histories.append({int(r["_step"]): r for r in rows if "train/loss" in r})
    first, second = histories
    resumed_at = min(second)
    assert resumed_at == max(first) + 1  # saved at the boundary after the last logged step
    assert sorted(first) == list(range(max(first) + 1))  # no gap before the kill
    assert sorted(second) == list(range(resumed_at, STEPS))  # no gap after the resume
    history = {s: float(r["train/loss"]) for s, r in (first | second).items()}
    assert history == {s: float(v) for s, v in losses(logs / "causal_lm" / "whole").items()}
    assert {int(r["trainer/global_step"]) for r in second.values()} == set(second)


def test_resume_refuses_another_model_or_tokenizer(train_cfg, tmp_path):
    train(tiny(train_cfg, "trainer.max_steps=10"))
    with pytest.raises(LMForgeError, match=r"different model: n_layer=2 \(this run: 3\)"):
        train(tiny(train_cfg, "trainer.max_steps=20", "resume=auto", "model.n_layer=3"))
    vocab = load_checkpoint(Path(tiny(train_cfg).paths.output_dir) / "checkpoints" / "last.ckpt")[
        "hyper_parameters"
    ]["model"]["vocab_size"]
    other = tmp_path / "lower.txt"  # fewer distinct characters: another char tokenizer
    other.write_text(SHAKESPEARE.read_text()[:60_000].lower())
    with pytest.raises(LMForgeError, match=rf"another tokenizer .* \(vocabulary {vocab} vs \d+\)"):
        train(
            tiny(
                train_cfg,
                "trainer.max_steps=20",
                "resume=auto",
                f"data.dir={tmp_path}/lower",
                f"data.prepare.source.paths=[{other}]",
                f"model.vocab_size={vocab}",
            )
        )


def test_a_named_run_with_checkpoints_is_not_restarted_by_accident(train_cfg):
    train(tiny(train_cfg, "trainer.max_steps=10"))
    with pytest.raises(LMForgeError, match="already holds checkpoints .* resume=auto"):
        train(tiny(train_cfg, "trainer.max_steps=10"))


def test_full_disk_while_saving_keeps_the_earlier_checkpoints(gpt):
    """The file-size limit (RLIMIT_FSIZE) makes the next checkpoint write fail like a full disk."""
    logs, common = gpt
    name = "disk"
    train_run(logs, name, *SETTINGS, *common, "trainer.max_steps=10")
    ckpts = logs / "causal_lm" / name / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpts.glob("*.ckpt")}

    # RLIMIT_FSIZE of 100 kB, SIGXFSZ ignored: a failed write, not a killed process
    proc = run(command(logs, name, *common, "trainer.max_steps=20", "resume=auto"), fsize=100_000)
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "writing checkpoint" in error[0] and "intact" in error[0]
    after = {p.name: p.read_bytes() for p in ckpts.glob("*.ckpt")}
    assert after == before  # nothing earlier damaged, nothing half-written left
    assert not list(ckpts.glob("*.tmp"))


def test_corrupt_checkpoint_is_refused_in_one_line(train_cfg, tmp_path):
    from lmforge.checkpoint import load_model

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(
        LMForgeError, match="resume=.*bad.ckpt: the checkpoint is incomplete or corrupt"
    ):
        train(tiny(train_cfg, f"resume={bad}"))
    with pytest.raises(LMForgeError, match="resume=.*nowhere.ckpt: no such checkpoint"):
        train(tiny(train_cfg, f"resume={tmp_path}/nowhere.ckpt"))
    with pytest.raises(
        LMForgeError, match="cannot be read .* corrupt or not an lmforge checkpoint"
    ):
        load_model(bad)


class RecordSaves(L.Callback):
    """Notes the optimizer step and the micro-batches processed at every checkpoint saved."""

    saves: list[tuple[int, int]] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        processed = trainer.fit_loop.epoch_loop.batch_progress.total.processed
        RecordSaves.saves.append((trainer.global_step, processed))


def test_checkpoints_are_taken_at_optimizer_step_boundaries_once(train_cfg):
    """With gradient accumulation the first micro-batches of a resumed run end with the step
    counter still at the resumed step: nothing may be saved there (Lightning saved that
    half-accumulated state as step000020-v1.ckpt and last.ckpt, which the next resume took)."""
    accumulate = (
        "trainer.accumulate_grad_batches=3",
        f"+callbacks.saves._target_={__name__}.RecordSaves",
    )
    train(tiny(train_cfg, "trainer.max_steps=20", *accumulate))
    RecordSaves.saves = []
    train(tiny(train_cfg, "trainer.max_steps=30", "resume=auto", *accumulate))
    assert all(processed == 3 * step for step, processed in RecordSaves.saves)
    assert [step for step, _ in RecordSaves.saves] == [30, 30]  # step000030.ckpt, last.ckpt
    ckpts = Path(tiny(train_cfg).paths.output_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == [
        "last.ckpt",
        "step000020.ckpt",
        "step000030.ckpt",
    ]


def test_the_savers_of_one_step_write_each_state_once(train_cfg):
    """At step 4 the periodic saver writes step000004.ckpt and last.ckpt, one state: written
    once, last.ckpt a hard link. The best saver's file, after the validation, holds another
    state (the validation done) and is written itself. A later last.ckpt replaces the link and
    leaves the file it was linked to as it was."""
    settings = (
        "run_name=r",
        "logger=csv",
        "callbacks.text_samples=null",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=2",
        "callbacks.periodic_checkpoint.every_n_train_steps=2",
    )
    train(train_cfg(*settings, "trainer.max_steps=4"))
    ckpts = Path(train_cfg().paths.output_dir) / "checkpoints"
    (best,) = ckpts.glob("step000004-val_loss*.ckpt")
    step4, last = ckpts / "step000004.ckpt", ckpts / "last.ckpt"
    assert last.stat().st_ino == step4.stat().st_ino != best.stat().st_ino
    assert step4.stat().st_nlink == 2
    assert load_checkpoint(best)["global_step"] == 4
    inode = step4.stat().st_ino
    train(train_cfg(*settings, "trainer.max_steps=6", "resume=auto"))  # from step 4
    assert step4.stat().st_ino == inode and step4.stat().st_nlink == 1
    assert load_checkpoint(step4)["global_step"] == 4  # intact, resumable
    assert load_checkpoint(last)["global_step"] == 6 and last.stat().st_ino != inode


def zero_inside_a_tensor(path: Path, n: int = 4000) -> None:
    """Zero ``n`` bytes in the middle of a checkpoint's largest tensor record; the zip structure
    (and so torch.load) stays intact."""
    with zipfile.ZipFile(path) as archive:
        tensors = [r for r in archive.infolist() if "/data/" in r.filename]  # not data.pkl
        record = max(tensors, key=lambda r: r.file_size)
    data = bytearray(path.read_bytes())
    header = record.header_offset
    name_len, extra_len = struct.unpack("<HH", data[header + 26 : header + 30])
    start = header + 30 + name_len + extra_len + (record.file_size - n) // 2
    data[start : start + n] = bytes(n)
    path.write_bytes(data)


def test_damaged_checkpoint_is_detected_set_aside_and_retention_holds(train_cfg):
    train(tiny(train_cfg, "trainer.max_steps=20"))
    ckpts = Path(tiny(train_cfg).paths.output_dir) / "checkpoints"
    for name in ("step000020.ckpt", "last.ckpt"):
        zero_inside_a_tensor(ckpts / name)
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 20  # unnoticed
    with pytest.raises(LMForgeError, match=r"cannot be read \(record .* fails its CRC-32 check\)"):
        load_checkpoint(ckpts / "last.ckpt")
    with pytest.raises(LMForgeError, match="last.ckpt: the checkpoint is incomplete or corrupt"):
        train(tiny(train_cfg, f"resume={ckpts / 'last.ckpt'}"))
    with pytest.warns(UserWarning, match=r"step000020.ckpt is .* corrupt.*renamed to .*\.corrupt"):
        train(tiny(train_cfg, "trainer.max_steps=40", "resume=auto"))  # from step 10
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "last.ckpt",
        "last.ckpt.corrupt",  # set aside, never deleted
        "step000020.ckpt.corrupt",
        "step000030.ckpt",  # save_top_k=2, the resumed-from step000010.ckpt included
        "step000040.ckpt",
    ]
    assert load_checkpoint(ckpts / "last.ckpt")["global_step"] == 40


def test_a_moved_run_directory_resumes_into_its_own_files(train_cfg, tmp_path):
    """Lightning forgets the checkpoint paths of another directory: last-v1.ckpt beside a stale
    last.ckpt, and the old step files never removed."""
    train(tiny(train_cfg, "trainer.max_steps=20"))
    moved = tmp_path / "moved"
    shutil.copytree(tiny(train_cfg).paths.output_dir, moved)
    cfg = tiny(train_cfg, "trainer.max_steps=40", "resume=auto")
    cfg.paths.output_dir = str(moved)
    train(cfg)
    ckpts = moved / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == [
        "last.ckpt",
        "step000030.ckpt",
        "step000040.ckpt",
    ]
    assert load_checkpoint(ckpts / "last.ckpt")["global_step"] == 40


def test_resume_auto_stops_when_no_checkpoint_can_be_read(train_cfg):
    train(tiny(train_cfg, "trainer.max_steps=20"))
    ckpts = Path(tiny(train_cfg).paths.output_dir) / "checkpoints"
    for path in ckpts.glob("*.ckpt"):
        path.write_bytes(path.read_bytes()[:1000])
    for _ in range(2):  # again once the files are set aside as *.corrupt
        with (
            pytest.warns(UserWarning) if any(ckpts.glob("*.ckpt")) else contextlib.nullcontext(),
            pytest.raises(LMForgeError, match=r"resume=auto: no checkpoint in .* can be read"),
        ):
            train(tiny(train_cfg, "trainer.max_steps=30", "resume=auto"))


def test_resume_auto_before_the_first_checkpoint_logs_each_step_once(train_cfg):
    no_checkpoints = ("trainer.max_steps=5", "callbacks.periodic_checkpoint=null")
    train(tiny(train_cfg, *no_checkpoints))
    train(tiny(train_cfg, *no_checkpoints, "resume=auto"))  # a fresh start: the logs too
    assert sorted(losses(Path(tiny(train_cfg).paths.output_dir))) == list(range(5))


@dataclass
class SigtermConfig(CausalLMConfig):
    module: ClassVar[str] = f"{__name__}.SigtermInSetup"


class SigtermInSetup(CausalLMTask):
    """A SIGTERM while the model is built, before the first training step."""

    config_class = SigtermConfig

    def __init__(self, *args, **kwargs) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        super().__init__(*args, **kwargs)


def test_sigterm_before_the_first_step_exits_75_with_one_line(tmp_path, tiny_text):
    cmd = command(
        tmp_path,
        "early",
        "model=gpt-nano",
        f"data.dir={tmp_path}/data",
        f"data.prepare.source.paths=[{tiny_text}]",
        f"task._target_={__name__}.SigtermConfig",
    )
    proc = run(cmd, fresh=True)  # the console script's own exit status
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "stopped by SIGTERM before the first training step: nothing to save" in proc.stdout
    assert "Traceback" not in proc.stderr
