"""Feed bad inputs to every lmforge command and check that each is refused cleanly.

    python bench/fuzz_inputs.py                  # all cases, 2 processes at a time
    python bench/fuzz_inputs.py --only generate  # the cases whose name holds "generate"
    python bench/fuzz_inputs.py --keep           # keep the sandbox directory for a look

Everything happens in a sandbox directory this script creates (nothing is written in the
checkout): a tiny gpt-nano run is trained once, then each case runs as its own process in a
directory of its own, beside "user files" placed where the bad input aims (a foreign non-empty
directory as data.dir or export target, an existing file, a copy of a finished run...).

For each case the table gives the exit status, the line that says what went wrong, whether it
is one ``error: ...`` line, whether a traceback was printed, and the user files that changed:
every file of the case's directory is hashed before and after (and a foreign directory must gain
no new file). The script exits 1 when a bad input exits 0, is refused without a one-line error
(Hydra's own override errors excepted), prints a traceback, or changes a user file; a case
marked "expect 0" is a warning, not an error, and must exit 0 without a traceback.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "tinyshakespeare" / "input.txt"
TRACEBACK = "Traceback (most recent call last)"


@dataclass
class Case:
    name: str
    tool: str  # train, prepare, eval, generate, export, consolidate
    args: list[str]  # {S}: the sandbox, {C}: this case's directory, {ckpt}: the trained checkpoint
    setup: Callable[[Path, Path], None] | None = None  # (sandbox, case dir): the user files
    expect_ok: bool = False  # a warning, not an error: must exit 0
    guard: str = "**/*"  # the files of the case directory that must not change
    foreign: list[str] = field(default_factory=list)  # directories that must gain no file
    file_size_limit: int | None = None  # RLIMIT_FSIZE of the process (a full disk)
    needs_non_root: bool = False  # permissions do not stop root
    hydra_error: bool = False  # refused by Hydra's own override parser (its message, exit 1)


@dataclass
class Result:
    case: Case
    rc: int | None = None
    error: str = ""
    one_line: bool = False  # an "error: ..." line (lmforge's, or argparse's usage error)
    traceback: bool = False
    changed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str = ""

    @property
    def failed(self) -> bool:
        if self.skipped:
            return False
        if self.traceback or self.changed:
            return True
        if self.case.expect_ok:
            return self.rc != 0
        return self.rc == 0 or not (self.one_line or self.case.hydra_error)


# ---------------------------------------------------------------- the user files of the cases


def base_run(sandbox: Path) -> Path:
    return sandbox / "base" / "logs" / "causal_lm" / "base"


def copy_data(sandbox: Path, case: Path) -> None:
    """The prepared token set of the base run (up to date: nothing re-prepares it)."""
    shutil.copytree(sandbox / "base" / "data", case / "data")


def copy_run(sandbox: Path, case: Path, name: str = "X") -> Path:
    copy_data(sandbox, case)
    run = case / "logs" / "causal_lm" / name
    shutil.copytree(base_run(sandbox), run)
    return run


def user_dir(path: Path) -> None:
    """A directory of the user's own, with files lmforge did not write."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("my notes: do not delete\n")
    (path / "thesis").mkdir(exist_ok=True)
    (path / "thesis" / "chapter1.md").write_text("# Chapter 1\n")


def user_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a file of the user's own\n")


def truncated(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: len(data) // 2])


def zeroed_in_a_tensor(src: Path, dst: Path) -> None:
    """256 bytes of the largest tensor zeroed: the archive's structure stays intact."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        big = max(z.infolist(), key=lambda i: i.file_size)
    start = big.header_offset + 30 + len(big.filename) + len(big.extra) + 64
    data[start : start + 256] = bytes(256)
    dst.write_bytes(data)


def zeroed_middle(src: Path, dst: Path) -> None:
    """The middle 40% of the file zeroed (headers and data)."""
    data = bytearray(src.read_bytes())
    n = len(data)
    data[int(n * 0.3) : int(n * 0.7)] = bytes(int(n * 0.7) - int(n * 0.3))
    dst.write_bytes(data)


def ckpt(sandbox: Path) -> Path:
    return base_run(sandbox) / "checkpoints" / "last.ckpt"


def setups(*fns: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def run(sandbox: Path, case: Path) -> None:
        for fn in fns:
            fn(sandbox, case)

    return run


# ---------------------------------------------------------------------------------- the cases

TRAIN = {
    "model": "gpt-nano",
    "trainer.max_steps": "4",
    "logger": "csv",
    "callbacks": "default",
    "paths.root_dir": "{C}",
    "paths.log_dir": "{C}/logs",
    "data.dir": "{C}/data",
    "data.prepare.source.paths": "[{S}/tiny.txt]",
    "trainer.enable_model_summary": "false",
    "run_name": "fuzz",
}


def train(*overrides: str, **replace: str) -> list[str]:
    """The tiny run's overrides, ``replace`` (keys with __ for dots) taking the place of its own."""
    args = TRAIN | {k.replace("__", "."): v for k, v in replace.items()}
    return [f"{k}={v}" for k, v in args.items()] + list(overrides)


PREPARE = ["paths.root_dir={C}", "data.dir={C}/out", "data.prepare.source.paths=[{S}/tiny.txt]"]
GENERATE = ["ckpt_path={ckpt}", "max_new_tokens=5"]
EVAL = ["ckpt_path={ckpt}", "text_file={S}/small.txt"]


def cases() -> list[Case]:
    c: list[Case] = []
    add = c.append

    # lmforge-train: the cases of issue 18
    for override in [
        "trainer.accumulate_grad_batches=0",
        "trainer.val_check_interval=0",
        "seed=abc",
        "trainer.max_steps=-5",
        "trainer.precision=banana",
        "trainer.gradient_clip_val=-1",
    ]:
        key, value = override.split("=")
        add(Case(f"train {override}", "train", train(**{key.replace(".", "__"): value})))
    add(
        Case(
            "train logger.wandb.mode=sometimes",
            "train",
            train("logger.wandb.mode=sometimes", logger="default"),
        )
    )
    add(
        Case(
            "train run_name escaping the log dir",
            "train",
            train(run_name="../../outside/x"),
            setup=lambda s, d: user_dir(d / "outside"),
            foreign=["outside"],
        )
    )
    add(Case("train run_name= (empty)", "train", train(run_name="")))
    add(
        Case(
            "train refused resume (model.n_layer=3 on a run of 2)",
            "train",
            train("resume=auto", "model.n_layer=3", run_name="X"),
            setup=lambda s, d: copy_run(s, d),
        )
    )
    add(
        Case(
            "train data.dir holding the user's files",
            "train",
            train(data__dir="{C}/mine"),
            setup=lambda s, d: user_dir(d / "mine"),
            foreign=["mine"],
        )
    )
    add(
        Case(
            "train data.dir is a file",
            "train",
            train(data__dir="{C}/afile"),
            setup=lambda s, d: user_file(d / "afile"),
        )
    )
    add(
        Case(
            "train paths.log_dir is a file",
            "train",
            train(paths__log_dir="{C}/afile"),
            setup=setups(copy_data, lambda s, d: user_file(d / "afile")),
        )
    )
    add(
        Case(
            "train read-only logs directory",
            "train",
            train(paths__log_dir="{C}/ro"),
            setup=setups(copy_data, lambda s, d: (d / "ro").mkdir(mode=0o555)),
            needs_non_root=True,
        )
    )
    add(
        Case(
            "train resume= zeroed bytes in a tensor",
            "train",
            train("resume={C}/zeroed.ckpt", run_name="Y"),
            setup=setups(copy_data, lambda s, d: zeroed_in_a_tensor(ckpt(s), d / "zeroed.ckpt")),
        )
    )
    add(
        Case(
            "train resume= zeroed middle",
            "train",
            train("resume={C}/zeroed.ckpt", run_name="Y"),
            setup=setups(copy_data, lambda s, d: zeroed_middle(ckpt(s), d / "zeroed.ckpt")),
        )
    )

    def all_unreadable(s: Path, d: Path) -> None:
        run = copy_run(s, d)
        for path in (run / "checkpoints").glob("*.ckpt"):
            truncated(path, path)

    add(
        Case(
            "train resume=auto, every checkpoint unreadable",
            "train",
            train("resume=auto", run_name="X"),
            setup=all_unreadable,
        )
    )

    # lmforge-train: the bad-input table of docs/reliability.md
    add(Case("train model.n_layr=2", "train", train("model.n_layr=2"), hydra_error=True))
    for override in [
        "model.n_layer=abc",
        "task.optim.lr=-1",
        "data.seq_len=4096",
        "data.batch_size=0",
        "model.vocab_size=10",
        "model.n_head=5",
        "task.on_nonfinite=maybe",
        "task.compile=sometimes",
        "data.global_batch_tokens=1000",
    ]:
        add(Case(f"train {override}", "train", train(override), setup=copy_data))

    def shard(edit: Callable[[Path], None]) -> Callable[[Path, Path], None]:
        return setups(copy_data, lambda s, d: edit(d / "data"))

    add(
        Case(
            "train a shard missing",
            "train",
            train("data.prepare=null"),
            setup=shard(lambda p: (p / "val.bin").unlink()),
        )
    )
    add(
        Case(
            "train a shard truncated",
            "train",
            train("data.prepare=null"),
            setup=shard(lambda p: truncated(p / "val.bin", p / "val.bin")),
        )
    )
    add(
        Case(
            "train meta.json not JSON",
            "train",
            train("data.prepare=null"),
            setup=shard(lambda p: (p / "meta.json").write_text("{not json")),
        )
    )
    add(
        Case(
            "train source files missing",
            "train",
            train(data__dir="{C}/new", data__prepare__source__paths="[{C}/nothere*.txt]"),
        )
    )
    add(
        Case(
            "train masked-LM on a char tokenizer",
            "train",
            train(model="bert-nano", task="masked_lm"),
            setup=copy_data,
        )
    )
    add(
        Case(
            "train resume= a missing file",
            "train",
            train("resume={C}/nowhere.ckpt"),
            setup=copy_data,
        )
    )
    add(
        Case(
            "train resume= a truncated checkpoint",
            "train",
            train("resume={C}/bad.ckpt", run_name="Y"),
            setup=setups(copy_data, lambda s, d: truncated(ckpt(s), d / "bad.ckpt")),
        )
    )

    def newest_cut(s: Path, d: Path) -> None:
        run = copy_run(s, d)
        truncated(run / "checkpoints" / "step000004.ckpt", run / "checkpoints" / "step000004.ckpt")

    add(
        Case(
            "train resume=auto, the newest checkpoint cut short",
            "train",
            train("resume=auto", run_name="X", trainer__max_steps="6"),
            setup=newest_cut,
            expect_ok=True,
            guard="none",
        )
    )
    add(
        Case(
            "train resume on another tokenizer",
            "train",
            train(
                "resume=auto",
                "data.prepare.tokenizer.kind=bpe",
                "+data.prepare.tokenizer.vocab_size=300",
                run_name="X",
                data__dir="{C}/bpe",
            ),
            setup=lambda s, d: copy_run(s, d),
        )
    )
    add(
        Case(
            "train a named run restarted without resume",
            "train",
            train(run_name="X"),
            setup=lambda s, d: copy_run(s, d),
        )
    )
    add(
        Case(
            "train a full disk while saving",
            "train",
            train("resume=auto", run_name="X", trainer__max_steps="8"),
            setup=lambda s, d: copy_run(s, d),
            guard="logs/causal_lm/X/checkpoints/*",
            file_size_limit=200_000,
        )
    )
    add(
        Case(
            "train -m with a 2-process strategy",
            "train",
            ["-m", *train("trainer=ddp_cpu", "seed=1,2")],
            setup=copy_data,
        )
    )

    # lmforge-prepare
    add(
        Case(
            "prepare data.dir holding the user's files",
            "prepare",
            [*PREPARE, "data.dir={C}/mine"],
            setup=lambda s, d: user_dir(d / "mine"),
            foreign=["mine"],
        )
    )
    add(
        Case(
            "prepare data.dir is a file",
            "prepare",
            [*PREPARE, "data.dir={C}/afile"],
            setup=lambda s, d: user_file(d / "afile"),
        )
    )
    add(
        Case(
            "prepare source files missing",
            "prepare",
            [*PREPARE, "data.prepare.source.paths=[{C}/nothere*.txt]"],
        )
    )
    add(
        Case(
            "prepare a malformed JSONL line",
            "prepare",
            [*PREPARE, "data/source=jsonl", "data.prepare.source.paths=[{C}/c.jsonl]"],
            setup=lambda s, d: (d / "c.jsonl").write_text('{"text": "a b c"}\n{oops\n'),
        )
    )
    add(
        Case(
            "prepare a binary file as text",
            "prepare",
            [*PREPARE, "data.prepare.source.paths=[{C}/b.txt]"],
            setup=lambda s, d: (d / "b.txt").write_bytes(b"\x00\x01\x02binary\x00\n" * 50),
        )
    )
    add(
        Case(
            "prepare invalid UTF-8",
            "prepare",
            [*PREPARE, "data.prepare.source.paths=[{C}/l1.txt]"],
            setup=lambda s, d: (d / "l1.txt").write_bytes("café crème\n".encode("latin-1")),
        )
    )
    add(
        Case(
            "prepare tokenizer kind=banana",
            "prepare",
            [*PREPARE, "data.prepare.tokenizer.kind=banana"],
        )
    )
    add(
        Case(
            "prepare a BPE of 10 tokens",
            "prepare",
            [*PREPARE, "data.prepare.tokenizer.kind=bpe", "+data.prepare.tokenizer.vocab_size=10"],
        )
    )
    add(Case("prepare val_fraction=2", "prepare", [*PREPARE, "data.prepare.val_fraction=2"]))
    add(Case("prepare force=maybe", "prepare", [*PREPARE, "force=maybe"]))

    # lmforge-generate
    for name, args in [
        ("an emoji prompt", ["prompt='hi 😀'"]),
        ("an accented prompt", ["prompt='café'"]),
        ("a CJK prompt", ["prompt='中文'"]),
        ("top_k=0", ["top_k=0"]),
        ("top_k=-1", ["top_k=-1"]),
        ("top_k=abc", ["top_k=abc"]),
        ("temperature=-1", ["temperature=-1"]),
        ("num_samples=0", ["num_samples=0"]),
        ("max_new_tokens=0", ["max_new_tokens=0"]),
        ("top_p=0", ["top_p=0"]),
        ("repetition_penalty=0", ["repetition_penalty=0"]),
        ("seed=abc", ["seed=abc"]),
        ("device=banana", ["device=banana"]),
        ("device=cuda:9", ["device=cuda:9"]),
        ("prompt_file missing", ["prompt_file={C}/nothere.txt"]),
        ("ckpt_path missing", ["ckpt_path={C}/nothere.ckpt"]),
        ("ckpt_path=null", ["ckpt_path=null"]),
    ]:
        add(Case(f"generate {name}", "generate", [*GENERATE, *args]))
    add(
        Case(
            "generate prompt_file not UTF-8",
            "generate",
            [*GENERATE, "prompt_file={C}/p.txt"],
            setup=lambda s, d: (d / "p.txt").write_bytes("café".encode("latin-1")),
        )
    )
    add(
        Case(
            "generate ckpt_path a directory of something else",
            "generate",
            [*GENERATE, "ckpt_path={C}/mine"],
            setup=lambda s, d: user_dir(d / "mine"),
        )
    )
    add(
        Case(
            "generate ckpt_path truncated",
            "generate",
            [*GENERATE, "ckpt_path={C}/bad.ckpt"],
            setup=lambda s, d: truncated(ckpt(s), d / "bad.ckpt"),
        )
    )
    add(
        Case(
            "generate ckpt_path zeroed bytes in a tensor",
            "generate",
            [*GENERATE, "ckpt_path={C}/z.ckpt"],
            setup=lambda s, d: zeroed_in_a_tensor(ckpt(s), d / "z.ckpt"),
        )
    )
    add(
        Case(
            "generate ckpt_path zeroed middle",
            "generate",
            [*GENERATE, "ckpt_path={C}/z.ckpt"],
            setup=lambda s, d: zeroed_middle(ckpt(s), d / "z.ckpt"),
        )
    )
    add(
        Case(
            "generate tokenizer= a text file",
            "generate",
            [*GENERATE, "tokenizer={C}/afile"],
            setup=lambda s, d: user_file(d / "afile"),
        )
    )

    # lmforge-eval
    for name, args in [
        ("stride=0", ["stride=0"]),
        ("seq_len=0", ["seq_len=0"]),
        ("seq_len=100000", ["seq_len=100000"]),
        ("stride above seq_len", ["seq_len=16", "stride=32"]),
        ("batch_size=0", ["batch_size=0"]),
        ("precision=fp8", ["precision=fp8"]),
        ("device=banana", ["device=banana"]),
        ("ckpt_path missing", ["ckpt_path={C}/nothere.ckpt"]),
        ("text_file missing", ["text_file={C}/nothere.txt"]),
        ("output in a missing directory", ["output={C}/no/such/dir/r.json"]),
        (
            "split=nope",
            ["text_file=null", "split=nope", "data.dir={S}/base/data", "data.prepare=null"],
        ),
    ]:
        add(Case(f"eval {name}", "eval", [*EVAL, *args]))
    add(
        Case(
            "eval output onto the user's file",
            "eval",
            [*EVAL, "output={C}/afile"],
            setup=lambda s, d: user_file(d / "afile"),
        )
    )
    add(
        Case(
            "eval output is a directory",
            "eval",
            [*EVAL, "output={C}/mine"],
            setup=lambda s, d: user_dir(d / "mine"),
            foreign=["mine"],
        )
    )
    add(
        Case(
            "eval text_file not UTF-8",
            "eval",
            [*EVAL, "text_file={C}/l1.txt"],
            setup=lambda s, d: (d / "l1.txt").write_bytes("café crème\n".encode("latin-1")),
        )
    )
    add(
        Case(
            "eval text_file with characters outside the vocabulary",
            "eval",
            [*EVAL, "text_file={C}/e.txt"],
            setup=lambda s, d: (d / "e.txt").write_text("To be 😀 or not to be 中\n"),
        )
    )
    add(
        Case(
            "eval ckpt_path a directory of something else",
            "eval",
            [*EVAL, "ckpt_path={C}/mine"],
            setup=lambda s, d: user_dir(d / "mine"),
        )
    )
    add(
        Case(
            "eval ckpt_path zeroed bytes in a tensor",
            "eval",
            [*EVAL, "ckpt_path={C}/z.ckpt"],
            setup=lambda s, d: zeroed_in_a_tensor(ckpt(s), d / "z.ckpt"),
        )
    )
    add(
        Case(
            "eval ckpt_path truncated",
            "eval",
            [*EVAL, "ckpt_path={C}/bad.ckpt"],
            setup=lambda s, d: truncated(ckpt(s), d / "bad.ckpt"),
        )
    )
    add(
        Case(
            "eval tokenizer= a text file",
            "eval",
            [*EVAL, "tokenizer={C}/afile"],
            setup=lambda s, d: user_file(d / "afile"),
        )
    )

    # lmforge-export
    add(
        Case(
            "export onto a non-empty foreign directory",
            "export",
            ["{ckpt}", "{C}/mine"],
            setup=lambda s, d: user_dir(d / "mine"),
            foreign=["mine"],
        )
    )
    add(
        Case(
            "export onto an existing file",
            "export",
            ["{ckpt}", "{C}/afile"],
            setup=lambda s, d: user_file(d / "afile"),
        )
    )
    add(
        Case(
            "export into the run's checkpoints directory",
            "export",
            ["{C}/logs/causal_lm/X/checkpoints/last.ckpt", "{C}/logs/causal_lm/X/checkpoints"],
            setup=lambda s, d: copy_run(s, d),
        )
    )
    add(Case("export a missing checkpoint", "export", ["{C}/nothere.ckpt", "{C}/out"]))
    add(
        Case(
            "export a truncated checkpoint",
            "export",
            ["{C}/bad.ckpt", "{C}/out"],
            setup=lambda s, d: truncated(ckpt(s), d / "bad.ckpt"),
        )
    )
    add(
        Case(
            "export a checkpoint with zeroed bytes in a tensor",
            "export",
            ["{C}/z.ckpt", "{C}/out"],
            setup=lambda s, d: zeroed_in_a_tensor(ckpt(s), d / "z.ckpt"),
        )
    )
    add(
        Case(
            "export a directory of something else",
            "export",
            ["{C}/mine", "{C}/out"],
            setup=lambda s, d: user_dir(d / "mine"),
        )
    )
    add(Case("export without arguments", "export", []))

    # lmforge-consolidate
    add(Case("consolidate a checkpoint file", "consolidate", ["{ckpt}", "-o", "{C}/o.ckpt"]))
    add(
        Case(
            "consolidate a directory of something else",
            "consolidate",
            ["{C}/mine"],
            setup=lambda s, d: user_dir(d / "mine"),
            foreign=["mine"],
        )
    )
    add(Case("consolidate a missing path", "consolidate", ["{C}/nothere"]))
    add(
        Case(
            "consolidate -o onto the user's file",
            "consolidate",
            ["{C}/mine", "-o", "{C}/afile"],
            setup=setups(lambda s, d: user_dir(d / "mine"), lambda s, d: user_file(d / "afile")),
        )
    )
    add(
        Case(
            "consolidate -o a directory",
            "consolidate",
            ["{C}/mine", "-o", "{C}/out"],
            setup=setups(lambda s, d: user_dir(d / "mine"), lambda s, d: user_dir(d / "out")),
        )
    )
    return c


# ------------------------------------------------------------------------------------ running


def env_for(case_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["LMFORGE_ROOT"] = str(case_dir)  # paths.root_dir: nothing lands in the checkout
    env["WANDB_MODE"] = "offline"
    env["WANDB_DIR"] = str(case_dir)
    env["WANDB_SILENT"] = "true"
    env["TORCHINDUCTOR_CACHE_DIR"] = str(case_dir / ".inductor")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def command(tool: str, args: list[str], sandbox: Path, case_dir: Path) -> list[str]:
    def fill(a: str) -> str:
        return (
            a.replace("{ckpt}", str(ckpt(sandbox)))
            .replace("{S}", str(sandbox))
            .replace("{C}", str(case_dir))
        )

    return [sys.executable, "-m", f"lmforge.cli.{tool}", *map(fill, args)]


def invocation_record(path: Path) -> bool:
    """The record of each invocation of a run directory, refused or not: Hydra's ``.hydra/``
    (the last command's config and overrides, written before lmforge code runs), the appended
    ``train.log``, and ``.lock`` (the pid of the process holding the run directory). Every other
    file of a run must stay as it was."""
    return ".hydra" in path.parts or path.name in ("train.log", ".lock")


def hashes(root: Path, pattern: str) -> dict[str, str]:
    if pattern == "none":
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.glob(pattern))
        if p.is_file() and not invocation_record(p.relative_to(root))
    }


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


ERROR_LINE = re.compile(r"^(error: |[\w-]+: error: )")  # ours; argparse's usage errors
EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception)\b[(:]")


def first_error(text: str) -> str:
    """The line that says what went wrong: an ``error:`` line, else an exception's own line,
    else the first line that mentions an error (not Hydra's frame around it), else the first."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for pattern in (ERROR_LINE, EXCEPTION_LINE):
        found = [line for line in lines if pattern.match(line)]
        if found:
            return found[0] if pattern is ERROR_LINE else found[-1]
    hydra_frame = ("Error executing job", "HYDRA_FULL_ERROR", "Error in call to target")
    for line in lines:
        if "error" in line.lower() and not any(f in line for f in hydra_frame):
            return line
    return lines[0] if lines else ""


def run_case(case: Case, number: int, sandbox: Path) -> Result:
    result = Result(case)
    if case.needs_non_root and os.geteuid() == 0:
        result.skipped = "running as root: permissions do not stop it"
        return result
    case_dir = sandbox / "cases" / f"{number:03d}"
    case_dir.mkdir(parents=True)
    if case.setup is not None:
        case.setup(sandbox, case_dir)
    before = hashes(case_dir, case.guard)
    foreign_before = {d: listing(case_dir / d) for d in case.foreign}
    limit = case.file_size_limit

    def preexec() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command(case.tool, case.args, sandbox, case_dir),
            cwd=case_dir,
            env=env_for(case_dir),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=300,  # a 4-step run takes well under a minute
            preexec_fn=preexec if limit is not None else None,
        )
        result.rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        result.rc, out, err = None, str(e.stdout or ""), f"error: timed out after {e.timeout} s"
    result.seconds = time.perf_counter() - start
    result.one_line = any(ERROR_LINE.match(line) for line in (err + "\n" + out).splitlines())
    if result.rc != 0:  # a run that went through has no error line to show
        result.error = (first_error(err) or first_error(out)).replace(str(case_dir), "{C}")
        result.error = result.error.replace(str(sandbox), "{S}")
    result.traceback = TRACEBACK in err or TRACEBACK in out
    after = hashes(case_dir, case.guard) if case.guard != "none" else {}
    set_aside = {h for p, h in after.items() if p.endswith(".corrupt")}  # renamed, bytes kept
    result.changed = [p for p, h in before.items() if after.get(p) != h and h not in set_aside]
    for d, names in foreign_before.items():
        result.changed += [f"{d}/{n} (new)" for n in sorted(listing(case_dir / d) - names)]
    (case_dir / "stdout.txt").write_text(out)
    (case_dir / "stderr.txt").write_text(err)
    return result


def prepare_sandbox(sandbox: Path) -> None:
    """The tiny text, and a gpt-nano trained 4 steps on it (the checkpoint the cases read)."""
    text = SHAKESPEARE.read_text()
    (sandbox / "tiny.txt").write_text(text[:60_000])
    (sandbox / "small.txt").write_text(text[:2_000])
    base = sandbox / "base"
    base.mkdir()
    args = [
        a.replace("{C}", str(base)).replace("{S}", str(sandbox)) for a in train(run_name="base")
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.cli.train", *args],
        cwd=base,
        env=env_for(base),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not ckpt(sandbox).is_file():
        sys.exit(
            f"training the base checkpoint failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )


def cell(text: str, width: int = 160) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= width else text[: width - 3] + "..."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="run the cases whose name holds this string")
    parser.add_argument("--workers", type=int, default=2, help="processes at a time (2)")
    parser.add_argument("--keep", action="store_true", help="keep the sandbox directory")
    args = parser.parse_args()
    todo = [c for c in cases() if not args.only or args.only in c.name]
    start = time.perf_counter()
    sandbox = Path(tempfile.mkdtemp(prefix="lmforge-fuzz-"))
    try:
        prepare_sandbox(sandbox)
        base_before = hashes(base_run(sandbox), "**/*")
        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            results = list(pool.map(lambda nc: run_case(nc[1], nc[0], sandbox), enumerate(todo)))
        base_changed = [
            p for p, h in base_before.items() if hashes(base_run(sandbox), "**/*").get(p) != h
        ]
    finally:
        if args.keep:
            print(f"sandbox kept: {sandbox}", file=sys.stderr)
        else:
            shutil.rmtree(sandbox, ignore_errors=True)
    print("| # | input | exit | error line | one line | traceback | user files changed | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(results):
        expect = " (expect 0)" if r.case.expect_ok else ""
        verdict = "skipped: " + r.skipped if r.skipped else ("**FAIL**" if r.failed else "ok")
        print(
            f"| {i + 1} | {cell(r.case.name)}{expect} | {r.rc if r.rc is not None else '-'}"
            f" | {cell(r.error) or '-'} | {'yes' if r.one_line else 'no'}"
            f" | {'**yes**' if r.traceback else 'no'}"
            f" | {cell(', '.join(r.changed)) or '-'} | {verdict} |"
        )
    bad = [r for r in results if not r.case.expect_ok and not r.skipped]
    zero = sum(r.rc == 0 for r in bad)
    tracebacks = sum(r.traceback for r in results)
    not_one_line = sum(r.rc != 0 and not r.one_line and not r.case.hydra_error for r in bad)
    changed = sum(bool(r.changed) for r in results) + bool(base_changed)
    failed = sum(r.failed for r in results) + bool(base_changed)
    if base_changed:
        print(f"\nthe shared base run changed: {', '.join(base_changed)}")
    print(
        f"\n{len(results)} inputs ({sum(bool(r.skipped) for r in results)} skipped),"
        f" {tracebacks} tracebacks, {changed} with changed user files,"
        f" {zero} zero exits on bad input, {not_one_line} refused without a one-line error:"
        f" {failed} failed"
        f" ({time.perf_counter() - start:.0f} s, {args.workers} at a time)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
