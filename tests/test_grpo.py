"""GRPO: the advantages and the loss by hand, deterministic rollouts, a tiny run that learns a
trivial reward, bad input in one line, and a run killed with SIGKILL resuming bitwise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.cli.train import train
from lmforge.data.instructions import Framing
from lmforge.data.prompts import PromptDataConfig, encode_prompts
from lmforge.data.tokenizer import TokenizerConfig, train_tokenizer
from lmforge.errors import LMForgeError
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.tasks.config import GRPOConfig
from lmforge.tasks.grpo import GRPOTask, group_advantages, grpo_loss, token_logprobs

from .conftest import compose_train, train_run

ALPHABET = "abcdefghijklmnopqrstuvwxyz =+?"
MODEL = {"vocab_size": len(ALPHABET) + 1, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}


def count_a(prompts: list[str], responses: list[str], records: list[dict]) -> list[float]:
    """A trivial reward: the share of a response's characters that are "a"."""
    return [r.count("a") / max(len(r), 1) for r in responses]


def test_advantages_and_loss_equal_a_hand_computation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4)
    std = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected std of (1, 0, 0, 1)
    want = [(r - 0.5) / (std + 1e-4) for r in (1.0, 0.0, 0.0, 1.0)]
    torch.testing.assert_close(adv, torch.tensor(want + [0.0] * 4))  # equal rewards: nothing

    # Three response tokens: ratio inside the clip range, above it (A > 0), below it (A < 0).
    logp = torch.tensor([-1.0, -0.5, -2.0])
    old = torch.tensor([-1.1, -1.0, -1.0])
    ref = torch.tensor([-1.2, -0.7, -1.5])
    a = torch.tensor([2.0, 1.0, -1.0])
    eps, beta = 0.2, 0.1
    loss_sum, sums = grpo_loss(logp, old, ref, a, eps, beta)
    total, kl_total, clipped = 0.0, 0.0, 0
    for lp, o, rf, ad in zip(logp.tolist(), old.tolist(), ref.tolist(), a.tolist(), strict=True):
        ratio = math.exp(lp - o)
        surrogate = min(ratio * ad, min(max(ratio, 1 - eps), 1 + eps) * ad)
        kl = math.exp(rf - lp) - (rf - lp) - 1
        total += -(surrogate - beta * kl)
        kl_total += kl
        clipped += (ratio > 1 + eps and ad > 0) or (ratio < 1 - eps and ad < 0)
    assert clipped == 2
    torch.testing.assert_close(loss_sum, torch.tensor(total))
    torch.testing.assert_close(sums["kl"], torch.tensor(kl_total))
    assert sums["clipped"].item() == clipped


def write_policy(root: Path) -> Path:
    """A random char-level GPT checkpoint in lmforge-train's format, and prompt records."""
    tok = train_tokenizer([ALPHABET], TokenizerConfig(kind="char"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL))
    ckpt = root / "policy.ckpt"
    torch.save(
        {
            "hyper_parameters": {"family": "gpt", "model": MODEL},
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "tokenizer": tok.to_str(),
        },
        ckpt,
    )
    words = ["say", "ask", "bid", "cue", "den", "fog", "gum", "hue"]
    for split, n in (("train", 8), ("val", 4)):
        records = [{"instruction": f"{w} {'z' * k}"} for k, w in enumerate(words[:n])]
        (root / f"{split}.json").write_text(json.dumps(records))
    return ckpt


def write_reward_model(path: Path, tokenizer, model: dict) -> Path:
    """A (random) reward model of task=reward's checkpoint format, reading ``tokenizer``."""
    from lmforge.tasks.config import RewardConfig
    from lmforge.tasks.reward import RewardTask

    torch.manual_seed(1)
    fields = model | {"vocab_size": tokenizer.get_vocab_size()}
    task = RewardTask(fields, "gpt", tokenizer.token_to_id("<|endoftext|>"), RewardConfig())
    state = {"hyper_parameters": dict(task.hparams), "state_dict": task.state_dict()}
    torch.save(state | {"tokenizer": tokenizer.to_str()}, path)
    return path


def grpo_overrides(root: Path) -> list[str]:
    return [
        "task=grpo",
        "model=pretrained",
        "data=prompts",
        f"init_from={write_policy(root)}",
        f"data.train={root}/train.json",
        f"data.val={root}/val.json",
        "data.prompt_no_input='{instruction}='",
        "data.chat_template=false",
        "data.batch_size=4",
        f"task.reward={__name__}.count_a",
        "task.group_size=4",
        "task.max_new_tokens=8",
        "callbacks.text_samples=null",
        "callbacks.model_checkpoint.monitor=val/reward",
        "callbacks.model_checkpoint.mode=max",
        "callbacks.model_checkpoint.filename='step{step:06d}'",
        "trainer.enable_model_summary=false",
    ]


def tiny_task(root: Path, **task) -> GRPOTask:
    cfg = GRPOConfig(reward=f"{__name__}.count_a", group_size=4, max_new_tokens=8, **task)
    tok = train_tokenizer([ALPHABET], TokenizerConfig(kind="char"))
    module = GRPOTask(MODEL, cfg, seed=7)
    framing = Framing(tok, PromptDataConfig("", "", prompt_no_input="{instruction}="))
    module.tokenizer, module.stop_ids = tok, framing.stop_ids
    records = [{"instruction": w} for w in ("say", "ask", "bid", "fog")]
    module.prompts["train"], _ = encode_prompts(records, framing, 32, "error", "train")
    object.__setattr__(module, "_reference", GPT(GPTConfig(**MODEL)).eval())
    return module


def test_rollouts_are_deterministic_given_seed_and_step(tmp_path):
    module = tiny_task(tmp_path)
    first = module.rollout([0, 1, 2, 3], rollout=5, micro=0)
    again = module.rollout([0, 1, 2, 3], rollout=5, micro=0)
    other = module.rollout([0, 1, 2, 3], rollout=6, micro=0)
    assert torch.equal(first.input_ids, again.input_ids)
    assert torch.equal(first.rewards, again.rewards)
    assert not torch.equal(first.input_ids, other.input_ids)
    # Each group holds 4 samples of one prompt; responses are masked from the prompt's end.
    prompt_len = len(module.prompts["train"][0].ids)
    assert first.mask[:4, : prompt_len - 1].sum() == 0 and first.mask[:4, prompt_len - 1].all()
    assert first.advantages.numel() == first.mask.sum()
    # The rows of the W&B table "samples": (prompt, response, reward) of the first responses.
    assert len(first.rows) == module.task.table_rows
    for prompt, response, reward in first.rows:
        assert prompt == "say=" and reward == pytest.approx(count_a([], [response], [{}])[0])


def test_adapters_off_reference_is_the_base_model(tmp_path):
    """reference=adapters_off: the reference log-probabilities are the policy's without its
    LoRA adapters (the base weights), whatever the adapters have learnt."""
    from lmforge.models.lora import LoRAConfig, LoRALinear

    module = tiny_task(tmp_path, lora=LoRAConfig(rank=4), reference="adapters_off")
    object.__setattr__(module, "_reference", None)
    base = GPT(GPTConfig(**MODEL)).eval()
    state = {k: v for k, v in module.model.state_dict().items() if "lora_" not in k}
    base.load_state_dict(state)
    with torch.no_grad():
        for m in module.model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.5)  # as if trained
    ro = module.rollout([0, 1, 2, 3], rollout=0, micro=0)
    with torch.no_grad():
        want, _ = token_logprobs(base, ro.input_ids, ro.mask)
    torch.testing.assert_close(ro.ref_logp, want)
    assert not torch.allclose(ro.old_logp, want)  # the policy itself is not the base


def test_a_tiny_run_learns_a_trivial_reward(tmp_path):
    """count_a: greedy responses on held-out prompts hold more "a" after 25 steps."""
    cfg = compose_train(
        [
            *grpo_overrides(tmp_path),
            "logger=csv",
            "task.optim.lr=5e-3",
            "task.optim.warmup_steps=0",
            "task.beta=0.0",
            "trainer.max_steps=25",
            "trainer.val_check_interval=25",
            "trainer.log_every_n_steps=1",
            "callbacks.progress_bar=null",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    import csv

    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val/reward"]) for r in rows if r.get("val/reward")]
    kl = [r for r in rows if r.get("train/kl")]
    assert len(val) == 2 and val[1] > val[0] + 0.3, val  # step 0 (the start) and step 25
    assert len(kl) == 25  # KL to the reference logged at every logging step
    assert metrics["val/reward"] == pytest.approx(val[1])


def test_a_reward_model_scores_the_rollouts(tmp_path):
    """task.reward_model: a checkpoint of task=reward with the policy's tokenizer trains (two
    steps) and reports val/reward; one with another tokenizer is refused in one line."""
    same = train_tokenizer([ALPHABET], TokenizerConfig(kind="char"))
    other = train_tokenizer([ALPHABET.upper()], TokenizerConfig(kind="char"))
    common = [*grpo_overrides(tmp_path), "task.reward=null", "trainer.max_steps=2"]
    common += ["trainer.val_check_interval=2"]
    rm = write_reward_model(tmp_path / "rm.ckpt", same, MODEL)
    metrics = train(compose_train([*common, f"task.reward_model={rm}"], tmp_path))
    assert math.isfinite(metrics["val/reward"])
    bad = write_reward_model(tmp_path / "other.ckpt", other, MODEL)
    with pytest.raises(LMForgeError, match=r"task.reward_model=.*other.ckpt: the reward model's"):
        train(compose_train([*common, f"task.reward_model={bad}"], tmp_path / "b"))


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("task.reward=no_such_module.fn", "task.reward='no_such_module.fn': module"),
        ("task.group_size=1", "task.group_size=1: GRPO compares"),
        ("task.max_new_tokens=0", "task.max_new_tokens must be positive"),
        ("data.prompt_no_input='{instruction}" + "x" * 40 + "'", "record 1: its prompt has"),
    ],
)
def test_bad_input_fails_in_one_line_naming_the_key(override, needle, tmp_path):
    cfg = compose_train([*grpo_overrides(tmp_path), override], tmp_path)
    with pytest.raises(LMForgeError) as e:
        train(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert [p.name for p in tmp_path.rglob("*.ckpt")] == ["policy.ckpt"]  # nothing written


def test_killed_grpo_run_resumes_bitwise(tmp_path):
    """SIGKILL at a random step, resume=auto: every step's loss and the final weights equal an
    uninterrupted run's. Three steps per rollout and a checkpoint every 5 steps: most resumes
    start inside a rollout, which must come back from the checkpoint."""
    from .test_reliability import SETTINGS, assert_same_run, kill_and_resume

    common = [
        *grpo_overrides(tmp_path),
        "task.iterations=3",
        "task.optim.lr=5e-3",
        "callbacks.periodic_checkpoint.every_n_train_steps=5",
        "trainer.max_steps=30",
    ]
    train_run(tmp_path, "whole", *SETTINGS, *common)
    runs = tmp_path / "grpo"
    proc = kill_and_resume(tmp_path, "grpo", "killed", common, seed=16)
    assert_same_run(runs / "killed", runs / "whole", proc, steps=30)
