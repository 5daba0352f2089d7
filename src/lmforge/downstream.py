"""Zero-shot scoring of a causal LM: log-likelihoods of continuations and multiple-choice accuracy.

One scoring path serves both the lm-evaluation-harness backend (``lmforge.harness``) and the
multiple-choice callback run during training (``lmforge.callbacks.multiple_choice``), so that a
task scored by either gives the same numbers:

- :func:`encode_pair` splits (context, continuation) text into tokens the way the harness's
  ``TemplateLM`` does: whitespace at the end of the context moves to the continuation, and the
  continuation's tokens are those of ``context + continuation`` after the context's (so a
  leading space is tokenised with the word it precedes, as in training text);
- :func:`score` runs (context tokens, continuation tokens) pairs through the model in
  right-padded batches, truncating from the left what exceeds the model's context as the
  harness's ``HFLM`` does, and returns each continuation's summed log-probability and whether it
  is the greedy continuation;
- :func:`mc_metrics` turns the scores of each item's choices into ``acc`` (the choice of highest
  summed log-probability) and ``acc_norm`` (highest log-probability per character of the choice),
  the harness's definitions for ``output_type: multiple_choice``.

Multiple-choice sets are JSONL files, one item a line: ``{"context": str, "choices": [str, ...],
"label": int}`` (``format: lmforge``), or the HellaSwag release's lines (``format: hellaswag``:
``ctx_a``, ``ctx_b``, ``activity_label``, ``endings``, ``label``), preprocessed as the harness's
``hellaswag`` task does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.errors import LMForgeError

Pair = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def encode_pair(
    encode: Callable[[str], list[int]], context: str, continuation: str, prefix_id: int | None
) -> Pair:
    """The tokens of ``context`` and of ``continuation`` after it, split as lm-evaluation-harness
    splits them (``TemplateLM.loglikelihood`` and ``_encode_pair``). An empty context is the
    ``prefix_id`` token (end of text) alone."""
    if context == "":
        cont = encode(continuation)
        if prefix_id is None:
            raise LMForgeError(
                "an empty context is scored after an end-of-text token, and this tokenizer has"
                " none (<|endoftext|> or [SEP]): give every item a context"
            )
        if cont and cont[0] == prefix_id:
            return cont[:1], cont[1:]
        return [prefix_id], cont
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx) :]


@dataclass
class Scores:
    """What :func:`score` returns: per pair, in the order given."""

    logprobs: list[float] = field(default_factory=list)  # summed over the continuation, nats
    greedy: list[bool] = field(default_factory=list)  # every continuation token is the argmax
    truncated: int = 0  # pairs longer than the model's context, cut from the left


@torch.no_grad()
def score(
    model: torch.nn.Module,
    pairs: Sequence[Pair],
    max_len: int,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    min_batches: int = 0,
) -> Scores:
    """Summed log-probabilities of each pair's continuation given its context (see the module
    docstring). Pairs are batched longest first, right-padded (a causal model's real tokens never
    attend to the padding after them). Input is ``(context + continuation)[-(max_len + 1):][:-1]``.
    ``min_batches``: run at least this many forwards (an empty share of a sharded model's rank
    must still take part in every forward's all-gather). ``dtype``: autocast to it."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    out = Scores([0.0] * len(pairs), [False] * len(pairs))
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise LMForgeError(
                f"a continuation encodes to no tokens (pair {i}): the tokenizer drops its text"
            )
        if not ctx:
            raise LMForgeError(
                f"a context encodes to no tokens (pair {i}): the tokenizer drops its text"
            )
        if len(cont) > max_len:
            raise LMForgeError(
                f"a continuation of {len(cont)} tokens (pair {i}) is longer than the model's"
                f" context of {max_len}: it cannot be scored"
            )
        out.truncated += len(ctx) + len(cont) > max_len + 1
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    for batch in batches:
        inputs = [(pairs[i][0] + pairs[i][1])[-(max_len + 1) :][:-1] for i in batch]
        width = len(inputs[0])  # the longest: sorted
        x = torch.zeros(len(batch), width, dtype=torch.long)
        for row, ids in enumerate(inputs):
            x[row, : len(ids)] = torch.tensor(ids)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x.to(device))  # (B, width, vocab)
        for row, i in enumerate(batch):
            cont = pairs[i][1]
            n = len(inputs[row])
            logp = F.log_softmax(logits[row, n - len(cont) : n].float(), dim=-1)  # (len(cont), V)
            target = torch.tensor(cont, device=logp.device)
            out.logprobs[i] = logp.gather(1, target[:, None]).sum().item()
            out.greedy[i] = bool((logp.argmax(-1) == target).all())
    for _ in range(min_batches - len(batches)):
        model(torch.zeros(1, 1, dtype=torch.long, device=device))
    return out


def loglikelihoods(
    model: torch.nn.Module,
    encode: Callable[[str], list[int]],
    requests: Sequence[tuple[str, str]],
    max_len: int,
    prefix_id: int | None = None,
    **kwargs,
) -> Scores:
    """:func:`score` of (context, continuation) text pairs, tokenised by :func:`encode_pair`."""
    pairs = [encode_pair(encode, ctx, cont, prefix_id) for ctx, cont in requests]
    return score(model, pairs, max_len, **kwargs)


@dataclass
class MCItem:
    context: str
    choices: list[str]
    label: int


MC_FORMATS = ("lmforge", "hellaswag")


@dataclass
class MCSet:
    """A multiple-choice set named in the config (``callbacks.multiple_choice.sets.<name>``)."""

    path: str  # a JSONL file, one item a line
    format: str = (
        "lmforge"  # lmforge: context, choices, label; hellaswag: the HellaSwag release's lines
    )
    delimiter: str = " "  # put between the context and each choice (the harness's target_delimiter)
    limit: int | None = None  # score only the first this-many items

    def __post_init__(self) -> None:
        if self.format not in MC_FORMATS:
            raise ValueError(f"format={self.format!r}: use one of {', '.join(MC_FORMATS)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit}: use a positive number of items, or null")


def hellaswag_preprocess(text: str) -> str:
    """The harness's cleaning of HellaSwag text (``tasks/hellaswag/utils.py``): WikiHow's
    bracketed artifacts removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _item(record: dict, fmt: str, where: str) -> MCItem:
    if fmt == "hellaswag":
        need = ("ctx_a", "ctx_b", "activity_label", "endings", "label")
    else:
        need = ("context", "choices", "label")
    missing = [k for k in need if k not in record]
    if missing:
        raise LMForgeError(
            f"{where}: no {', '.join(repr(k) for k in missing)} field: each line of a"
            f" format={fmt} set needs {', '.join(need)}"
        )
    if fmt == "hellaswag":
        ctx = record["ctx_a"] + " " + record["ctx_b"].capitalize()
        context = hellaswag_preprocess(record["activity_label"] + ": " + ctx)
        choices, label = record["endings"], record["label"]
        if isinstance(choices, list) and all(isinstance(c, str) for c in choices):
            choices = [hellaswag_preprocess(c) for c in choices]
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)
    else:
        context, choices, label = record["context"], record["choices"], record["label"]
    key = "endings" if fmt == "hellaswag" else "choices"
    if not isinstance(context, str):
        raise LMForgeError(f"{where}: the context is {type(context).__name__}: use a string")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise LMForgeError(f"{where}: {key!r} must be a list of strings")
    if not choices:
        raise LMForgeError(f"{where}: {key!r} is empty: an item needs at least one choice")
    if any(c == "" for c in choices):
        raise LMForgeError(f"{where}: {key!r} holds an empty choice: it cannot be scored")
    if isinstance(label, bool) or not isinstance(label, int):
        raise LMForgeError(f"{where}: 'label' is {label!r}: use the index of the right choice")
    if not 0 <= label < len(choices):
        raise LMForgeError(
            f"{where}: 'label' {label} is out of range for {len(choices)} choices: use 0 to"
            f" {len(choices) - 1}"
        )
    return MCItem(context, choices, label)


def read_mc_set(path: str | Path, fmt: str = "lmforge", limit: int | None = None) -> list[MCItem]:
    """The items of a multiple-choice JSONL file; a bad line stops with its file and number."""
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"multiple-choice set {path} not found: name a JSONL file")
    items: list[MCItem] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LMForgeError(f"{where} is not JSON ({e.msg}): one item per line") from None
            if not isinstance(record, dict):
                raise LMForgeError(f"{where} is not a JSON object: one item per line")
            items.append(_item(record, fmt, where))
            if limit is not None and len(items) == limit:
                break
    if not items:
        raise LMForgeError(f"multiple-choice set {path} holds no items")
    return items


def mc_requests(items: Sequence[MCItem], delimiter: str = " ") -> list[tuple[str, str]]:
    """The (context, continuation) pairs of every choice of every item, in order: what the
    harness asks of a ``multiple_choice`` task with ``target_delimiter=delimiter``."""
    return [(item.context, delimiter + choice) for item in items for choice in item.choices]


def _argmax(values: Sequence[float]) -> int:
    """The first index of the largest value (``numpy.argmax``'s tie rule)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best] or (math.isnan(v) and not math.isnan(values[best])):
            best = i
    return best


@dataclass
class MCCounts:
    """Summed over items: add the counts of ranks, then divide."""

    items: int = 0
    correct: int = 0  # acc: highest summed log-probability
    correct_norm: int = 0  # acc_norm: highest log-probability per character of the choice
    truncated: int = 0  # items with a choice cut from the left to fit the context

    def as_list(self) -> list[int]:
        return [self.items, self.correct, self.correct_norm, self.truncated]

    @property
    def acc(self) -> float:
        return self.correct / max(self.items, 1)

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / max(self.items, 1)


def mc_metrics(items: Sequence[MCItem], scores: Scores, truncated: Sequence[bool]) -> MCCounts:
    """Counts of right answers, ``scores`` holding every choice of every item in order."""
    counts = MCCounts()
    k = 0
    for item, cut in zip(items, truncated):
        lls = scores.logprobs[k : k + len(item.choices)]
        norm = [ll / len(choice) for ll, choice in zip(lls, item.choices)]
        counts.items += 1
        counts.correct += _argmax(lls) == item.label
        counts.correct_norm += _argmax(norm) == item.label
        counts.truncated += cut
        k += len(item.choices)
    return counts


def mc_pairs(
    encode: Callable[[str], list[int]],
    items: Sequence[MCItem],
    max_len: int,
    delimiter: str = " ",
    prefix_id: int | None = None,
    name: str = "the set",
) -> list[Pair]:
    """The token pairs of every choice of ``items``; a choice longer than the model's context
    (which no truncation of the context can fit) is refused, naming the item."""
    pairs = []
    for n, item in enumerate(items):
        for j, choice in enumerate(item.choices):
            ctx, cont = encode_pair(encode, item.context, delimiter + choice, prefix_id)
            if not ctx or not cont:
                raise LMForgeError(
                    f"{name}: item {n} choice {j} leaves {'a context' if not ctx else 'a choice'}"
                    " of no tokens: the tokenizer drops its text"
                )
            if len(cont) > max_len:
                raise LMForgeError(
                    f"{name}: item {n} choice {j} is {len(cont)} tokens, longer than the model's"
                    f" {max_len}-token context: use a model of a longer block_size, or shorter"
                    " choices"
                )
            pairs.append((ctx, cont))
    return pairs


def evaluate_mc(
    model: torch.nn.Module,
    items: Sequence[MCItem],
    pairs: Sequence[Pair],
    max_len: int,
    **kwargs,
) -> MCCounts:
    """Score the ``pairs`` of ``items`` (:func:`mc_pairs`) and count the right answers
    (``kwargs``: of :func:`score`)."""
    scores = score(model, pairs, max_len, **kwargs)
    truncated, k = [], 0
    for item in items:
        share = pairs[k : k + len(item.choices)]
        truncated.append(any(len(a) + len(b) > max_len + 1 for a, b in share))
        k += len(item.choices)
    return mc_metrics(items, scores, truncated)
