"""DDP and FSDP2 on CPU processes (gloo): the same numbers as one process.

Every distributed run is launched as its own process tree (``lmforge-train`` with Lightning's
launcher, or ``torchrun``), never inside pytest: Lightning's launcher would re-run pytest.
The runs of one model family share a module-scoped fixture; each takes 10-20 s on 2 cores.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import consolidate, load_checkpoint
from lmforge.data.datasets import RankShard, SequentialWindows, blank, open_split

from . import launch
from .conftest import ROOT, SHAKESPEARE, train_run

STEPS = 10
# A schedule that does not depend on max_steps, so a resumed run may run longer.
SCHEDULE = ["task.optim.warmup_steps=2", "task.optim.decay_steps=40", "task.optim.lr=3e-3"]


FIXED = ["logger=csv", "callbacks.progress_bar=null", "trainer.enable_model_summary=false"]


def train_here(log_dir: Path, name: str, *overrides: str) -> None:
    """The one-process reference run, in this process (it needs no launcher)."""
    train_run(log_dir, name, *FIXED, *overrides)


LIGHTNING = [sys.executable, "-m"]  # Lightning's own launcher: it starts rank 1 itself


def run_train(
    log_dir: Path,
    name: str | None,
    *overrides: str,
    launcher: list[str] | None = None,
    nprocs: int = 2,
    wandb: str = "disabled",
):
    """A multi-process run. By default its ``nprocs`` ranks are forked together from the test
    session's server as torchrun would start them (``launch.run_ranks``); ``launcher`` runs the
    command under another launcher instead (``LIGHTNING``, torchrun)."""
    env = os.environ | {"WANDB_MODE": wandb, "PYTHONUNBUFFERED": "1"}
    args = [
        *FIXED,
        f"paths.log_dir={log_dir}",
        *([f"run_name={name}"] if name else []),
        *overrides,
    ]
    if launcher is None:
        cmd = [sys.executable, "-m", "lmforge.cli.train", *args]
        return launch.run_ranks(cmd, nprocs, env=env, cwd=ROOT)
    return subprocess.run(
        [*launcher, "lmforge.cli.train", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )


def ok(proc) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def final_val_loss(run_dir: Path) -> float:
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    return float(rows[-1]["val/loss"])


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(ckpt)["state_dict"]


def assert_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, f"parameters differ by up to {worst:.2e}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(SHAKESPEARE.read_text()[:60_000])
    return path


MC_ITEMS = 9  # odd: two ranks score 5 and 4 items


def short_choice_set(path: Path) -> Path:
    """The first bundled multiple-choice items, their choices cut to 30 characters to fit
    gpt-nano's 32-token context (their contexts do not: they are cut from the left)."""
    import json

    bundled = ROOT / "data" / "shakespeare_mc" / "shakespeare_mc.jsonl"
    items = [json.loads(line) for line in bundled.read_text().splitlines()]
    short = [i | {"choices": [c[:30] for c in i["choices"]]} for i in items[:MC_ITEMS]]
    path.write_text("".join(json.dumps(i) + "\n" for i in short))
    return path


@pytest.fixture(scope="module")
def gpt_runs(tmp_path_factory, corpus):
    """GPT: one process of batch 8; 2 DDP ranks of 4; 2 FSDP ranks of 4 (10 steps each), with
    the multiple-choice callback at steps 5 and 10."""
    logs = tmp_path_factory.mktemp("gpt")
    mc_set = short_choice_set(logs / "mc.jsonl")
    common = [
        "model=gpt-nano",
        "callbacks=[default,multiple_choice]",
        f"callbacks.multiple_choice.sets.shakespeare_mc.path={mc_set}",
        "callbacks.multiple_choice.every_n_steps=5",
        "callbacks.text_samples.max_new_tokens=8",  # every rank generates (FSDP gathers)
        f"data.dir={logs}/data",
        f"data.prepare.source.paths=[{corpus}]",
        "data.max_val_windows=45",  # odd: two ranks get 23 and 22 (+1 blank) windows
        "data.val_batch_size=4",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        *SCHEDULE,
    ]
    train_here(logs, "single", *common, "trainer=cpu", "data.batch_size=8")
    ddp = ok(
        run_train(logs, "ddp", *common, "trainer=ddp_cpu", "data.batch_size=4", launcher=LIGHTNING)
    )
    fsdp = [*common, "trainer=fsdp_cpu", "data.batch_size=4", "task.activation_checkpointing=true"]
    ok(run_train(logs, "fsdp", *fsdp, "logger=default", wandb="offline"))
    return logs / "causal_lm", common, ddp


@pytest.fixture(scope="module")
def bert_runs(tmp_path_factory, corpus):
    logs = tmp_path_factory.mktemp("bert")
    common = [
        "experiment=bert_shakespeare_mlm_cpu",
        "model=bert-nano",
        f"data.dir={logs}/data",
        f"data.prepare.source.paths=[{corpus}]",
        "data.prepare.tokenizer.vocab_size=500",
        "data.max_val_windows=21",
        "data.val_batch_size=4",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        *SCHEDULE,
    ]
    train_here(logs, "single", *common, "trainer=cpu", "data.batch_size=8")
    ok(run_train(logs, "ddp", *common, "trainer=ddp_cpu", "data.batch_size=4"))
    ok(run_train(logs, "fsdp", *common, "trainer=fsdp_cpu", "data.batch_size=4"))
    return logs / "masked_lm"


def test_rank_shards_cover_validation_once():
    """Each window on exactly one rank; short ranks padded with blanks that carry no target."""
    data = list(range(7))

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return torch.tensor([i]), torch.tensor([i])

    shards = [RankShard(Items(), r, 3) for r in range(3)]
    assert {len(s) for s in shards} == {3}  # same number of forward passes on every rank
    seen = [int(s[i][1]) for s in shards for i in range(len(s)) if int(s[i][1]) != -100]
    assert sorted(seen) == data
    x, y = blank((torch.tensor([5, 6]), torch.tensor([6, 7])))
    assert x.tolist() == [5, 6] and y.tolist() == [-100, -100]


def test_ddp_and_fsdp_match_one_process_gpt(gpt_runs):
    runs, _, ddp = gpt_runs
    single = weights(runs / "single" / "checkpoints" / "last.ckpt")
    assert_close(weights(runs / "ddp" / "checkpoints" / "last.ckpt"), single)
    sharded = runs / "fsdp" / "checkpoints" / "last.ckpt"
    assert sharded.is_dir() and (sharded / ".metadata").is_file()  # a distributed checkpoint
    assert_close(weights(consolidate(sharded)), single)
    assert "global batch: 8 sequences x 32 tokens = 256 tokens" in ddp.stdout + ddp.stderr


def test_two_ranks_write_one_wandb_run_and_one_csv(gpt_runs):
    runs, _, _ = gpt_runs
    assert len(list((runs / "fsdp" / "wandb").glob("offline-run-*"))) == 1
    assert len(list((runs / "fsdp").rglob("metrics.csv"))) == 1


def mc_rows(run_dir: Path) -> list[tuple[str, str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [
            (r["step"], r["eval/shakespeare_mc/acc"], r["eval/shakespeare_mc/acc_norm"])
            for r in csv.DictReader(f)
            if r.get("eval/shakespeare_mc/acc")
        ]


def test_multiple_choice_accuracy_of_two_ranks_is_one_processs(gpt_runs):
    """Each rank scores its share of the 9 items; the counts are summed once: the accuracies
    logged at steps 5 and 10 are those of one process, and the truncation is told once."""
    runs, _, ddp = gpt_runs
    one = mc_rows(runs / "single")
    assert [r[0] for r in one] == ["5", "10"]
    assert mc_rows(runs / "ddp") == one
    assert mc_rows(runs / "fsdp") == one
    told = (ddp.stdout + ddp.stderr).count("items are longer than the model's 32-token context")
    assert told == 1


def test_harness_scores_the_callbacks_accuracy_offline(gpt_runs, tmp_path, capfd, monkeypatch):
    """lmforge-eval tasks=... runs lm-evaluation-harness offline on local task files: its acc and
    acc_norm of the multiple-choice task equal the callback's at the last step, and its greedy
    generations equal the model's own, decoded without the KV cache."""
    import json

    from lmforge.checkpoint import load_model
    from lmforge.cli.eval import main

    from .conftest import run_cli, wandb_records, wandb_values

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runs, _, _ = gpt_runs
    mc_set = runs.parent / "mc.jsonl"
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {mc_set}\ntest_split: test\n"
    (tmp_path / "mc.yaml").write_text(
        "task: t_mc\n" + data + "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        'doc_to_choice: choices\ndoc_to_target: label\ntarget_delimiter: "\\n"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (tmp_path / "gen.yaml").write_text(
        "task: t_gen\n" + data + "output_type: generate_until\n"
        "doc_to_text: \"{{context}}\\n\"\ndoc_to_target: '{{choices[label]}}'\n"
        "generation_kwargs:\n  until: ['@']\n  max_gen_toks: 12\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    ckpt = runs / "single" / "checkpoints" / "last.ckpt"
    args = [f"ckpt_path={ckpt}", "tasks=[t_mc,t_gen]", f"include_path={tmp_path}"]
    proc = run_cli(capfd, main, "eval", *args, "batch_size=3", "log_samples=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((ckpt.parent / "last.lm_eval.json").read_text())
    _, acc, acc_norm = mc_rows(runs / "single")[-1]
    assert out["results"]["t_mc"]["acc,none"] == float(acc)
    assert out["results"]["t_mc"]["acc_norm,none"] == float(acc_norm)
    assert out["results"]["t_mc"]["sample_len"] == MC_ITEMS
    assert out["truncated"] >= 1  # the contexts longer than 32 tokens, counted
    loaded = load_model(ckpt)
    model, tok = loaded.model, loaded.tokenizer
    samples = sorted(out["samples"]["t_gen"], key=lambda s: s["doc_id"])
    for line, sample in zip(mc_set.read_text().splitlines(), samples):
        ids = tok.encode(json.loads(line)["context"] + "\n").ids[-(32 - 12) :]
        new = model.generate(torch.tensor([ids]), 12, temperature=0, use_cache=False)[0, len(ids) :]
        assert sample["filtered_resps"] == [tok.decode(new.tolist())]
    (run,) = (ckpt.parent / "wandb").glob("offline-run-*/run-*.wandb")  # wandb=auto: offline
    logged = {}
    for record in wandb_records(run):
        if record.WhichOneof("record_type") == "history":
            logged |= wandb_values(record.history.item)
    assert float(logged["t_mc/acc"]) == float(acc)


def test_two_rank_validation_equals_one_rank(gpt_runs):
    runs, _, _ = gpt_runs
    one = final_val_loss(runs / "single")
    assert final_val_loss(runs / "ddp") == pytest.approx(one, abs=1e-5)
    assert final_val_loss(runs / "fsdp") == pytest.approx(one, abs=1e-5)


def test_consolidated_fsdp_checkpoint_gives_the_sharded_models_outputs(gpt_runs):
    """The validation loss the two FSDP ranks reported, recomputed by the plain model loaded
    from the consolidated file, on one process."""
    from lmforge.checkpoint import load_model

    runs, _, _ = gpt_runs
    model = load_model(consolidate(runs / "fsdp" / "checkpoints" / "last.ckpt")).model
    data_dir = runs.parent / "data"
    windows = SequentialWindows(open_split(data_dir, "val"), 32, max_windows=45)
    x = torch.stack([windows[i][0] for i in range(len(windows))])
    y = torch.stack([windows[i][1] for i in range(len(windows))])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert loss.item() == pytest.approx(final_val_loss(runs / "fsdp"), abs=1e-6)


def test_fsdp_resumes_on_two_ranks_and_on_one(gpt_runs):
    """The sharded checkpoint of step 10 resumes to step 14 on 2 ranks and on 1; both end where
    one uninterrupted single-process run of 14 steps ends."""
    runs, common, _ = gpt_runs
    ckpt = runs / "fsdp" / "checkpoints" / "last.ckpt"
    more = [*common, "trainer.max_steps=14", "trainer.val_check_interval=14"]
    logs = runs.parent
    ok(run_train(logs, "resume2", *more, "trainer=fsdp_cpu", "data.batch_size=4", f"resume={ckpt}"))
    ok(
        run_train(
            logs,
            "resume1",
            *more,
            "trainer=fsdp_cpu",
            "trainer.devices=1",
            "data.batch_size=8",
            f"resume={ckpt}",
            nprocs=1,
        )
    )
    train_here(logs, "single14", *more, "trainer=cpu", "data.batch_size=8")
    reference = weights(runs / "single14" / "checkpoints" / "last.ckpt")
    for name in ("resume2", "resume1"):
        state = load_checkpoint(runs / name / "checkpoints" / "last.ckpt")
        assert state["global_step"] == 14
        assert_close(state["state_dict"], reference)


def test_ddp_and_fsdp_match_one_process_bert(bert_runs):
    single = weights(bert_runs / "single" / "checkpoints" / "last.ckpt")
    assert_close(weights(bert_runs / "ddp" / "checkpoints" / "last.ckpt"), single)
    assert_close(weights(bert_runs / "fsdp" / "checkpoints" / "last.ckpt"), single)
    one = final_val_loss(bert_runs / "single")
    assert final_val_loss(bert_runs / "ddp") == pytest.approx(one, abs=1e-5)
    assert final_val_loss(bert_runs / "fsdp") == pytest.approx(one, abs=1e-5)


def test_torchrun_launch_writes_one_run(gpt_runs):
    """torchrun starts the ranks itself (Lightning detects it); they share one run directory."""
    runs, common, _ = gpt_runs
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
    ]
    proc = ok(
        run_train(
            runs.parent / "torchrun",
            None,  # every rank resolves the run name from torchrun's run id
            *common,
            "trainer=ddp_cpu",
            "data.batch_size=4",
            launcher=launcher,
        )
    )
    run_dirs = list((runs.parent / "torchrun" / "causal_lm").iterdir())
    assert len(run_dirs) == 1
    single = weights(runs / "single" / "checkpoints" / "last.ckpt")
    assert_close(weights(run_dirs[0] / "checkpoints" / "last.ckpt"), single)
    assert proc.stdout.count("val/loss") >= 1
    # each rank its own log file: rank 1 does not write into rank 0's train.log
    assert sorted(p.name for p in run_dirs[0].glob("*.log")) == ["train.log", "train_rank1.log"]
    assert "GLOBAL_RANK: 1" not in (run_dirs[0] / "train.log").read_text()


def test_multirun_with_ddp_refuses_at_start(tmp_path, corpus):
    """``lmforge-train -m ... trainer=ddp_cpu``, one process as the user starts it."""
    cmd = [sys.executable, "-m", "lmforge.cli.train", "-m", *FIXED, f"paths.log_dir={tmp_path}"]
    proc = launch.run(
        [
            *cmd,
            "run_name=sweep",
            "callbacks.text_samples=null",
            "model=gpt-nano",
            "trainer=ddp_cpu",
            f"data.dir={tmp_path}/data",
            f"data.prepare.source.paths=[{corpus}]",
            "task.optim.lr=1e-3,2e-3",
        ],
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "-m (multirun) cannot drive a 2-process strategy" in proc.stderr
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained


@pytest.fixture(scope="module", params=["classification", "instruction"])
def finetune_runs(request, tmp_path_factory, corpus):
    """A gpt-nano pretrained in this process, then classification or instruction tuning from
    it: one process of batch 8, 2 DDP ranks of 4, 2 FSDP ranks of 4, dropout off (dropout
    masks are drawn per rank). The run directories of the task."""
    import json

    from lmforge.cli.train import train

    from .conftest import compose_train

    root = tmp_path_factory.mktemp("finetune")
    pre = compose_train(
        [
            "model=gpt-nano",
            "model.block_size=128",
            f"data.dir={root}/data",
            f"data.prepare.source.paths=[{corpus}]",
            "trainer.max_steps=4",
            "logger=csv",
            "callbacks.text_samples=null",
        ],
        root / "pre",
    )
    train(pre)
    init = Path(pre.paths.output_dir) / "checkpoints" / "last.ckpt"
    sms = ROOT / "data" / "sms_spam"
    splits = {}
    for name, n in (("train", 60), ("val", 21), ("test", 21)):  # 60 = 7 x 8 + 4: a short batch
        lines = (sms / f"{name}.tsv").read_text(encoding="utf-8").splitlines()[: n + 1]
        splits[name] = root / f"{name}.tsv"
        splits[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = json.loads((ROOT / "data" / "instructions" / "train.json").read_text())
    (root / "itrain.json").write_text(json.dumps(records[:44]))
    (root / "ival.json").write_text(json.dumps(records[44:55]))  # 11: ranks get 6 and 5 (+1 blank)
    common = [
        f"init_from={init}",
        "model.dropout=0.0",
        "trainer.max_epochs=1",
        "callbacks.progress_bar=null",
    ]
    cls = [
        "experiment=finetune_sms_spam_gpt",
        *common,
        f"data.train={splits['train']}",
        f"data.val={splits['val']}",
        f"data.test={splits['test']}",
        "data.max_len=32",
        "data.val_batch_size=4",
        "data.on_empty=skip",
    ]
    ins = [
        "experiment=instruct_gpt",
        *common,
        f"data.train={root / 'itrain.json'}",
        f"data.val={root / 'ival.json'}",
        "data.max_len=128",
        "data.val_batch_size=4",
        "data.sample_prompts=1",
        "task.max_new_tokens=4",
        "data.prompt='{instruction} {input}: '",
        "data.prompt_no_input='{instruction}: '",
    ]
    logs = root / "logs"
    args = cls if request.param == "classification" else ins
    train_here(logs, "single", *args, "trainer=cpu", "data.batch_size=8")
    ok(run_train(logs, "ddp", *args, "trainer=ddp_cpu", "data.batch_size=4"))
    ok(run_train(logs, "fsdp", *args, "trainer=fsdp_cpu", "data.batch_size=4"))
    return logs / request.param


def last_metric(run_dir: Path, key: str) -> float:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return float([r for r in csv.DictReader(f) if r.get(key)][-1][key])


def test_fine_tuning_on_ddp_and_fsdp_matches_one_process(finetune_runs):
    """2 ranks of batch 4 train on the examples one process of batch 8 does, step by step (the
    last, short global batch too), and validate each example once."""
    runs, task = finetune_runs, finetune_runs.name
    single = load_checkpoint(runs / "single" / "checkpoints" / "last.ckpt")
    assert single["global_step"] >= 5
    for strategy in ("ddp", "fsdp"):
        state = load_checkpoint(runs / strategy / "checkpoints" / "last.ckpt")
        assert state["global_step"] == single["global_step"]
        assert_close(state["state_dict"], single["state_dict"])
        for key in ("val/acc", "test/acc") if task == "classification" else ("val/loss",):
            assert last_metric(runs / strategy, key) == pytest.approx(
                last_metric(runs / "single", key), abs=1e-5
            ), (strategy, key)
