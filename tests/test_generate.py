"""lmforge-generate from the command line: streaming, samples, stop strings, refusals."""

import subprocess
import sys

import torch

from lmforge.cli.generate import main, unknown_characters
from lmforge.data.tokenizer import TokenizerConfig, train_tokenizer
from lmforge.interop.hf_gpt2 import export_hf_gpt2
from lmforge.models.gpt import GPT, GPTConfig

from .conftest import ROOT, run_cli


def generate_subprocess(*args: str) -> subprocess.CompletedProcess:
    """``lmforge-generate`` as a console script: seconds of imports, so used once below."""
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli.generate", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_streamed_sample_stop_string_and_several_samples(tmp_path, capfd):
    def generate(*args: str) -> subprocess.CompletedProcess:
        return run_cli(capfd, main, "generate", *args)

    tok = train_tokenizer(["abcdefgh xyz\n"], TokenizerConfig(kind="char"))
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=tok.get_vocab_size(), block_size=64, n_layer=1, n_head=2, n_embd=16)
    )
    export_hf_gpt2(model, tmp_path / "m", tok)
    common = [
        f"ckpt_path={tmp_path / 'm'}",
        "prompt=abc",
        "max_new_tokens=40",
        "seed=5",
        "temperature=1.0",
    ]
    streamed = generate(*common)
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    text = streamed.stdout[: -len("\n")]  # the prompt and the sample, then a newline
    assert text.startswith("abc") and len(text) > 13
    assert "40 tokens in" in streamed.stderr and "tokens/s" in streamed.stderr
    batch = generate(*common, "stream=false")
    assert batch.stdout == f"----- sample 0 -----\n{text}\n"  # same seed, same sample
    stop = text[11:13]  # a string the sample reaches
    cut = generate(*common, f"stop='{stop}'")
    assert cut.stdout == text[: text.index(stop, 3)] + "\n"
    two = generate(*common, "stream=false", "num_samples=2", "top_p=0.9", "repetition_penalty=1.3")
    assert two.returncode == 0 and two.stdout.count("----- sample") == 2
    bad = generate_subprocess(*common, "top_p=1.5")  # the entry point's one line and status
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: top_p=1.5: use a number in (0, 1], or null for no top-p"
    bad = generate(*common, "top_k=0")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: top_k=0: use at least 1, or null for no top-k"
    bad = generate(*common, "prompt='ab😀cé'")  # outside the tokenizer's alphabet
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == (
        "error: the prompt holds characters the tokenizer does not know: 'é' (U+00E9),"
        " '😀' (U+1F600); they would be dropped: remove them, or use a model whose tokenizer"
        " covers them"
    )


def test_characters_outside_the_vocabulary_are_found_dropped_or_unknown():
    char = train_tokenizer(["abc d\n"], TokenizerConfig(kind="char"))
    assert char.encode("a😀b").ids == char.encode("ab").ids  # what goes unnoticed otherwise
    assert unknown_characters(char, "a😀b\tc d\n") == (["\t", "😀"], [], None)
    words = ["the cat sat on the mat"] * 20
    wordpiece = train_tokenizer(words, TokenizerConfig(kind="wordpiece", vocab_size=300))
    assert unknown_characters(wordpiece, "the 猫 sat\t") == ([], ["猫"], "[UNK]")
    bpe = train_tokenizer(words, TokenizerConfig(kind="bpe", vocab_size=300))
    assert unknown_characters(bpe, "the 猫 😀 é") == ([], [], None)  # bytes cover everything
