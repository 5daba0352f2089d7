"""Preference pairs: the three record forms, truncation, batches, bad input, the bundled split."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.data.chat import TokenizerSettings
from lmforge.data.instructions import Framing, render_prompt
from lmforge.data.preferences import (
    Pair,
    PreferenceDataConfig,
    PreferenceDataModule,
    check_same_tokenizer,
    encode_pairs,
    pad_pairs,
)
from lmforge.errors import LMForgeError

ROOT = Path(__file__).resolve().parents[1]
CHATML = (ROOT / "tests" / "assets" / "chat_templates" / "qwen2_5.jinja").read_text()
ALPACA = [
    {"instruction": "Say hi.", "input": "", "chosen": "Hello there.", "rejected": "What."},
    {"instruction": "Add.", "input": "1 and 2", "chosen": "It is 3.", "rejected": "3, obviously."},
]


def bpe(extra: str = "", size: int = 300) -> Tokenizer:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t.train_from_iterator(
        [render_prompt(r, PreferenceDataConfig("", "")) for r in ALPACA] * 5 + [extra], trainer
    )
    return t


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return bpe()


def encode(records, tok, settings=None, **cfg):
    c = PreferenceDataConfig("", "", **cfg)
    return encode_pairs(records, Framing(tok, c, settings), c, "prefs.json")


def test_alpaca_pairs_use_the_instruction_prompt_and_end_with_eos(tok):
    pairs, counts = encode(ALPACA, tok)
    eot = tok.token_to_id("<|endoftext|>")
    assert not counts
    for record, pair in zip(ALPACA, pairs, strict=True):
        assert pair.prompt == tok.encode(render_prompt(record, PreferenceDataConfig("", ""))).ids
        assert pair.chosen == tok.encode(record["chosen"]).ids + [eot]
        assert pair.rejected == tok.encode(record["rejected"]).ids + [eot]
    batch = pad_pairs(pairs, pad_id=eot)
    for i, pair in enumerate(pairs):
        for side in ("chosen", "rejected"):
            seq = pair.prompt + getattr(pair, side)
            n = int(batch[f"{side}_lengths"][i])
            assert batch[f"{side}_input_ids"][i, :n].tolist() == seq
            labels = batch[f"{side}_labels"][i].tolist()
            # next-token targets on the response only: the last prompt position predicts its first
            assert labels[: len(pair.prompt) - 1] == [-100] * (len(pair.prompt) - 1)
            assert labels[len(pair.prompt) - 1 : n - 1] == getattr(pair, side)
            assert labels[n - 1 :] == [-100] * (len(labels) - n + 1)
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape


def test_explicit_implicit_and_dialogue_forms_agree(tok):
    settings = TokenizerSettings(
        eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )
    text = [
        {"prompt": "Q: hi?\nA:", "chosen": " Hello.", "rejected": " Go away."},  # explicit
        {"chosen": "Q: hi?\nA: Hello.", "rejected": "Q: hi?\nA: Go away."},  # implicit (HH)
    ]
    (explicit, implicit), _ = encode(text, tok)
    assert explicit == implicit and tok.decode(explicit.chosen[:-1]) == " Hello."
    user = [{"role": "user", "content": "hi?"}]
    chat = [
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        },
        {  # a dialogue: the prompt is the shared turns before the differing reply
            "chosen": user + [{"role": "assistant", "content": "Hello."}],
            "rejected": user + [{"role": "assistant", "content": "Go away."}],
        },
    ]
    (a, b), _ = encode(chat, tok, settings)
    assert a == b
    assert tok.decode(a.prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert tok.decode(a.chosen, skip_special_tokens=False) == "Hello.<|im_end|>"


def test_truncation_keeps_the_prompts_end_and_the_responses_start(tok):
    long = {"instruction": "word " * 60, "input": "", "chosen": "yes " * 40, "rejected": "no"}
    full, _ = encode([long], tok, max_len=1000)
    short = {"prompt": "Q:", "chosen": " yes", "rejected": " no"}
    pairs, counts = encode([long, short], tok, max_len=64, max_prompt_len=20)
    p = pairs[0]
    assert p.prompt == full[0].prompt[-20:] and p.chosen == full[0].chosen[:44]
    assert p.rejected == full[0].rejected  # short enough to stay whole
    assert counts == {
        "prompt truncated (its end kept)": 1,
        "response truncated (its start kept)": 1,
    }
    _, counts = encode([long, short], tok, max_len=64, too_long="skip")
    assert counts == {"too long, skipped": 1}


@pytest.mark.parametrize(
    "record, message",
    [
        ({"instruction": "x", "chosen": "a"}, "record 1 has no 'rejected': a preference record"),
        (
            {"prompt": "x", "chosen": "a", "rejected": "a"},
            "record 1: 'chosen' and 'rejected' are the same",
        ),
        (
            {"prompt": "x", "chosen": " ", "rejected": "a"},
            "record 1 has an empty 'chosen' response",
        ),
        ({"chosen": "Q: a", "rejected": "Q: a"}, "record 1: 'chosen' and 'rejected' are the same"),
        (
            {"prompt": "word " * 80, "chosen": "a", "rejected": "b"},
            "record 1: its prompt alone has",
        ),
    ],
)
def test_bad_pairs_get_one_line_naming_the_record(tok, record, message):
    with pytest.raises(LMForgeError, match=message) as e:
        encode([record], tok, max_len=64, too_long="error")
    assert "\n" not in str(e.value) and "prefs.json" in str(e.value)


def test_bad_pairs_can_be_skipped_and_counted(tok):
    bad = [
        {"prompt": "x", "chosen": "a", "rejected": "a"},
        {"prompt": "x", "chosen": "", "rejected": "b"},
    ]
    pairs, counts = encode(bad + ALPACA, tok, on_bad_pair="skip")
    assert len(pairs) == 2
    assert counts == {"chosen == rejected, skipped": 1, "empty chosen, skipped": 1}


def test_a_reward_models_other_tokenizer_is_refused(tok):
    check_same_tokenizer(tok, Tokenizer.from_str(tok.to_str()), "grpo")
    with pytest.raises(
        LMForgeError,
        match=r"^grpo: the reward model's tokenizer is not the policy's \(a vocabulary of 280 tokens, the policy.s 300\)",
    ):
        check_same_tokenizer(tok, bpe(size=280), "grpo")


def test_bundled_split_and_batches(tmp_path):
    from lmforge.data.tokenizer import gpt2_tokenizer

    data = ROOT / "data" / "preferences"
    cfg = PreferenceDataConfig(
        str(data / "train.json"), str(data / "val.json"), str(data / "test.json"), batch_size=8
    )
    held_out = json.loads((data / "test.json").read_text()) + json.loads(
        (data / "val.json").read_text()
    )
    trained = {
        (r["instruction"], r["input"])
        for r in json.loads((ROOT / "data/instructions/train.json").read_text())
    }
    assert not any((r["instruction"], r["input"]) in trained for r in held_out)
    dm = PreferenceDataModule(cfg, gpt2_tokenizer(ROOT / "data" / "gpt2_bpe"), seed=3)
    dm.setup("fit")
    assert [len(dm.sets[s]) for s in ("train", "val", "test")] == [931, 50, 104]
    first = [b["chosen_input_ids"] for b, _ in zip(dm.train_dataloader(), range(2))]
    again = [b["chosen_input_ids"] for b, _ in zip(dm.train_dataloader(), range(2))]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    batch = next(iter(dm.val_dataloader()))
    assert batch["real"].all() and batch["rejected_labels"].shape[0] == 8
    blank = pad_pairs([Pair([1, 2], [3], [4]).blank()], pad_id=0)
    assert not blank["real"].any() and (blank["chosen_labels"] == -100).all()
