"""lmforge-eval: token-weighted loss and perplexity of a checkpoint on a prepared split.

lmforge-eval ckpt_path=logs/causal_lm/<run>/checkpoints/last.ckpt data=shakespeare_char
"""

from __future__ import annotations

import json
import math

import hydra
from omegaconf import DictConfig

from lmforge.cli import CONFIG_PATH, reports_errors
from lmforge.config import build
from lmforge.errors import LMForgeError


@hydra.main(config_path=CONFIG_PATH, config_name="eval", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from lmforge.checkpoint import load_gpt
    from lmforge.data.datasets import SequentialWindows, open_split
    from lmforge.tasks.base import token_loss

    if cfg.ckpt_path is None:
        raise LMForgeError("no checkpoint given: pass ckpt_path=<run dir>/checkpoints/last.ckpt")
    data = build(cfg.data, "data")
    model, _ = load_gpt(cfg.ckpt_path)
    seq_len = min(data.seq_len, model.config.block_size)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    loader = DataLoader(
        SequentialWindows(open_split(data.dir, cfg.split), seq_len), batch_size=data.batch_size
    )
    loss_sum, n_tokens = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            s, n = token_loss(model(x.to(device)), y.to(device))
            loss_sum += s.item()
            n_tokens += int(n)
    loss = loss_sum / n_tokens
    result = {"split": cfg.split, "tokens": n_tokens, "loss": loss, "ppl": math.exp(loss)}
    print(f"{'split':<8}{'tokens':>12}{'loss':>10}{'ppl':>10}")
    print(f"{cfg.split:<8}{n_tokens:>12,}{loss:>10.4f}{math.exp(loss):>10.3f}")
    if cfg.output:
        with open(cfg.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
