import math
import re

import pytest
import torch
from torchmetrics.text import Perplexity

from lmforge.models.gpt import GPTConfig, LlamaConfig
from lmforge.tasks.base import token_loss
from lmforge.tasks.causal_lm import CausalLMTask
from lmforge.tasks.optim import OptimConfig, lr_at


def test_perplexity_is_exp_of_token_weighted_mean_loss():
    """Batches with different numbers of real tokens: val/ppl = exp(sum of losses / tokens)."""
    torch.manual_seed(0)
    task = CausalLMTask(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8))
    task.eval()
    batches = []
    for n_ignored in (0, 5):
        x = torch.randint(0, 11, (3, 8))
        y = torch.randint(0, 11, (3, 8))
        y.view(-1)[:n_ignored] = -100
        batches.append((x, y))
    total, count = 0.0, 0
    reference = Perplexity(ignore_index=-100)
    with torch.no_grad():
        for i, (x, y) in enumerate(batches):
            task.validation_step((x, y), i)
            logits = task(x)
            for t in range(y.numel()):
                target = y.view(-1)[t].item()
                if target != -100:
                    total -= torch.log_softmax(logits.reshape(-1, 11)[t], -1)[target].item()
                    count += 1
            reference.update(logits, y)
    mean = task.val_loss.compute()
    assert count == 3 * 8 * 2 - 5
    assert mean.item() == pytest.approx(total / count, rel=1e-5)
    assert math.exp(mean.item()) == pytest.approx(reference.compute().item(), rel=1e-5)
    # A mean of per-batch means would differ here:
    per_batch = [token_loss(task(x), y) for x, y in batches]
    naive = sum((s / n).item() for s, n in per_batch) / 2
    assert naive != pytest.approx(mean.item(), rel=1e-6)


def test_lr_schedule_warmup_cosine_floor():
    c = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(0, c, 100) == pytest.approx(1e-3 / 11)
    assert lr_at(9, c, 100) == pytest.approx(1e-3 * 10 / 11)
    assert lr_at(10, c, 100) == pytest.approx(1e-3)
    assert lr_at(55, c, 100) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert lr_at(100, c, 100) == pytest.approx(1e-4)
    assert lr_at(500, c, 100) == pytest.approx(1e-4)
    assert lr_at(50, OptimConfig(lr=1e-3, min_lr=0, warmup_steps=0, decay_steps=50), 100) == 0


def test_optimizer_groups_decay_matrices_only():
    task = CausalLMTask(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8))
    decay, no_decay = task.param_groups()
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == task.model.num_params()  # tied weights once, nothing left out


@pytest.mark.parametrize(
    "bad", [{"lr": -1.0}, {"min_lr": 1.0, "lr": 0.1}, {"beta2": 1.0}, {"warmup_steps": -1}]
)
def test_bad_optim_values_raise(bad):
    with pytest.raises(ValueError):
        OptimConfig(**bad)


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_activation_checkpointing_gives_the_same_gradients(family):
    from lmforge.models.bert import Bert, BertConfig
    from lmforge.models.gpt import GPT

    torch.manual_seed(0)
    if family == "gpt":
        model = GPT(
            GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1)
        )
    else:
        model = Bert(
            BertConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1)
        )
    x = torch.randint(0, 50, (3, 16))
    grads = []
    for checkpointing in (False, True):
        model.checkpoint_blocks = checkpointing
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks (checkpointing replays the RNG state)
        model(x).float().pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_wsd_schedule_is_constant_then_decays_over_the_last_fraction():
    lin = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert lr_at(9, lin, 100) == pytest.approx(1e-3 * 10 / 11)  # warmup as under cosine
    assert lr_at(10, lin, 100) == lr_at(80, lin, 100) == 1e-3  # stable until 100 - 20
    assert lr_at(85, lin, 100) == pytest.approx(1e-3 - 0.25 * 9e-4)
    assert lr_at(95, lin, 100) == pytest.approx(1e-3 - 0.75 * 9e-4)
    assert lr_at(100, lin, 100) == lr_at(300, lin, 100) == 1e-4
    sqrt = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="wsd", decay_shape="1-sqrt")
    assert lr_at(80, sqrt, 100) == 1e-3
    assert lr_at(85, sqrt, 100) == pytest.approx(1e-4 + 9e-4 * (1 - 0.5))
    assert lr_at(95, sqrt, 100) == pytest.approx(1e-4 + 9e-4 * (1 - math.sqrt(0.75)))
    # decay_steps ends the decay before the run's end
    short = OptimConfig(lr=1e-3, min_lr=0, warmup_steps=0, schedule="wsd", decay_steps=50)
    assert lr_at(45, short, 100) == pytest.approx(5e-4) and lr_at(60, short, 100) == 0


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"optimizer": "sgd"}, "task.optim.optimizer must be one of adamw, muon, got 'sgd'"),
        ({"schedule": "step"}, "task.optim.schedule must be one of cosine, wsd"),
        ({"decay_shape": "cos"}, "task.optim.decay_shape must be one of linear, 1-sqrt"),
        ({"decay_fraction": 0.0}, "task.optim.decay_fraction must be in (0, 1]"),
        ({"muon_lr": 0.0}, "task.optim.muon_lr must be positive"),
        ({"muon_momentum": 1.0}, "task.optim.muon_momentum must be in [0, 1)"),
        ({"muon_adjust_lr": "x"}, "task.optim.muon_adjust_lr must be one of original"),
    ],
)
def test_bad_schedule_and_muon_values_name_the_key(bad, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        OptimConfig(**bad)


def muon_task(family: str = "gpt", **optim):
    from lmforge.models.bert import BertConfig
    from lmforge.tasks.config import CausalLMConfig, MaskedLMConfig
    from lmforge.tasks.masked_lm import MaskedLMTask

    optim = OptimConfig(optimizer="muon", muon_weight_decay=0.01, **optim)
    shape = {"vocab_size": 11, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 8}
    torch.manual_seed(0)
    if family == "bert":
        return MaskedLMTask(BertConfig(**shape), MaskedLMConfig(optim=optim))
    config = (LlamaConfig if family == "llama" else GPTConfig)(**shape)
    return CausalLMTask(config, CausalLMConfig(optim=optim))


@pytest.mark.parametrize("family", ["gpt", "llama", "bert"])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(family):
    task = muon_task(family)
    muon, decay, no_decay = task.param_groups()
    assert muon["use_muon"] and muon["lr"] == 0.02 and muon["weight_decay"] == 0.01
    block_matrices = {id(p) for p in task.model.blocks.parameters() if p.dim() == 2}
    assert {id(p) for p in muon["params"]} == block_matrices and block_matrices
    assert all(p.dim() == 2 for p in decay["params"])  # embeddings, an untied head
    assert all(p.dim() == 1 for p in no_decay["params"])  # norms and biases
    ids = [id(p) for g in (muon, decay, no_decay) for p in g["params"]]
    trained = [p for p in task.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trained)  # each once, none left out
    assert id(task.model.tok_emb.weight) in {id(p) for p in decay["params"]}


def test_one_muon_step_from_zero_momentum_is_orthogonalised():
    from lmforge.tasks.muon import MuonWithAdamW

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 16))
    bias = torch.nn.Parameter(torch.zeros(16))
    u, _, vt = torch.linalg.svd(torch.randn(32, 16), full_matrices=False)
    w.grad = u @ torch.diag(torch.logspace(-1, 1, 16)) @ vt  # singular values 0.1 .. 10
    bias.grad = torch.ones(16)
    groups = [{"params": [w], "use_muon": True, "lr": 0.1, "weight_decay": 0.0}, {"params": [bias]}]
    opt = MuonWithAdamW(groups, {}, {"lr": 1e-3})
    before = w.detach().clone()
    opt.step()
    update = (before - w.detach()) / (0.1 * math.sqrt(32 / 16))  # Muon's shape scale
    s = torch.linalg.svdvals(update)
    assert 0.6 < s.min() and s.max() < 1.3, s  # the gradient's spread of 100x is gone
    assert torch.allclose(bias.detach(), torch.full((16,), -1e-3))  # AdamW's first step: -lr


def test_muon_optimizer_state_round_trips_exactly():
    """save -> load -> step equals the uninterrupted step, the schedule's lrs included."""
    import io

    def build(task):
        opt = task.configure_optimizers()
        return opt["optimizer"], opt["lr_scheduler"]["scheduler"]

    def step(task, opt, sched, i):
        g = torch.Generator().manual_seed(i)
        for p in task.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        sched.step()

    tasks = [muon_task(warmup_steps=2), muon_task(warmup_steps=2)]
    for t in tasks:
        t.total_steps = lambda: 10
    a, b = build(tasks[0]), build(tasks[1])
    for i in range(3):
        step(tasks[0], *a, i)
    buf = io.BytesIO()
    torch.save({"opt": a[0].state_dict(), "sched": a[1].state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    tasks[1].load_state_dict(tasks[0].state_dict())
    b[0].load_state_dict(saved["opt"])
    b[1].load_state_dict(saved["sched"])
    for t, (opt, sched) in zip(tasks, (a, b), strict=True):
        step(t, opt, sched, 3)
    assert [g["lr"] for g in a[0].param_groups] == [g["lr"] for g in b[0].param_groups]
    assert b[0].muon.param_groups[0] is b[0].param_groups[0]  # the scheduler reaches Muon
    assert b[0].param_groups[0]["lr"] != b[0].param_groups[1]["lr"]  # each group's own peak
    for (name, p), q in zip(tasks[0].named_parameters(), tasks[1].parameters(), strict=True):
        assert torch.equal(p, q), name
    assert set(b[0].state) == set(tasks[1].parameters())  # Muon and AdamW state, all restored


def test_muon_training_run_lowers_the_loss(train_cfg):
    import csv
    from pathlib import Path

    from lmforge.cli.train import train

    cfg = train_cfg(
        "task/optim=muon",
        "task.optim.warmup_steps=2",
        "trainer.max_steps=12",
        "trainer.val_check_interval=12",
        "trainer.log_every_n_steps=1",
        "trainer.gradient_clip_val=1.0",
        "logger=csv",
        "callbacks=none",
    )
    train(cfg)
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.1, losses


def test_muon_is_refused_under_fsdp_and_wsd_keys_compose(train_cfg):
    from lmforge.run import check_run_settings

    with pytest.raises(
        ValueError, match=re.escape("task.optim.optimizer=muon cannot run with trainer=fsdp")
    ):
        check_run_settings(train_cfg("trainer=fsdp_cpu", "task/optim=muon"))
    check_run_settings(train_cfg("trainer=ddp_cpu", "task/optim=muon"))  # full gradients: fine
    cfg = train_cfg("task.optim.schedule=wsd", "task.optim.decay_shape=1-sqrt")
    assert (cfg.task.optim.schedule, cfg.task.optim.decay_shape) == ("wsd", "1-sqrt")


def test_a_resumed_muon_run_continues_bitwise(train_cfg, tmp_path):
    """Lightning saves and restores the one optimizer (both halves) and the schedule."""
    from pathlib import Path

    from lmforge.checkpoint import load_checkpoint
    from lmforge.cli.train import train

    def run(steps: int, *more: str):
        return train_cfg(
            "task/optim=muon",
            "task.optim.warmup_steps=2",
            "task.optim.decay_steps=6",  # the same schedule however many steps a run takes
            "run_name=r",
            "logger=none",
            "callbacks.text_samples=null",
            "trainer.limit_val_batches=0",
            "callbacks.periodic_checkpoint.every_n_train_steps=3",
            f"trainer.max_steps={steps}",
            *more,
        )

    train(run(3))
    resumed = run(6, "resume=auto")
    train(resumed)
    reference = run(6)
    reference.paths.output_dir = str(tmp_path / "reference")
    train(reference)
    a, b = (
        load_checkpoint(Path(c.paths.output_dir) / "checkpoints" / "last.ckpt")
        for c in (resumed, reference)
    )
    assert a["global_step"] == b["global_step"] == 6
    for key, value in b["state_dict"].items():
        assert torch.equal(a["state_dict"][key], value), key


def test_muon_trains_lora_adapters_of_the_block_matrices():
    from lmforge.models.lora import LoRAConfig

    task = muon_task()
    LoRAConfig(rank=2).apply(task.model)  # freezes the weights, adds trainable adapters
    task.total_steps = lambda: 10
    opt = task.configure_optimizers()["optimizer"]
    muon = opt.param_groups[0]["params"]
    adapters = [p for n, p in task.named_parameters() if "lora_" in n]
    assert {id(p) for p in muon} == {id(p) for p in adapters} and adapters
    for p in adapters:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in adapters]
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, adapters, strict=True))
