"""DPO: the losses and rewards against a hand computation, the references (a frozen copy, the
policy with its adapters off, precomputed log-probs) against each other, bad settings."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from lmforge.data.preferences import Pair, pad_pairs
from lmforge.errors import LMForgeError
from lmforge.models.lora import LoRAConfig, LoRALinear, adapters_off
from lmforge.tasks.config import DPOConfig
from lmforge.tasks.dpo import METRICS, DPOTask

MODEL = {"vocab_size": 40, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}


def hand_batch():
    """Two pairs of different lengths as the data module batches them (``pad_pairs``), and
    each pair as (prompt length, chosen sequence, rejected sequence)."""
    pairs = [Pair([3, 5, 7], [9, 11, 1], [12, 1]), Pair([2, 4], [8, 1], [13, 14, 15, 1])]
    batch = pad_pairs(pairs, pad_id=0)
    return batch, [(len(p.prompt), p.prompt + p.chosen, p.prompt + p.rejected) for p in pairs]


def hand_logp(model, seq: list[int], prompt_len: int) -> float:
    """Sum over the response tokens of log p(token | everything before), one position at a time."""
    total = 0.0
    with torch.no_grad():
        for t in range(prompt_len, len(seq)):
            logits = model(torch.tensor([seq[:t]]))[0, -1].double()
            total += (logits[seq[t]] - torch.logsumexp(logits, 0)).item()
    return total


def models():
    torch.manual_seed(0)
    policy = DPOTask(MODEL, {"beta": 0.1}).model.eval()
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))  # as if trained a little
    return policy, reference


@functools.cache
def by_hand():
    """The models, the batch, and each pair's log-probs computed one position at a time."""
    policy, reference = models()
    batch, pairs = hand_batch()
    logps = [
        [hand_logp(m, seq, n) for m in (policy, reference) for seq in (c, r)] for n, c, r in pairs
    ]
    return policy, reference, batch, logps


@pytest.mark.parametrize(
    ("loss", "smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)]
)
def test_loss_and_rewards_equal_a_hand_computation(loss, smoothing):
    policy, reference, batch, logps = by_hand()
    beta = 0.3
    task = DPOTask(MODEL, {"loss": loss, "beta": beta, "label_smoothing": smoothing}).eval()
    task.model.load_state_dict(policy.state_dict())
    task.set_reference(reference)
    losses, real, values = task.pair_terms(batch, "train")
    assert real.tolist() == [True, True]
    for i, (pc, pr, rc, rr) in enumerate(logps):
        z = (pc - rc) - (pr - rr)
        want = {
            "sigmoid": -(1 - smoothing) * math.log(1 / (1 + math.exp(-beta * z)))
            - smoothing * math.log(1 / (1 + math.exp(beta * z))),
            "ipo": (z - 1 / (2 * beta)) ** 2,
            "hinge": max(0.0, 1 - beta * z),
        }[loss]
        rewards = (beta * (pc - rc), beta * (pr - rr))
        expect = [*rewards, rewards[0] - rewards[1], float(rewards[0] > rewards[1]), pc, pr]
        assert losses[i].item() == pytest.approx(want, rel=1e-4, abs=1e-5)
        got = dict(zip(METRICS, values[:, i].tolist(), strict=True))
        assert got == pytest.approx(dict(zip(METRICS, expect, strict=True)), rel=1e-4, abs=1e-5)


def test_adapters_off_is_the_base_model():
    torch.manual_seed(0)
    task = DPOTask(MODEL, {"lora": {"rank": 4}})
    base = copy.deepcopy(task.model).eval()
    with torch.no_grad():
        for m in task.model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.2)  # as if trained
    x = torch.randint(0, 40, (2, 10))
    task.model.eval()
    with torch.no_grad():
        adapted = task.model(x)
        with adapters_off(task.model):
            off = task.model(x)
        again = task.model(x)
    assert not torch.allclose(adapted, off)
    assert torch.equal(again, adapted)  # the adapters are back
    with torch.no_grad():
        for m in base.modules():  # the base model of the copy: the LoRA wrappers at B = 0
            if isinstance(m, LoRALinear):
                m.lora_b.zero_()
        torch.testing.assert_close(off, base(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss": "dpo"}, r"task.loss='dpo': use sigmoid \(DPO\), ipo or hinge"),
        ({"beta": 0.0}, "task.beta=0.0: use a positive number"),
        ({"beta": -1.0}, "task.beta=-1.0: use a positive number"),
        ({"label_smoothing": 0.5}, r"task.label_smoothing=0.5: use a value in \[0, 0.5\)"),
        ({"loss": "ipo", "label_smoothing": 0.1}, "applies to task.loss=sigmoid only"),
        ({"reference": "adapters_off"}, "needs LoRA adapters: set task.lora.rank"),
        ({"reference": "frozen"}, "task.reference='frozen': use copy, adapters_off"),
        (
            {"reference_from": "x.ckpt", "lora": {"rank": 4}},
            "is a separate model: set task.reference=copy",
        ),
    ],
)
def test_bad_settings_name_the_key_and_the_fix(overrides, message):
    from omegaconf import OmegaConf

    from lmforge.config import build

    with pytest.raises(LMForgeError, match=message):
        build(OmegaConf.create(overrides), "task", DPOConfig)


def test_reference_defaults_to_adapters_off_with_lora():
    assert DPOConfig().reference == "copy"
    assert DPOConfig(lora=LoRAConfig(rank=8)).reference == "adapters_off"
