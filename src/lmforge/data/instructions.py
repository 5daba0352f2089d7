"""Instruction records for instruction tuning: Alpaca records (instruction, optional input,
output) and conversations (``{"messages": [{"role": ..., "content": ...}, ...]}``).

Without a chat template an Alpaca record is rendered through the prompt of the config and the
response (``output`` and the tokenizer's EOS, ``<|endoftext|>`` for GPT-2) follows; a tokenizer
whose ``tokenizer_config.json`` sets ``add_bos_token`` gets its BOS first. With a chat template
(``data.chat_template``: the tokenizer's own, or a file) a conversation is rendered through it,
and an Alpaca record as a user turn and an assistant turn. Labels are the next tokens of the
responses only (each assistant turn's text and its end-of-turn token): every other position
carries -100, so the loss is normalised by response tokens. Examples are padded to the longest
in the batch, or packed several to a row with the row's ``segments`` telling the model where
each starts (no attention across examples, positions restarting).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.data.chat import (
    ChatTemplate,
    ChatTemplateError,
    TokenizerSettings,
    alpaca_messages,
    check_messages,
    read_template_file,
)
from lmforge.errors import LMForgeError

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately"
    " completes the request.\n\n### Instruction:\n{instruction}\n\n"
)


@dataclass
class InstructionDataConfig:
    train: str
    val: str
    prompt: str = ALPACA + "### Input:\n{input}\n\n### Response:\n"
    prompt_no_input: str = ALPACA + "### Response:\n"
    max_len: int = 256  # tokens per example (prompt + response + EOS)
    too_long: str = "truncate"  # truncate the response | skip | error (counted and reported)
    on_missing_output: str = "error"  # a record without `output`: error | skip
    pack: bool = False  # several examples per row (no attention across them) instead of padding
    batch_size: int = 16
    val_batch_size: int | None = None
    num_workers: int = 0
    sample_prompts: int = 3  # validation records whose generated responses are logged
    # alpaca | messages | auto: a record with a `messages` list is a conversation, others Alpaca
    format: str = "auto"
    # auto: the tokenizer's own chat template when its tokenizer_config.json has one, else the
    # Alpaca prompt | true: the tokenizer's (an error without one) | false: the Alpaca prompt |
    # a file: a .jinja template, or a tokenizer_config.json holding one
    chat_template: str = "auto"

    def __post_init__(self) -> None:
        if self.format not in ("alpaca", "messages", "auto"):
            raise LMForgeError(f"data.format={self.format!r}: use alpaca | messages | auto")
        self.chat_template = chat_template_choice(self.chat_template)
        if self.too_long not in ("truncate", "skip", "error"):
            raise LMForgeError(f"data.too_long={self.too_long!r}: use truncate | skip | error")
        if self.on_missing_output not in ("error", "skip"):
            raise LMForgeError(f"data.on_missing_output={self.on_missing_output!r}: error | skip")


def chat_template_choice(value) -> str:
    """``data.chat_template`` as the configs take it: auto | true | false (in any case), or the
    path of a template file (kept as written)."""
    value = str(value)
    return value.lower() if value.lower() in ("auto", "true", "false") else value


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"{path} not found: check data.train / data.val")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LMForgeError(f"{path}:{e.lineno} is not valid JSON ({e.msg})") from None
    if not isinstance(records, list):
        raise LMForgeError(f"{path} must hold a JSON list of records")
    return records


def render_prompt(record: dict, cfg: InstructionDataConfig) -> str:
    template = cfg.prompt if record.get("input") else cfg.prompt_no_input
    return template.format(instruction=record.get("instruction", ""), input=record.get("input", ""))


class Framing:
    """How instruction records become tokens with a tokenizer: its EOS (closing a response), BOS
    (before a text, when the tokenizer adds one) and padding ids, from its
    ``tokenizer_config.json`` (``settings``) or, for a tokenizer without one, ``<|endoftext|>``;
    and the chat template ``cfg.chat_template`` chooses, if any."""

    def __init__(
        self, tokenizer, cfg: InstructionDataConfig, settings: TokenizerSettings | None = None
    ) -> None:
        from lmforge.data.tokenizer import special_ids

        self.tokenizer, self.cfg = tokenizer, cfg
        self.settings = settings or TokenizerSettings(source="the tokenizer (no tokenizer_config)")
        s = self.settings
        eos = next(
            (
                t
                for t in (s.eos_token, "<|endoftext|>")
                if t and tokenizer.token_to_id(t) is not None
            ),
            None,
        )
        if eos is None:
            raise LMForgeError(
                "instruction tuning needs a tokenizer with <|endoftext|> or the eos_token of its"
                f" tokenizer_config.json ({s.source} names {s.eos_token!r}): use a tokenizer that has one"
            )
        self.eos, self.eos_id = eos, tokenizer.token_to_id(eos)
        bos = s.bos_token if s.add_bos_token else None
        self.bos_ids = (
            [tokenizer.token_to_id(bos)] if bos and tokenizer.token_to_id(bos) is not None else []
        )
        pad = tokenizer.token_to_id(s.pad_token) if s.pad_token else None
        self.pad_id = pad if pad is not None else self.eos_id
        self.specials = list(special_ids(tokenizer)) or [eos]
        self.template = self._template(cfg.chat_template)
        self.stop_ids = [self.eos_id]  # what ends a generated response
        if self.template is not None:
            end = self.template.end_of_turn(self.specials)
            if end is not None and tokenizer.token_to_id(end) not in self.stop_ids:
                self.stop_ids.append(tokenizer.token_to_id(end))

    def _template(self, choice: str) -> ChatTemplate | None:
        s = self.settings
        if choice == "false" or (choice == "auto" and s.chat_template is None):
            return None
        if choice in ("true", "auto"):
            if s.chat_template is None:
                raise LMForgeError(
                    f"no chat template in {s.source}, but data.chat_template=true asks for the"
                    " tokenizer's: set data.chat_template=false (the Alpaca prompt) or a"
                    " template file (data.chat_template=<file.jinja>)"
                )
            return ChatTemplate(s.chat_template, s, s.source)
        return ChatTemplate(read_template_file(choice), s, choice)

    @property
    def used_settings(self) -> TokenizerSettings:
        """The settings with the template the data was rendered with (what a checkpoint keeps,
        so that ``lmforge-generate chat=true`` renders prompts as the model was tuned)."""
        if self.template is None:
            return self.settings
        return self.settings.with_template(self.template.template)

    def conversation(self, record, n: int, where: str) -> list[dict] | None:
        """The record's messages when it is a conversation (None: an Alpaca record)."""
        if not isinstance(record, dict):
            raise LMForgeError(f"{where} record {n} is not a JSON object")
        fmt = self.cfg.format
        if "messages" in record and fmt != "alpaca":
            return check_messages(record["messages"], f"{where} record {n}")
        if fmt == "messages":
            raise LMForgeError(
                f"{where} record {n} has no 'messages' list (data.format=messages): use"
                " data.format=auto for files that hold Alpaca records"
            )
        if "messages" in record and "instruction" not in record:
            raise LMForgeError(
                f"{where} record {n} is a conversation ('messages') but data.format=alpaca: use"
                " data.format=auto or messages"
            )
        return None

    def prompt_ids(self, record, n: int = 1, where: str = "") -> list[int]:
        """The tokens a model answers: the prompt of an Alpaca record, or a conversation up to its
        last assistant turn, with the template's generation prompt."""
        messages = self.conversation(record, n, where)
        if self.template is None and messages is None:
            return self.bos_ids + self.tokenizer.encode(render_prompt(record, self.cfg)).ids
        if messages is None:
            messages = alpaca_messages(record | {"output": record.get("output") or ""})
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        text = self._render(messages[:last], n, where, add_generation_prompt=True)
        return self.tokenizer.encode(text).ids

    def _render(self, messages, n: int, where: str, **kwargs) -> str:
        if self.template is None:
            raise LMForgeError(self._no_template(n, where))
        try:
            return self.template.render(messages, **kwargs)
        except ChatTemplateError as e:
            raise LMForgeError(f"{where} record {n}: {e}") from None

    def _no_template(self, n: int, where: str) -> str:
        why = (
            "data.chat_template=false"
            if self.cfg.chat_template == "false"
            else f"there is no chat template in {self.settings.source}"
        )
        return (
            f"{where} record {n} is a conversation ('messages'), which needs a chat template, but"
            f" {why}: set data.chat_template to a template file (<file.jinja>) or use a tokenizer"
            " whose tokenizer_config.json has one"
        )

    def tokens(self, record, n: int, where: str) -> tuple[list[int], list[bool], bool]:
        """The example's tokens, which of them are targets (a response's), and whether a reply's
        first (or last) token also holds text of the template's (e.g. ``"\n "`` when a reply
        starts with a space after ``assistant\n``): such a token is not a target, and the
        example is counted.

        A conversation is tokenized whole, as transformers' ``apply_chat_template`` does, and its
        tokens are assigned to the assistant spans by their character offsets."""
        messages = self.conversation(record, n, where)
        if messages is None and self.template is None:
            prompt = self.bos_ids + self.tokenizer.encode(render_prompt(record, self.cfg)).ids
            response = self.tokenizer.encode(record["output"]).ids + [self.eos_id]
            return prompt + response, [False] * len(prompt) + [True] * len(response), False
        if messages is None:
            messages = alpaca_messages(record)
        if self.template is None:
            raise LMForgeError(self._no_template(n, where))
        try:
            text, spans = self.template.assistant_spans(messages, self.specials)
        except ChatTemplateError as e:
            raise LMForgeError(f"{where} record {n}: {e}") from None
        enc = self.tokenizer.encode(text)
        targets = [e > s and any(a <= s and e <= b for a, b in spans) for s, e in enc.offsets]
        across = any(s < edge < e for s, e in enc.offsets for span in spans for edge in span)
        return enc.ids, targets, across


def encode_records(
    records: list[dict],
    tokenizer,
    cfg: InstructionDataConfig,
    where: str,
    framing: Framing | None = None,
) -> tuple[list[tuple[list[int], list[int]]], Counter]:
    """(input ids, labels) per example; labels -100 where the next token is not a response's."""
    framing = framing or Framing(tokenizer, cfg)
    counts: Counter = Counter()
    out = []
    shortest_prompt = None  # in tokens, among the records skipped as too long
    for n, record in enumerate(records, 1):
        if framing.conversation(record, n, where) is None and not record.get("output"):
            if cfg.on_missing_output == "skip":
                counts["no output"] += 1
                continue
            raise LMForgeError(
                f"{where} record {n} has no 'output': fix it or set data.on_missing_output=skip"
            )
        tokens, targets, across = framing.tokens(record, n, where)
        if across:
            counts["reply's edge inside a token of the template's (that token not scored)"] += 1
        if len(tokens) > cfg.max_len + 1:  # inputs are tokens[:-1]: max_len positions
            if cfg.too_long == "error":
                raise LMForgeError(
                    f"{where} record {n} has {len(tokens) - 1} tokens, more than data.max_len="
                    f"{cfg.max_len}: raise it or set data.too_long=truncate|skip"
                )
            # Kept when a response token is among the inputs (the Alpaca prompt fits, with room).
            if cfg.too_long == "skip" or not any(targets[1 : cfg.max_len]):
                counts["too long, skipped"] += 1
                prompt = targets.index(True) if any(targets) else len(tokens)
                shortest_prompt = min(prompt, shortest_prompt or prompt)
                continue
            tokens, targets = tokens[: cfg.max_len + 1], targets[: cfg.max_len + 1]
            counts["response truncated"] += 1
        ids = tokens[:-1]
        labels = [t if target else -100 for t, target in zip(tokens[1:], targets[1:])]
        out.append((ids, labels))
    if not out:
        raise LMForgeError(
            _no_usable_record(records, tokenizer, cfg, where, counts, shortest_prompt)
        )
    return out, counts


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [s for item in items for s in _strings(item)]


def _no_usable_record(records, tokenizer, cfg, where, counts, shortest_prompt) -> str:
    """Why every record was dropped, with the count of each reason and the fixes: records too
    long for data.max_len, without an output, and characters the tokenizer has no token for
    (a char vocabulary drops them: a Shakespeare one lacks '#' and digits, say)."""
    texts = [(i, set("".join(_strings(r)))) for i, r in enumerate(records)]
    chars = set(cfg.prompt + cfg.prompt_no_input).union(*(c for _, c in texts))
    lacking = sorted(
        c
        for c in chars
        if not c.isspace() and not tokenizer.encode(c, add_special_tokens=False).ids
    )
    why, fixes = [], []
    if n := counts["too long, skipped"]:
        prompt = f" (the shortest prompt takes {shortest_prompt} tokens)"
        why.append(f"{n} too long for data.max_len={cfg.max_len}{prompt}")
        fixes.append(
            "raise data.max_len (a model with a longer model.block_size) or shorten data.prompt"
            " and data.prompt_no_input"
        )
    if n := counts["no output"]:
        why.append(f"{n} without an output")
        fixes.append("give the records an 'output'")
    if lacking:
        n = sum(1 for _, c in texts if c.intersection(lacking))
        shown = " ".join(repr(c) for c in lacking[:8]) + (" ..." if len(lacking) > 8 else "")
        why.append(
            f"{n} hold characters the tokenizer lacks (of records and prompt: {len(lacking)},"
            f" {shown}), dropped from the text"
        )
        fixes.append("fine-tune a model whose tokenizer covers them (a BPE one, not char-level)")
    return (
        f"{where} holds no usable record: of {len(records)}, {'; '.join(why) or 'none kept'}:"
        f" {'; '.join(fixes) or 'check the records'}"
    )


def pad_batch(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), torch.tensor(y)
    return {"input_ids": ids, "labels": labels}


def pack(
    examples: list[tuple[list[int], list[int]]], row_len: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Rows of ``row_len`` tokens holding whole examples in order; ``segments`` numbers the
    examples of a row (padding after the last one is a segment of its own, never scored)."""
    rows, current = [], []
    for ex in examples:
        if current and sum(len(x) for x, _ in current) + len(ex[0]) > row_len:
            rows.append(current)
            current = []
        current.append(ex)
    if current:
        rows.append(current)
    packed = []
    for row in rows:
        ids = torch.full((row_len,), pad_id, dtype=torch.long)
        labels = torch.full((row_len,), -100, dtype=torch.long)
        segments = torch.full((row_len,), len(row), dtype=torch.long)
        at = 0
        for k, (x, y) in enumerate(row):
            ids[at : at + len(x)], labels[at : at + len(y)] = torch.tensor(x), torch.tensor(y)
            segments[at : at + len(x)] = k
            at += len(x)
        packed.append({"input_ids": ids, "labels": labels, "segments": segments})
    return packed
