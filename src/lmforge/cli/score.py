"""lmforge-score: score responses with a reward model, writing each record with its reward.

    lmforge-score ckpt_path=logs/reward/<run>/checkpoints/last.ckpt input=responses.jsonl \\
        out=scores.jsonl

Records are framed as the reward model's training pairs were: ``{instruction, input, response}``
through the Alpaca prompt (or the chat template), ``{prompt, response}``, or ``{text}``. The
output is written to a temporary name and renamed; an existing file is replaced only when it is
an output of lmforge-score (every record with an ``index`` and a ``reward``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lmforge.cli import CONFIG_PATH, reports_errors
from lmforge.data.instructions import ALPACA
from lmforge.errors import LMForgeError


@dataclass
class ScoreConfig:
    ckpt_path: str | None = None
    input: str | None = None
    out: str | None = None
    prompt: str = ALPACA + "### Input:\n{input}\n\n### Response:\n"
    prompt_no_input: str = ALPACA + "### Response:\n"
    chat_template: str = "auto"
    batch_size: int = 32
    device: str | None = None

    def __post_init__(self) -> None:
        for key in ("ckpt_path", "input", "out"):
            if not getattr(self, key):
                raise LMForgeError(f"lmforge-score needs {key}=<path>")
        if self.batch_size <= 0:
            raise LMForgeError(f"batch_size must be positive, got {self.batch_size}")


def ours(path: Path) -> bool:
    """Whether ``path`` holds an output of lmforge-score."""
    try:
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        return bool(first) and {"index", "reward"} <= set(json.loads(first[0]))
    except (ValueError, TypeError, UnicodeDecodeError):
        return False


def score(c: ScoreConfig) -> list[float]:
    """The reward of every record of ``c.input``, written with it to ``c.out``."""
    import torch

    from lmforge.checkpoint import load_reward_model
    from lmforge.data.instructions import Framing
    from lmforge.data.preferences import (
        PreferenceDataConfig,
        encode_responses,
        model_settings,
        read_pairs,
    )
    from lmforge.files import atomic_write_bytes

    out = Path(c.out)
    if out.exists() and (out.is_dir() or not ours(out)):
        raise LMForgeError(
            f"out={out} exists and is not an output of lmforge-score: choose another file"
        )
    records = read_pairs(c.input, "input")
    device = c.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rm = load_reward_model(c.ckpt_path, device)
    if rm.tokenizer is None:
        raise LMForgeError(f"{c.ckpt_path} carries no tokenizer: it cannot score text")
    size = rm.backbone.config.block_size
    data = PreferenceDataConfig(
        "", "", prompt=c.prompt, prompt_no_input=c.prompt_no_input,
        chat_template=c.chat_template, max_len=size,
    )  # fmt: skip
    settings = model_settings(rm.tokenizer_settings, rm.family.frame, rm.tokenizer)
    pairs = encode_responses(records, Framing(rm.tokenizer, data, settings), data, str(c.input))
    rewards = rm.score([p for p, _ in pairs], [r for _, r in pairs], c.batch_size).tolist()
    lines = [
        json.dumps({"index": i, "reward": r} | {k: v for k, v in rec.items() if k != "reward"})
        for i, (rec, r) in enumerate(zip(records, rewards, strict=True))
    ]
    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    return rewards


@hydra.main(config_path=CONFIG_PATH, config_name="score", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> list[float]:
    values = OmegaConf.to_container(cfg, resolve=True)
    c = ScoreConfig(**{f.name: values[f.name] for f in fields(ScoreConfig)})
    rewards = score(c)
    mean = sum(rewards) / len(rewards)
    print(f"scored {len(rewards)} records (mean reward {mean:.4f}): wrote {c.out}")
    return rewards


if __name__ == "__main__":
    main()
