"""Instruction tuning data: response-only labels, packing, bad records."""

import pytest
import torch

from lmforge.data.instructions import InstructionDataConfig, encode_records, pack, render_prompt
from lmforge.data.tokenizer import TokenizerConfig, train_tokenizer
from lmforge.errors import LMForgeError
from lmforge.models.gpt import GPT, GPTConfig

RECORDS = [
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Add.", "input": "1 and 2", "output": "3"},
]


@pytest.fixture
def tok():
    text = "".join(render_prompt(r, InstructionDataConfig("", "")) + r["output"] for r in RECORDS)
    return train_tokenizer([text + "xyz"], TokenizerConfig(kind="char"))


def test_prompt_positions_carry_minus_100_and_response_positions_do_not(tok):
    cfg = InstructionDataConfig("", "")
    examples, counts = encode_records(RECORDS, tok, cfg, "train")
    assert not counts
    eot = tok.token_to_id("<|endoftext|>")
    for record, (ids, labels) in zip(RECORDS, examples, strict=True):
        prompt = tok.encode(render_prompt(record, cfg)).ids
        response = tok.encode(record["output"]).ids + [eot]
        assert ids == (prompt + response)[:-1] and len(labels) == len(ids)
        assert labels[: len(prompt) - 1] == [-100] * (len(prompt) - 1)  # the prompt: context only
        assert labels[len(prompt) - 1 :] == response  # every response token, <|endoftext|> too
    assert "### Input:\n1 and 2" in render_prompt(RECORDS[1], cfg)
    assert "### Input" not in render_prompt(RECORDS[0], cfg)


def test_packed_rows_keep_examples_apart(tok):
    cfg = InstructionDataConfig("", "")
    examples, _ = encode_records(RECORDS * 3, tok, cfg, "train")
    row_len = len(examples[0][0]) + len(examples[1][0]) + 5
    rows = pack(examples, row_len, pad_id=0)
    assert len(rows) == 3
    row = rows[0]
    n0, n1 = len(examples[0][0]), len(examples[1][0])
    assert (
        row["segments"].tolist() == [0] * n0 + [1] * n1 + [2] * 5
    )  # padding: a segment of its own
    assert row["labels"][n0 + n1 :].eq(-100).all()
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=tok.get_vocab_size(), block_size=row_len, n_layer=2, n_head=2, n_embd=16
        )
    ).eval()
    batch = torch.stack([r["input_ids"] for r in rows])
    segments = torch.stack([r["segments"] for r in rows])
    with torch.no_grad():
        packed = model(batch, segments=segments)
        alone = model(torch.tensor([examples[1][0]]))
        perturbed = batch.clone()
        perturbed[0, :n0] = (perturbed[0, :n0] + 1) % tok.get_vocab_size()
        again = model(perturbed, segments=segments)
    torch.testing.assert_close(packed[0, n0 : n0 + n1], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(again[0, n0:], packed[0, n0:])  # the first example does not reach the second


def test_bad_records_are_refused_or_counted(tok):
    missing = [{"instruction": "Say hi.", "input": ""}, *RECORDS]
    with pytest.raises(
        LMForgeError, match="train record 1 has no 'output'.*on_missing_output=skip"
    ):
        encode_records(missing, tok, InstructionDataConfig("", ""), "train")
    examples, counts = encode_records(
        missing, tok, InstructionDataConfig("", "", on_missing_output="skip"), "train"
    )
    assert len(examples) == 2 and counts["no output"] == 1
    prompt_len = len(tok.encode(render_prompt(RECORDS[1], InstructionDataConfig("", ""))).ids)
    short = InstructionDataConfig("", "", max_len=prompt_len)  # room for no response token
    with pytest.raises(LMForgeError, match="record 2 has .* tokens, more than data.max_len"):
        encode_records(
            RECORDS, tok, InstructionDataConfig("", "", max_len=prompt_len, too_long="error"), "val"
        )
    kept, counts = encode_records(RECORDS, tok, short, "val")
    assert counts["too long, skipped"] >= 1  # the prompt alone fills the context
    first = len(tok.encode(render_prompt(RECORDS[0], InstructionDataConfig("", ""))).ids)
    cut = InstructionDataConfig("", "", max_len=first + 1)  # "hi" + <|endoftext|> does not fit
    kept, counts = encode_records(RECORDS[:1], tok, cut, "val")
    assert counts["response truncated"] == 1 and len(kept[0][0]) == first + 1


def test_no_usable_record_says_why_with_a_char_tokenizer_of_other_text():
    """A char vocabulary of Shakespeare (no '#', no digits) and a 64-token context, as the
    `make train` model has: every Alpaca prompt is longer than the context."""
    shakespeare = train_tokenizer(
        ["First Citizen:\nBefore we proceed any further, hear me speak."],
        TokenizerConfig(kind="char"),
    )
    with pytest.raises(LMForgeError) as info:
        encode_records(
            RECORDS, shakespeare, InstructionDataConfig("", "", max_len=64), "train.json"
        )
    message = str(info.value)
    assert message.startswith("train.json holds no usable record: of 2, 2 too long for")
    assert "data.max_len=64 (the shortest prompt takes" in message
    assert "2 hold characters the tokenizer lacks" in message and "'#'" in message
    assert "'3'" in message and "raise data.max_len" in message and "\n" not in message


def test_an_instruction_checkpoint_with_adapters_loads_merged(tmp_path):
    """load_model (lmforge-generate, -eval, -export) folds LoRA adapters into the weights."""
    from lmforge.checkpoint import load_model
    from lmforge.models.lora import LoRALinear
    from lmforge.tasks.instruction import InstructionTask

    torch.manual_seed(0)
    model = {"vocab_size": 40, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}
    task = InstructionTask(model, {"lora": {"rank": 4}}).eval()
    with torch.no_grad():
        for m in task.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.1)  # as if trained
    torch.save(
        {"hyper_parameters": dict(task.hparams), "state_dict": task.state_dict()},
        tmp_path / "i.ckpt",
    )
    merged = load_model(tmp_path / "i.ckpt").model
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    x = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), task.model(x), rtol=1e-5, atol=1e-5)
