"""Every config group composes; every experiment runs under debug=fdr; bad overrides fail fast."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from lmforge.cli.train import train, validate
from lmforge.config import CONF_DIR

from .conftest import ROOT, compose_train


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GROUPS = [
    "model",
    "data",
    "data/source",
    "task",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "hydra",
    "debug",
    "experiment",
    "hparams_search",
]


# The options that only compose with a fine-tune: the other groups they need.
FINE_TUNE = {
    "classification": ["task=classification", "data=sms_spam", "model=pretrained"],
    "instruction": ["task=instruction", "data=instructions", "model=pretrained"],
    "reward": ["task=reward", "data=preferences", "model=pretrained"],
    "dpo": ["task=dpo", "data=preferences", "model=pretrained"],
    "grpo": [
        "task=grpo",
        "data=prompts",
        "model=pretrained",
        "task.reward=lmforge.rewards.exact_match",
    ],
}
COMPANIONS = {
    ("model", "pretrained"): FINE_TUNE["classification"],
    ("data", "sms_spam"): FINE_TUNE["classification"],
    ("task", "classification"): FINE_TUNE["classification"],
    ("data", "instructions"): FINE_TUNE["instruction"],
    ("data", "instructions_chat"): FINE_TUNE["instruction"],
    ("task", "instruction"): FINE_TUNE["instruction"],
    ("data", "preferences"): FINE_TUNE["reward"],
    ("task", "reward"): FINE_TUNE["reward"],
    ("task", "dpo"): FINE_TUNE["dpo"],
    ("data", "prompts"): FINE_TUNE["grpo"],
    ("task", "grpo"): FINE_TUNE["grpo"],
}


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option, tmp_path):
    cfg = compose_train([*COMPANIONS.get((group, option), []), f"{group}={option}"], tmp_path)
    if group not in ("trainer", "logger", "callbacks"):
        validate(cfg)  # typed configs build from every option
    if group == "trainer" and not isinstance(cfg.trainer.get("strategy", "auto"), str):
        from hydra.utils import instantiate

        instantiate(cfg.trainer.strategy)  # a strategy object builds without its devices


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), group


def small_slice(paths: list[str], dest: Path) -> str:
    """The first 2 MB of documents of a large JSONL corpus, so a fast dev run need not read it all."""
    import json
    import lzma

    src = paths[0]
    if not Path(src).is_file():
        pytest.skip(f"{src} is not here (../shared/data is not beside the checkout)")
    out, size = dest / "slice.jsonl", 0
    opener = lzma.open if src.endswith(".xz") else open
    with opener(src, "rt") as f, open(out, "w") as w:
        for line in f:
            text = json.loads(line)["text"][:200_000]
            w.write(json.dumps({"text": text}) + "\n")
            size += len(text)
            if size > 2_000_000:
                break
    return str(out)


def pretrained_checkpoint(family: str, root: Path) -> Path:
    """A few steps of gpt-nano (causal LM) or bert-nano (masked LM) on Tiny Shakespeare."""
    ckpt = root / family / "run" / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        extra = (
            ["model=bert-nano", "task=masked_lm", "data=shakespeare_wordpiece"]
            + ["data.prepare.tokenizer.vocab_size=500", "data.max_val_windows=4"]
            if family == "bert"
            else ["model=gpt-nano", "model.block_size=256"]  # room for instruction prompts
        )
        cfg = compose_train(
            [*extra, f"data.dir={root}/{family}/data", "trainer.max_steps=2", "logger=csv"]
            + ["callbacks.text_samples=null"],
            root / family,
        )
        train(cfg)
    return ckpt


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_runs_fast_dev_run(experiment, tmp_path, tmp_path_factory):
    data_root = tmp_path_factory.getbasetemp() / "experiment-data"
    if experiment.startswith("grpo_"):  # from a pretrained causal LM; grpo_gpt a reward model
        from .test_grpo import write_reward_model

        ckpt = pretrained_checkpoint("gpt", data_root / "pretrained")
        overrides = [f"experiment={experiment}", "debug=fdr", f"init_from={ckpt}"]
        overrides += ["task.max_new_tokens=4", "data.max_val_prompts=2"]
        if experiment == "grpo_gpt":
            saved = torch.load(ckpt, weights_only=True)
            tok = Tokenizer.from_str(saved["tokenizer"])
            rm = write_reward_model(tmp_path / "rm.ckpt", tok, saved["hyper_parameters"]["model"])
            overrides += [f"task.reward_model={rm}"]
        metrics = train(compose_train(overrides, tmp_path))
        assert "val/reward" in metrics and "train/loss" in metrics
        return
    if experiment.startswith(("finetune_", "instruct_", "rm_", "dpo_")):  # from a pretrained model
        family = "bert" if "_bert" in experiment else "gpt"
        ckpt = pretrained_checkpoint(family, data_root / "pretrained")
        overrides = [f"experiment={experiment}", "debug=fdr", f"init_from={ckpt}"]
        if experiment.startswith("finetune_"):
            overrides += ["data.on_empty=skip", "data.max_len=32"]
        elif experiment == "rm_bert":  # prompts keep their end within bert-nano's context
            overrides += ["data.max_len=64"]
        else:  # characters: the Alpaca prompt alone is ~170 tokens
            overrides += ["data.max_len=256"]
        cfg = compose_train(overrides, tmp_path)
        metrics = train(cfg)
        assert metrics["train/loss"] > 0
        assert "test/acc" in metrics or not experiment.startswith("finetune_")
        assert "test/accuracy" in metrics or not experiment.startswith("rm_")
        # The run records the model it trained: the pretrained model's family and fields.
        from omegaconf import OmegaConf

        logged = OmegaConf.load(Path(cfg.paths.output_dir) / "config.yaml").model
        pretrained = torch.load(ckpt, weights_only=True)["hyper_parameters"]["model"]
        config_class = {"gpt": "gpt.GPTConfig", "bert": "bert.BertConfig"}[family]
        assert logged._target_ == f"lmforge.models.{config_class}"
        assert logged.n_layer == pretrained["n_layer"] and logged.n_embd == pretrained["n_embd"]
        return
    overrides = [f"experiment={experiment}", "debug=fdr", f"data.dir={data_root}/{experiment}"]
    cfg = compose_train(overrides, tmp_path)
    paths = list(cfg.data.prepare.source.paths)
    if any(p.startswith(str(cfg.paths.shared_data_dir)) for p in paths):
        overrides += [
            f"data.prepare.source.paths=[{small_slice(paths, tmp_path)}]",
            "data.prepare.tokenizer.vocab_size=1024",
        ]
        cfg = compose_train(overrides, tmp_path)
    metrics = train(cfg)
    assert metrics["train/loss"] > 0


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.n_layr=2", "model.n_layr"),
        ("model.n_layer=abc", "model.n_layer"),
        ("task.optim.lr=fast", "task.optim.lr"),
        ("data.seq_len=4096", "data.seq_len"),
        ("data.batch_size=0", "data.batch_size"),
        ("model.n_head=5", "n_head"),
        ("task.optim.lr=-1", "task.optim.lr must be positive"),
        ("model.vocab_size=10", "model.vocab_size=10 is smaller than the tokenizer's"),
        ("task.on_nonfinite=maybe", "task.on_nonfinite"),
        ("task=classification", "task=classification trains on labelled texts"),
        ("task.lora.rank=2", "task.lora"),
        ("model.logit_softcap=-1", "GPTConfig.logit_softcap must be positive or null"),
    ],
)
def test_invalid_override_fails_naming_the_key(override, needle, train_cfg, tmp_path):
    """In process: the composed config is refused before anything is trained."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from lmforge.errors import LMForgeError

    with pytest.raises((LMForgeError, HydraException, OmegaConfBaseException)) as e:
        train(train_cfg(override))
    assert needle in str(e.value)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    "overrides",
    [["task=causal_lm", "data=sms_spam"], ["task=classification", "data=shakespeare_char"]],
)
def test_a_task_given_data_it_cannot_train_on_exits_with_one_line(overrides, tmp_path):
    """The command line's path: exit status 2, one line naming both, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.cli.train", f"paths.log_dir={tmp_path}", *overrides],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: task=") and "data=" in lines[0]
    assert "Traceback" not in proc.stderr
