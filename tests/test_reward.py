"""Reward models: the Bradley-Terry loss, a tiny training run, export parity, lmforge-score."""

import json
import math

import pytest
import torch
from tokenizers import Tokenizer

from lmforge.checkpoint import load_model, load_reward_model
from lmforge.data.preferences import Pair, pad_pairs
from lmforge.data.tokenizer import TokenizerConfig, train_tokenizer
from lmforge.errors import LMForgeError
from lmforge.models.bert import BertConfig
from lmforge.models.gpt import GPTConfig
from lmforge.models.lora import LoRAConfig
from lmforge.tasks.config import RewardConfig
from lmforge.tasks.reward import RewardTask


def gpt_task(margin: float = 0.0, vocab: int = 16, lora: int = 0) -> RewardTask:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    task = RewardConfig(margin=margin, lora=LoRAConfig(rank=lora))
    return RewardTask(config, "gpt", pad_id=vocab - 1, task=task).eval()


def test_bradley_terry_loss_by_hand():
    task = gpt_task(margin=0.5)
    pairs = [Pair([1, 2], [3, 4, 15], [5, 15], margin=0.25), Pair([6], [7, 15], [8, 9, 10, 15])]
    batch = pad_pairs(pairs + [pairs[0].blank()], pad_id=15)
    with torch.no_grad():
        loss, diff, real = task.pair_losses(batch)

        def alone(seq):  # one sequence, unpadded
            return task(torch.tensor([seq]), torch.tensor([len(seq)])).item()

        for i, p in enumerate(pairs):
            d = alone(p.prompt + p.chosen) - alone(p.prompt + p.rejected)
            expected = math.log1p(math.exp(-(d - 0.5 - p.margin)))  # -log sigmoid(d - margin)
            assert diff[i].item() == pytest.approx(d, abs=1e-5)
            assert loss[i].item() == pytest.approx(expected, abs=1e-5)
    assert real.tolist() == [True, True, False]


@pytest.fixture
def one_thread():
    """Tiny models: one thread (two contend with each other on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_tiny_reward_model_learns_an_easy_preference(one_thread):
    """Chosen responses repeat token 3, rejected ones token 4, after random prompts."""
    task = gpt_task()
    g = torch.Generator().manual_seed(0)

    def pairs(n):
        out = []
        for _ in range(n):
            prompt = torch.randint(
                5, 15, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g
            )
            k = int(torch.randint(1, 5, (1,), generator=g))
            out.append(Pair(prompt.tolist(), [3] * k + [15], [4] * k + [15]))
        return out

    train, held_out = pad_pairs(pairs(64), 15), pad_pairs(pairs(32), 15)
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    task.train()
    with torch.no_grad():
        first = task.pair_losses(train)[0].mean().item()
    for _ in range(40):
        loss = task.pair_losses(train)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    task.eval()
    with torch.no_grad():
        _, diff, _ = task.pair_losses(held_out)
    assert loss.item() < first / 2
    assert (diff > 0).float().mean() > 0.9


def save(task: RewardTask, tok: Tokenizer, path):
    torch.save(
        {
            "hyper_parameters": dict(task.hparams),
            "state_dict": task.state_dict(),
            "tokenizer": tok.to_str(),
        },
        path,
    )


@pytest.fixture(scope="module")
def char_tok():
    return train_tokenizer(["abcdefgh ijklmnop"], TokenizerConfig(kind="char"))


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_export_matches_transformers(family, char_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.cli.export import export

    torch.manual_seed(0)
    vocab = char_tok.get_vocab_size()
    pad = char_tok.token_to_id("<|endoftext|>")
    if family == "gpt":
        config = GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=16)
    else:
        config = BertConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=16)
    task = RewardTask(config, family, pad_id=pad)
    save(task, char_tok, tmp_path / "rm.ckpt")
    rm = load_reward_model(tmp_path / "rm.ckpt")
    out = export(str(tmp_path / "rm.ckpt"), str(tmp_path / "hf"))
    hf_class = {
        "gpt": transformers.GPT2ForSequenceClassification,
        "bert": transformers.BertForSequenceClassification,
    }
    hf = hf_class[family].from_pretrained(out).eval()
    assert hf.config.num_labels == 1
    seqs = [[1, 2, 3, 4, 5, pad], [6, 7, pad], [8, 9, 10, 11]]
    ids = torch.full((3, 6), pad)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    lengths = torch.tensor([len(s) for s in seqs])
    mask = (torch.arange(6)[None] < lengths[:, None]).long()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        ours = rm(ids, lengths)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(rm.score(seqs, [[]] * 3), ours, atol=1e-6, rtol=0)
    with pytest.raises(LMForgeError, match="is a reward model, not a language model: score"):
        load_model(tmp_path / "rm.ckpt")


def test_lmforge_score_writes_rewards_and_keeps_foreign_files(char_tok, tmp_path):
    from lmforge.cli.score import ScoreConfig, score

    task = gpt_task(vocab=char_tok.get_vocab_size(), lora=2)  # adapters, merged on loading
    for name, p in task.named_parameters():
        if "lora_b" in name:
            torch.nn.init.normal_(p, std=0.5)  # (B starts at zero)
    save(task, char_tok, tmp_path / "rm.ckpt")
    (tmp_path / "in.jsonl").write_text(
        json.dumps({"prompt": "abc ", "response": "def"})
        + "\n"
        + json.dumps({"text": "hij"})
        + "\n"
    )
    c = ScoreConfig(
        str(tmp_path / "rm.ckpt"), str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    )
    rewards = score(c)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == rewards and rows[0]["response"] == "def"
    eot = char_tok.token_to_id("<|endoftext|>")
    ids = char_tok.encode("abc def").ids + [eot]
    with torch.no_grad():
        direct = task(torch.tensor([ids]), torch.tensor([len(ids)])).item()
    assert rewards[0] == pytest.approx(direct, abs=1e-5)
    score(c)  # its own output is replaced
    (tmp_path / "mine.jsonl").write_text("notes\n")
    c.out = str(tmp_path / "mine.jsonl")
    with pytest.raises(LMForgeError, match="is not an output of lmforge-score: choose another"):
        score(c)
    assert (tmp_path / "mine.jsonl").read_text() == "notes\n"
