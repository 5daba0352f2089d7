"""lmforge-generate: sample text from a trained checkpoint, streaming it to the terminal.

lmforge-generate ckpt_path=logs/causal_lm/<run>/checkpoints/last.ckpt prompt="ROMEO:" top_p=0.9
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lmforge.cli import CONFIG_PATH, reports_errors
from lmforge.errors import LMForgeError


def load_model_and_tokenizer(ckpt_path, tokenizer_path):
    """The GPT and tokenizer of ``ckpt_path``; ``tokenizer_path`` for checkpoints without one."""
    from tokenizers import Tokenizer

    from lmforge.checkpoint import load_model

    if ckpt_path is None:
        raise LMForgeError("no checkpoint given: pass ckpt_path=<run dir>/checkpoints/last.ckpt")
    loaded = load_model(ckpt_path, causal=True, what="generating and scoring text")
    model, tok = loaded.model, loaded.tokenizer
    if tokenizer_path is not None:
        if not Path(tokenizer_path).is_file():
            raise LMForgeError(f"tokenizer={tokenizer_path}: no such file")
        tok = Tokenizer.from_file(str(tokenizer_path))
    if tok is None:
        raise LMForgeError(f"{ckpt_path} carries no tokenizer: pass tokenizer=<tokenizer.json>")
    if tok.get_vocab_size() > model.config.vocab_size:
        raise LMForgeError(
            f"the tokenizer has {tok.get_vocab_size()} tokens, the model {model.config.vocab_size}:"
            " they do not belong together"
        )
    return model, tok


@hydra.main(config_path=CONFIG_PATH, config_name="generate", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> list[str]:
    import torch

    if cfg.max_new_tokens <= 0:
        raise LMForgeError(f"max_new_tokens must be positive, got {cfg.max_new_tokens}")
    if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
        raise LMForgeError(f"top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.repetition_penalty <= 0:
        raise LMForgeError(f"repetition_penalty must be positive, got {cfg.repetition_penalty}")
    model, tok = load_model_and_tokenizer(cfg.ckpt_path, cfg.tokenizer)
    prompt = cfg.prompt
    if cfg.prompt_file is not None:
        if not Path(cfg.prompt_file).is_file():
            raise LMForgeError(f"prompt_file={cfg.prompt_file}: no such file")
        prompt = Path(cfg.prompt_file).read_text()
    ids = tok.encode(prompt).ids
    if not ids:
        raise LMForgeError("the prompt encodes to no tokens: pass a non-empty prompt=...")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    idx = torch.tensor([ids] * cfg.num_samples, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    stream = cfg.stream and cfg.num_samples == 1
    new: list[list[int]] = [[] for _ in range(cfg.num_samples)]
    done = [False] * cfg.num_samples
    printed = 0
    if stream:
        print(prompt, end="", flush=True)
    start = time.perf_counter()
    steps = model.generate_stream(
        idx,
        cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        repetition_penalty=cfg.repetition_penalty,
        generator=gen,
    )
    n_new = 0
    for nxt in steps:
        n_new += 1
        for i, token in enumerate(nxt[:, 0].tolist()):
            if not done[i]:
                new[i].append(token)
                done[i] = bool(cfg.stop) and cfg.stop in tok.decode(new[i])
        if stream:
            text = tok.decode(new[0])
            if cfg.stop and cfg.stop in text:
                text = text[: text.index(cfg.stop)]
            ready = text.rstrip("\ufffd")  # a character whose bytes are still coming
            for k in range(min(len(cfg.stop or ""), len(ready) + 1) - 1, 0, -1):
                if ready.endswith(cfg.stop[:k]):  # perhaps the start of the stop string
                    ready = ready[:-k]
                    break
            print(ready[printed:], end="", flush=True)
            printed = max(printed, len(ready))
        if all(done):
            break
    elapsed = time.perf_counter() - start
    samples = []
    for row in new:
        text = tok.decode(row)
        samples.append(text[: text.index(cfg.stop)] if cfg.stop and cfg.stop in text else text)
    if stream:
        print(samples[0][printed:])  # what was held back
    else:
        for i, text in enumerate(samples):
            print(f"----- sample {i} -----\n{prompt}{text}", flush=True)
    tokens = n_new * cfg.num_samples
    print(
        f"----- {tokens} tokens in {elapsed:.2f} s ({tokens / elapsed:.1f} tokens/s on {device})",
        file=sys.stderr,
    )
    return samples


if __name__ == "__main__":
    main()
