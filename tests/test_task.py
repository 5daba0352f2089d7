import math

import pytest
import torch
from torchmetrics.text import Perplexity

from lmforge.models.gpt import GPTConfig
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
