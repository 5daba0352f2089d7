"""lmforge-eval: bits per byte and sliding windows against hand computations."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.cli.eval import main
from lmforge.data.tokenizer import TokenizerConfig, train_tokenizer
from lmforge.evaluation import evaluate, windows
from lmforge.interop.hf_gpt2 import export_hf_gpt2
from lmforge.models.gpt import GPT, GPTConfig

from .conftest import ROOT, run_cli

TEXT = "Ünïcode: 中文 and ASCII, a café — 12 bytes here, fewer characters.\n" * 3


@pytest.fixture
def tiny_model():
    tok = train_tokenizer([TEXT], TokenizerConfig(kind="char"))
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=tok.get_vocab_size(), block_size=32, n_layer=1, n_head=2, n_embd=16)
    ).eval()
    return model, tok


def hand_nll(model, ids: list[int], seq_len: int) -> tuple[float, int]:
    """Summed NLL over tokens 1..N-1 with non-overlapping windows of seq_len inputs."""
    total, count = 0.0, 0
    for b in range(0, len(ids) - 1, seq_len):
        x = torch.tensor(ids[b : min(b + seq_len, len(ids) - 1)])
        y = torch.tensor(ids[b + 1 : b + 1 + len(x)])
        with torch.no_grad():
            total += F.cross_entropy(model(x[None])[0], y, reduction="sum").item()
        count += len(y)
    return total, count


def test_windows_score_every_token_once():
    for n, L, S in [(10, 4, 4), (10, 4, 1), (100, 32, 7), (33, 32, 32), (2, 8, 8)]:
        scored = []
        for begin, end, first in windows(n, L, S):
            assert end - begin <= L
            scored += range(first, end + 1)
        assert scored == list(range(1, n))


def test_bits_per_byte_by_hand_through_the_cli(tiny_model, tmp_path, capfd):
    model, tok = tiny_model
    export_hf_gpt2(model, tmp_path / "model", tok)
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    proc = run_cli(
        capfd,
        main,
        "eval",
        f"ckpt_path={tmp_path / 'model'}",
        f"text_file={text_file}",
        f"output={tmp_path / 'r.json'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    ids = tok.encode(TEXT).ids
    nll, count = hand_nll(model, ids, 32)
    n_bytes = len(TEXT[1:].encode("utf-8"))  # one token per character: all but the first scored
    assert n_bytes > len(TEXT) - 1  # multi-byte characters: bytes and characters differ
    assert result["tokens"] == count == len(ids) - 1
    assert result["bytes"] == n_bytes
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert "bits/byte" in proc.stdout


def test_stride_equal_to_context_is_the_non_overlapping_result(tiny_model):
    model, tok = tiny_model
    ids = np.asarray(tok.encode(TEXT).ids)
    nll, count = hand_nll(model, ids.tolist(), 16)
    same = evaluate(model, [ids], seq_len=16, stride=16, batch_size=3)
    assert same.tokens == count
    assert same.loss_sum == pytest.approx(nll, rel=1e-5)
    sliding = evaluate(model, [ids], seq_len=16, stride=4, batch_size=3)
    assert sliding.tokens == count  # every token once, now with more context
    assert sliding.loss_sum != pytest.approx(nll, rel=1e-5)


def test_zero_stride_or_seq_len_and_an_unwritable_output_are_refused(tiny_model, tmp_path, capfd):
    model, tok = tiny_model
    export_hf_gpt2(model, tmp_path / "model", tok)
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT, encoding="utf-8")

    def run(*args: str) -> subprocess.CompletedProcess:
        return run_cli(capfd, main, "eval", f"ckpt_path={tmp_path / 'model'}", *args)

    def run_subprocess(*args: str) -> subprocess.CompletedProcess:
        """``lmforge-eval`` as a console script: seconds of imports, so used once below."""
        return subprocess.run(
            [sys.executable, "-m", "lmforge.cli.eval", f"ckpt_path={tmp_path / 'model'}", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )

    errors = {
        "stride=0": "error: stride=0: use a positive number of tokens, or null for the default"
        " (seq_len)",
        "seq_len=0": "error: seq_len=0: use a positive number of tokens, or null for the default"
        " (the model's block_size)",
        f"output={tmp_path / 'no' / 'r.json'}": f"error: output={tmp_path / 'no' / 'r.json'}:"
        f" directory {tmp_path / 'no'} does not exist; create it",
    }
    for arg, error in errors.items():
        proc = run(f"text_file={text_file}", arg)
        assert (proc.returncode, proc.stderr.strip()) == (2, error)
    proc = run_subprocess(f"text_file={text_file}", "stride=0")  # the entry point's status
    assert (proc.returncode, proc.stderr.strip()) == (2, errors["stride=0"])
    (tmp_path / "t2.txt").write_text("abc 😀\n", encoding="utf-8")  # outside the alphabet
    proc = run(f"text_file={tmp_path / 't2.txt'}")
    assert (
        proc.returncode == 2 and "'😀' (U+1F600)" in proc.stderr and "Traceback" not in proc.stderr
    )
