"""lmforge-generate: sample text from a trained checkpoint.

lmforge-generate ckpt_path=logs/causal_lm/<run>/checkpoints/last.ckpt prompt="ROMEO:"
"""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig

from lmforge.cli import CONFIG_PATH, reports_errors
from lmforge.errors import LMForgeError


@hydra.main(config_path=CONFIG_PATH, config_name="generate", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    import torch

    from lmforge.checkpoint import load_gpt

    if cfg.ckpt_path is None:
        raise LMForgeError("no checkpoint given: pass ckpt_path=<run dir>/checkpoints/last.ckpt")
    if cfg.max_new_tokens <= 0:
        raise LMForgeError(f"max_new_tokens must be positive, got {cfg.max_new_tokens}")
    model, tok = load_gpt(cfg.ckpt_path)
    if tok is None:
        raise LMForgeError(
            f"{cfg.ckpt_path} carries no tokenizer: it was not written by lmforge-train"
        )
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    ids = tok.encode(cfg.prompt).ids
    if not ids:
        raise LMForgeError("the prompt encodes to no tokens: pass a non-empty prompt=...")
    idx = torch.tensor([ids] * cfg.num_samples, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    start = time.perf_counter()
    out = model.generate(
        idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, generator=gen
    )
    elapsed = time.perf_counter() - start
    for i, row in enumerate(out.tolist()):
        print(f"----- sample {i} -----\n{tok.decode(row)}")
    n = cfg.max_new_tokens * cfg.num_samples
    print(f"----- {n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tokens/s on {device})")


if __name__ == "__main__":
    main()
