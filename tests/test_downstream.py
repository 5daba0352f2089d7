"""Zero-shot scoring (lmforge.downstream) and the lm-evaluation-harness backend (lmforge.harness):
log-likelihoods equal transformers' GPT-2 on an exported model, split at the context boundary
as the harness splits them; bad multiple-choice sets stop with one line.

The harness run on a trained checkpoint, checked against the training callback's accuracy, is in
tests/test_distributed.py (it reuses the runs there)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from lmforge.callbacks.multiple_choice import MultipleChoice
from lmforge.data.tokenizer import gpt2_tokenizer
from lmforge.downstream import MCItem, Scores, encode_pair, mc_metrics, read_mc_set, score
from lmforge.errors import LMForgeError
from lmforge.interop.hf_gpt2 import export_hf_gpt2
from lmforge.models.gpt import GPT, GPTConfig

from .conftest import ROOT

BLOCK = 24
REQUESTS = [
    ("The cat sat on the", " mat"),
    ("The cat sat on the ", "mat"),  # the space moves to the continuation: " mat" is one token
    ("Hello", ", world; and again, hello world"),
    ("", "An empty context is scored after <|endoftext|>"),
    (
        "A context far longer than the model's window of twenty-four tokens, so that it is cut"
        " from the left before the continuation is scored, as the harness does",
        " at the end",
    ),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random GPT with GPT-2's tokenizer, exported as a transformers GPT-2 directory."""
    out = tmp_path_factory.mktemp("export") / "gpt"
    tok = gpt2_tokenizer(ROOT / "data" / "gpt2_bpe")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    export_hf_gpt2(model.eval(), out, tokenizer=tok)
    return out


def test_loglikelihood_equals_transformers_gpt2_with_the_space_in_the_continuation(
    exported, tmp_path
):
    import shutil

    from lm_eval.api.instance import Instance

    from lmforge.harness import LMForgeLM

    lm = LMForgeLM(str(exported), batch_size=2, device="cpu")
    got = lm.loglikelihood(
        [Instance("loglikelihood", {}, args, i) for i, args in enumerate(REQUESTS)]
    )
    ref = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    # GPT-2's tokenizer as transformers reads it (the files under the hub checkpoint's names)
    shutil.copy(ROOT / "data/gpt2_bpe/encoder.json", tmp_path / "vocab.json")
    shutil.copy(ROOT / "data/gpt2_bpe/vocab.bpe", tmp_path / "merges.txt")
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    for (context, continuation), (logprob, greedy) in zip(REQUESTS, got):
        # The harness's split, written out: trailing spaces of the context go to the
        # continuation; the continuation is what encoding both adds to the context's tokens.
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if context:
            ctx = hf_tok(context)["input_ids"]
            cont = hf_tok(context + continuation)["input_ids"][len(ctx) :]
        else:
            ctx, cont = [hf_tok.eos_token_id], hf_tok(continuation)["input_ids"]
        ids = (ctx + cont)[-(BLOCK + 1) :]
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([ids[:-1]])).logits[0, -len(cont) :], -1)
        target = torch.tensor(cont)
        expected = logp.gather(1, target[:, None]).sum().item()
        assert abs(logprob - expected) <= 1e-5, (context, continuation, logprob, expected)
        assert greedy == bool((logp.argmax(-1) == target).all())
    assert got[0] == got[1]  # "the" + " mat" and "the " + "mat" are the same tokens
    mat = hf_tok(" mat")["input_ids"]
    assert encode_pair(lm.tok_encode, "The cat sat on the ", "mat", None)[1] == mat
    assert lm.truncated == 1  # the long context, counted


def test_rolling_loglikelihood_scores_every_token_once(exported):
    """A document longer than the window: the sum over the harness's rolling windows equals
    scoring each token after every earlier one that fits in the window, by hand."""
    from lm_eval.api.instance import Instance

    from lmforge.harness import LMForgeLM

    lm = LMForgeLM(str(exported), batch_size=3, device="cpu")
    text = "It was the best of times, it was the worst of times, it was the age of wisdom." * 3
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [lm.eot_token_id, *lm.tok_encode(text)]
    assert len(ids) > 2 * BLOCK
    expected = score(lm.model, [(ids[:1], ids[1 : BLOCK + 1])], BLOCK).logprobs[0]
    done = BLOCK + 1
    while done < len(ids):
        n = min(BLOCK, len(ids) - done)
        expected += score(
            lm.model, [(ids[done + n - BLOCK - 1 : done], ids[done : done + n])], BLOCK
        ).logprobs[0]
        done += n
    assert abs(total - expected) <= 1e-4


def test_acc_norm_divides_by_the_characters_of_each_choice():
    items = [MCItem("c", ["aaaa", "b"], 0), MCItem("c", ["x", "yy"], 1)]
    # summed: choice 1 wins the first item, choice 0 the second; per character: the reverse
    scores = Scores([-4.0, -2.0, -1.0, -1.5], [False] * 4)
    counts = mc_metrics(items, scores, [False, True])
    assert (counts.items, counts.correct, counts.correct_norm, counts.truncated) == (2, 0, 2, 1)


BAD = {
    "missing field": ({"context": "a", "label": 0}, "no 'choices' field"),
    "label out of range": (
        {"context": "a", "choices": ["b", "c"], "label": 2},
        "'label' 2 is out of range for 2 choices: use 0 to 1",
    ),
    "empty choices": ({"context": "a", "choices": [], "label": 0}, "'choices' is empty"),
    "label not an index": ({"context": "a", "choices": ["b"], "label": "b"}, "'label' is 'b'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_item_stops_with_its_line(tmp_path, case):
    record, message = BAD[case]
    path = tmp_path / "set.jsonl"
    good = {"context": "a", "choices": ["b", "c"], "label": 1}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(LMForgeError) as e:
        MultipleChoice({"bad": {"path": str(path)}})
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_hellaswag_lines_are_read_as_the_harness_reads_them(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    line = {
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "starts pulling up roofing [title] on a roof.",
        ],
        "label": "1",
    }
    path.write_text(json.dumps(line) + "\n")
    (item,) = read_mc_set(path, "hellaswag")
    assert item.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert item.choices[1] == "starts pulling up roofing. on a roof."
    assert item.label == 1


def test_a_choice_longer_than_the_context_is_refused_and_long_contexts_counted():
    from lmforge.downstream import mc_pairs

    def encode(text):
        return [ord(c) % 50 for c in text]

    items = [MCItem("abcdefghij", ["x", "y"], 0)]
    pairs = mc_pairs(encode, items, 8)
    assert [len(c) for c, _ in pairs] == [10, 10]
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=1, n_embd=8)).eval()
    assert score(model, pairs, 8).truncated == 2  # 10 + 2 tokens > 8 + 1: cut from the left
    with pytest.raises(
        LMForgeError, match="item 0 choice 1 is 9 tokens, longer than the model's 8-token context"
    ):
        mc_pairs(encode, [MCItem("ab", ["x", "yyyyyyyy"], 0)], 8, name="s")
