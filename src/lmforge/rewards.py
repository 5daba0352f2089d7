"""Rewards of online RL (``task=grpo``): a Python function named in the config, or a reward model.

A reward function is any importable ``module.function`` taking the prompts' texts, the sampled
responses' texts (up to, not including, the stop token) and the prompts' records, and returning
one number per response:

    def my_reward(prompts: list[str], responses: list[str], records: list[dict]) -> list[float]

``task.reward=lmforge.rewards.exact_match`` is built in: 1 when the response, stripped, is the
record's ``answer``, else 0 (a verifiable reward, as for ``experiment=grpo_arithmetic``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch

from lmforge.errors import LMForgeError

RewardFunction = Callable[[list[str], list[str], list[dict]], list[float]]


def exact_match(prompts: list[str], responses: list[str], records: list[dict]) -> list[float]:
    """1.0 where the response, stripped of surrounding white space, equals the record's
    ``answer`` (also stripped), else 0.0."""
    out = []
    for response, record in zip(responses, records, strict=True):
        if "answer" not in record:
            raise LMForgeError(
                f"task.reward=lmforge.rewards.exact_match needs an 'answer' in every prompt"
                f" record; {_describe(record)} has none: add it, or choose another task.reward"
            )
        out.append(float(response.strip() == str(record["answer"]).strip()))
    return out


def _describe(record: dict) -> str:
    text = str(record.get("instruction", record))
    return f"the record {text[:40]!r}"


def reward_function(name: str, key: str = "task.reward") -> RewardFunction:
    """The function ``name`` ("package.module.function") names; one line naming ``key`` and
    the fix when it cannot be imported or is not callable."""
    module_name, _, fn_name = name.rpartition(".")
    example = "e.g. lmforge.rewards.exact_match"
    if not module_name:
        raise LMForgeError(f"{key}={name!r}: name a function as module.function ({example})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise LMForgeError(
            f"{key}={name!r}: module {module_name!r} does not import ({e}): install it or put it"
            f" on PYTHONPATH, or name another function ({example})"
        ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise LMForgeError(
            f"{key}={name!r}: {module_name} has no function {fn_name!r}: name a function of it"
            f" ({example})"
        )
    return fn


def call_reward(
    fn: RewardFunction, name: str, prompts: list[str], responses: list[str], records: list[dict]
) -> torch.Tensor:
    """``fn``'s rewards as a float tensor, checked: one finite number per response."""
    rewards = fn(prompts, responses, records)
    try:
        values = [float(r) for r in rewards]
    except (TypeError, ValueError):
        raise LMForgeError(
            f"task.reward={name}: returned {type(rewards).__name__}, not a list of numbers"
        ) from None
    if len(values) != len(responses):
        raise LMForgeError(
            f"task.reward={name}: returned {len(values)} rewards for {len(responses)} responses:"
            " return one number per response"
        )
    if not all(math.isfinite(v) for v in values):
        raise LMForgeError(
            f"task.reward={name}: returned a non-finite reward: return finite numbers"
        )
    return torch.tensor(values, dtype=torch.float32)
