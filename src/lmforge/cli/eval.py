"""lmforge-eval: loss, perplexity and bits per byte of a checkpoint, on a prepared split or a text file.

lmforge-eval ckpt_path=logs/causal_lm/<run>/checkpoints/last.ckpt data=shakespeare_char
lmforge-eval ckpt_path=exports/gpt2 text_file=book.txt stride=512
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

from lmforge.cli import CONFIG_PATH, reports_errors
from lmforge.config import build
from lmforge.errors import LMForgeError


@hydra.main(config_path=CONFIG_PATH, config_name="eval", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> dict:
    import numpy as np
    import torch
    from rich.progress import Progress

    from lmforge.cli.generate import (
        describe,
        load_model_and_tokenizer,
        option,
        torch_device,
        unknown_characters,
    )
    from lmforge.evaluation import count_windows, evaluate

    positive = "use a positive number of tokens, or null for the default"
    option(cfg, "seq_len", int, lambda v: v >= 1, positive + " (the model's block_size)", True)
    option(cfg, "stride", int, lambda v: v >= 1, positive + " (seq_len)", True)
    option(cfg, "batch_size", int, lambda v: v >= 1, "use a positive number of windows")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise LMForgeError(f"precision={cfg.precision!r}: use auto, bf16 or fp32")
    device = torch_device(cfg.device)
    output = Path(cfg.output) if cfg.output else None
    if output is not None:
        check_output(output)
    model, tok = load_model_and_tokenizer(cfg.ckpt_path, cfg.tokenizer)
    seq_len = model.config.block_size if cfg.seq_len is None else cfg.seq_len
    stride = seq_len if cfg.stride is None else cfg.stride
    if seq_len > model.config.block_size:
        raise LMForgeError(
            f"seq_len={seq_len} must be in [1, block_size={model.config.block_size}]"
        )
    if stride > seq_len:
        raise LMForgeError(
            f"stride={stride} must be in [1, seq_len={seq_len}]: larger skips tokens"
        )
    if cfg.text_file is not None:
        path = Path(cfg.text_file)
        if not path.is_file():
            raise LMForgeError(f"text_file={path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LMForgeError(
                f"text_file={path} is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
        dropped, _, _ = unknown_characters(tok, text)
        if dropped:
            raise LMForgeError(
                f"text_file={path} holds characters the tokenizer does not know:"
                f" {describe(dropped)}; they would be skipped unscored: remove them, or evaluate a"
                " model whose tokenizer covers them"
            )
        streams = [np.asarray(tok.encode(text).ids, dtype=np.int64)]
        source = str(path)
    else:
        from lmforge.data.datasets import open_split
        from lmforge.data.prepare import prepare

        with open_dict(cfg):
            cfg.data.seq_len = seq_len  # the data config's default refers to a model config
        data = build(cfg.data, "data")
        if data.prepare is not None:
            prepare(data.prepare, data.dir)
        streams = open_split(data.dir, cfg.split)
        source = f"{data.dir}:{cfg.split}"
    if not any(len(s) > 1 for s in streams):
        raise LMForgeError(f"{source} holds fewer than 2 tokens: nothing to evaluate")
    if max(int(s.max()) for s in streams if len(s)) >= model.config.vocab_size:
        raise LMForgeError(
            f"{source} holds token ids beyond the model's vocabulary: another tokenizer?"
        )

    precision = (
        cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    )
    model.to(device)
    total = count_windows([len(s) for s in streams], seq_len, stride)
    with Progress(transient=True) as progress:
        bar = progress.add_task(f"evaluating {source}", total=total)
        result = evaluate(
            model,
            streams,
            seq_len,
            stride,
            cfg.batch_size,
            device,
            dtype=torch.bfloat16 if precision == "bf16" else None,
            on_batch=lambda n: progress.advance(bar, n),
        )
    # The scored text: every token of a stream but the first (special tokens decode to nothing).
    result.bytes = sum(len(tok.decode(np.asarray(s[1:]).tolist()).encode("utf-8")) for s in streams)
    out = {
        "source": source,
        "checkpoint": str(cfg.ckpt_path),
        "seq_len": seq_len,
        "stride": stride,
        "precision": precision,
        "tokens": result.tokens,
        "bytes": result.bytes,
        "loss": result.loss,
        "ppl": result.ppl,
        "bits_per_byte": result.bits_per_byte,
    }
    print(f"{'source':<40}{'tokens':>12}{'loss':>9}{'ppl':>10}{'bits/byte':>11}")
    print(
        f"{source[-40:]:<40}{result.tokens:>12,}{result.loss:>9.4f}{result.ppl:>10.3f}"
        f"{result.bits_per_byte or float('nan'):>11.4f}"
    )
    if output is not None:
        from lmforge.files import atomic_write_bytes

        atomic_write_bytes(output, json.dumps(out, indent=2).encode())
    return out


def check_output(output: Path) -> None:
    """Refuse an ``output=`` that cannot be written, before the evaluation, or that would
    overwrite a file lmforge-eval did not write (a result of an earlier run is replaced)."""
    if not output.parent.is_dir():
        raise LMForgeError(f"output={output}: directory {output.parent} does not exist; create it")
    if output.is_dir():
        raise LMForgeError(f"output={output} is a directory: name a JSON file to write")
    if not os.access(output.parent, os.W_OK):
        raise LMForgeError(f"output={output}: directory {output.parent} is not writable")
    if output.exists():
        try:
            earlier = json.loads(output.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            earlier = None
        if not (isinstance(earlier, dict) and {"checkpoint", "bits_per_byte"} <= earlier.keys()):
            raise LMForgeError(
                f"output={output} exists and is not a result of lmforge-eval: it is left as it"
                " is; name another file"
            )


if __name__ == "__main__":
    main()
