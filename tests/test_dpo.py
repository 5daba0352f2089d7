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


def test_a_resumed_example_stream_continues_where_it_stopped():
    """GlobalBatches.resume: a run resumed after 1 pass and 3 batches draws what the
    uninterrupted run draws from there on, the next passes too (through the DataLoader, which
    draws its base seed from the same generator)."""
    from lmforge.data.datamodule import GlobalBatches

    def loader(resume=None):
        generator = torch.Generator().manual_seed(7)
        batches = GlobalBatches(22, 4, generator)  # 6 batches a pass, the last short
        if resume:
            batches.resume(*resume)
        return torch.utils.data.DataLoader(
            list(range(22)), batch_sampler=batches, generator=generator
        )

    whole = loader()
    passes = [[b.tolist() for b in whole] for _ in range(3)]
    resumed = loader((1, 3))
    after = [[b.tolist() for b in resumed] for _ in range(2)]
    assert after == [passes[1][3:], passes[2]]
    assert passes[1] != passes[2]  # the passes differ: a resumed run could not skip the replay


def test_adapters_off_reference_trains_as_a_frozen_copy():
    """Three AdamW steps of LoRA DPO against a frozen copy of the base model and against the
    policy with its adapters off: the same losses and adapters, within 1e-5."""
    torch.manual_seed(0)
    base = DPOTask(MODEL).model
    g = torch.Generator().manual_seed(1)

    def rand(n: int) -> list[int]:
        return torch.randint(2, 40, (n,), generator=g).tolist()

    batches = [
        pad_pairs([Pair(rand(4), rand(3) + [1], rand(2) + [1]) for _ in range(3)], 0)
        for _ in range(3)
    ]
    runs = []
    for reference in ("copy", "adapters_off"):
        task = DPOTask(MODEL, {"lora": {"rank": 4}, "reference": reference, "beta": 0.5})
        task.model.load_state_dict(base.state_dict(), strict=False)
        torch.manual_seed(2)  # the same adapters' initialisation
        for m in task.model.modules():
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_a, std=0.3)
        if reference == "copy":
            task.set_reference(copy.deepcopy(base))
        trained = [p for p in task.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trained, lr=0.05)
        losses = []
        for batch in batches:
            loss = task.pair_terms(batch, "train")[0].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs.append((losses, [p.detach().clone() for p in trained]))
    (a, wa), (b, wb) = runs
    assert a == pytest.approx(b, abs=1e-5) and a[0] != pytest.approx(a[-1], abs=1e-3)
    assert max((x - y).abs().max().item() for x, y in zip(wa, wb, strict=True)) <= 1e-5


def test_a_reference_of_another_model_is_refused(tmp_path):
    from lmforge.checkpoint import load_model
    from lmforge.data.tokenizer import TokenizerConfig, train_tokenizer
    from lmforge.tasks.dpo import reference_model, refuse_other_reference

    tok = train_tokenizer(["hello world"], TokenizerConfig(kind="char"))
    other = train_tokenizer(["goodbye moon"], TokenizerConfig(kind="char"))

    def save(name: str, model: dict, tokenizer) -> str:
        task = DPOTask(model)
        torch.save(
            {
                "hyper_parameters": dict(task.hparams),
                "state_dict": task.state_dict(),
                "tokenizer": tokenizer.to_str(),
                "dpo_reference_sha256": "0" * 64,
            },
            tmp_path / name,
        )
        return str(tmp_path / name)

    policy = load_model(save("policy.ckpt", MODEL, tok))
    deeper = save("deeper.ckpt", MODEL | {"n_layer": 3}, tok)
    with pytest.raises(
        LMForgeError,
        match=r"task.reference_from=.*deeper.ckpt holds another architecture than init_from"
        r" \(n_layer=3 \(init_from: 2\)\): use a checkpoint of the policy's architecture",
    ):
        reference_model(deeper, policy)
    with pytest.raises(LMForgeError, match="another tokenizer than init_from: use a checkpoint"):
        reference_model(save("other_tok.ckpt", MODEL, other), policy)
    assert reference_model(save("same.ckpt", MODEL, tok), policy) is not None
    with pytest.raises(
        LMForgeError, match="trained against another reference model than init_from"
    ):
        refuse_other_reference(tmp_path / "policy.ckpt", "1" * 64, DPOConfig())
    refuse_other_reference(tmp_path / "policy.ckpt", "0" * 64, DPOConfig())  # the same: resumes
