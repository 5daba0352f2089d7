"""Preference pairs for reward models and preference optimisation: a prompt, the response people
preferred (``chosen``) and one they did not (``rejected``).

Three forms of record are read (``data.format``, ``auto`` telling them apart per record):

- ``alpaca``: ``instruction``, optional ``input``, ``chosen``, ``rejected`` (the bundled
  ``data/preferences``); the prompt is rendered as instruction tuning renders it (the Alpaca
  prompt of the config, or the chat template), so a reward model or policy sees the prompts
  ``instruct_gpt`` was tuned on.
- ``explicit`` (TRL's explicit-prompt form): ``prompt``, ``chosen``, ``rejected``, either three
  strings (plain text) or message lists (``prompt``: the conversation so far, ``chosen`` /
  ``rejected``: one assistant message each), rendered through the chat template.
- ``implicit`` (TRL's implicit-prompt form, Anthropic-HH): ``chosen`` and ``rejected`` are whole
  texts or whole dialogues, and the prompt is what they share at the start: the common messages
  before the last assistant turn, or for texts the common characters cut back to the last
  whitespace (which goes with the responses, as byte-level BPE attaches a space to the word after).

A pair becomes token lists: the prompt (with the tokenizer's BOS when it adds one) and each
response with its closing EOS (``<|endoftext|>``, ``[SEP]`` for a BERT framing, or the chat
template's end-of-turn token). A pair longer than ``max_len`` loses the prompt's start first
(down to ``max_prompt_len`` tokens) and then the responses' ends, and is counted; the counts are
printed. A batch holds both sides padded to one length, with next-token labels on the response
tokens only (-100 elsewhere, as in instruction tuning) and each sequence's length.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lmforge.data.chat import ChatTemplateError, TokenizerSettings, alpaca_messages
from lmforge.data.instructions import ALPACA, Framing, chat_template_choice, render_prompt
from lmforge.data.tokenizer import check_same_tokenizer  # noqa: F401  (part of this module's API)
from lmforge.errors import LMForgeError

FORMATS = {  # the fields each form of record needs
    "alpaca": ("instruction", "chosen", "rejected"),
    "explicit": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
}


@dataclass
class PreferenceDataConfig:
    """Where the preference pairs are and how they become batches."""

    train: str
    val: str
    test: str | None = None
    prompt: str = ALPACA + "### Input:\n{input}\n\n### Response:\n"
    prompt_no_input: str = ALPACA + "### Response:\n"
    # auto: per record (instruction -> alpaca, prompt -> explicit, else implicit) | alpaca |
    # explicit | implicit
    format: str = "auto"
    # as in instruction tuning: auto (the tokenizer's own template if it has one, else the Alpaca
    # prompt) | true | false | a .jinja file. Plain-text explicit/implicit records are never
    # templated (TRL's "standard" form).
    chat_template: str = "auto"
    max_len: int = 256  # tokens of prompt + response (+ EOS), at most the model's context
    max_prompt_len: int | None = (
        None  # a long pair keeps at least this much prompt; null: max_len/2
    )
    too_long: str = "truncate"  # truncate (prompt's end, responses' start) | skip | error
    on_bad_pair: str = "error"  # chosen == rejected or an empty response: error | skip
    batch_size: int = 16  # pairs per micro-batch
    val_batch_size: int | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.format not in ("auto", *FORMATS):
            raise LMForgeError(f"data.format={self.format!r}: use auto | {' | '.join(FORMATS)}")
        self.chat_template = chat_template_choice(self.chat_template)
        if self.too_long not in ("truncate", "skip", "error"):
            raise LMForgeError(f"data.too_long={self.too_long!r}: use truncate | skip | error")
        if self.on_bad_pair not in ("error", "skip"):
            raise LMForgeError(f"data.on_bad_pair={self.on_bad_pair!r}: use error | skip")
        for name in ("max_len", "batch_size"):
            if getattr(self, name) <= 0:
                raise LMForgeError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.max_prompt_len is None:
            self.max_prompt_len = self.max_len // 2
        if not 0 < self.max_prompt_len < self.max_len:
            raise LMForgeError(
                f"data.max_prompt_len={self.max_prompt_len} must be in (0, data.max_len="
                f"{self.max_len}): responses need room"
            )


@dataclass
class Pair:
    """One preference pair as tokens. ``chosen`` and ``rejected`` end with their closing token
    (EOS or end of turn) unless truncated; ``margin``: the record's own (TRL's ``margin``
    column), added to the task's; ``real``: False for the blank filling a rank's last batch."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0
    real: bool = True

    def blank(self) -> Pair:
        """This pair counted nowhere (``datasets.blank``)."""
        return Pair(self.prompt, self.chosen, self.rejected, 0.0, real=False)


def read_pairs(path: str | Path, where: str = "") -> list[dict]:
    """The records of a JSON list or a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(
            f"{path} not found: check {where or 'data.train / data.val / data.test'}"
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LMForgeError(f"{path}:{n} is not valid JSON ({e.msg})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise LMForgeError(
            f"{path}:{e.lineno} is not valid JSON ({e.msg}); a .jsonl file holds one record a line"
        ) from None
    if not isinstance(records, list):
        raise LMForgeError(f"{path} must hold a JSON list of records (or be a .jsonl file)")
    return records


def record_format(record, n: int, cfg: PreferenceDataConfig, where: str) -> str:
    """The form of ``record`` (alpaca | explicit | implicit); a missing field is refused."""
    if not isinstance(record, dict):
        raise LMForgeError(f"{where} record {n} is not a JSON object")
    fmt = cfg.format
    if fmt == "auto":
        fmt = (
            "alpaca"
            if "instruction" in record
            else "explicit"
            if "prompt" in record
            else "implicit"
        )
    for key in FORMATS[fmt]:
        if record.get(key) is None:
            raise LMForgeError(
                f"{where} record {n} has no {key!r}: a preference record of the {fmt} form needs"
                f" {', '.join(FORMATS[fmt])}; add it (data.format=alpaca | explicit | implicit"
                " names the form)"
            )
    return fmt


def _text_or_messages(value, key: str, n: int, where: str):
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in value
    ):
        return value
    raise LMForgeError(
        f"{where} record {n}: {key!r} must be a string or a list of {{role, content}} messages"
    )


def _shared_text(chosen: str, rejected: str) -> int:
    """Characters of the prompt two implicit-form texts share: their common start, cut back to
    the last whitespace so that a response starts at a word (with its leading space)."""
    k = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        k += 1
    while k > 0 and not chosen[k - 1].isspace():
        k -= 1
    while k > 0 and chosen[k - 1] == " ":  # the space goes with the response's first word
        k -= 1
    return k


def split_pair(record: dict, fmt: str, n: int, where: str):
    """(prompt, chosen, rejected) of a record: three strings, or a message list and two
    single assistant messages; for the alpaca form the record itself is the prompt."""
    chosen = _text_or_messages(record["chosen"], "chosen", n, where)
    rejected = _text_or_messages(record["rejected"], "rejected", n, where)
    if type(chosen) is not type(rejected):
        raise LMForgeError(
            f"{where} record {n}: 'chosen' and 'rejected' must both be strings or both message lists"
        )
    if fmt == "alpaca":
        if not isinstance(chosen, str):
            raise LMForgeError(
                f"{where} record {n}: an alpaca-form record's 'chosen' and 'rejected' are strings;"
                " for conversations use 'prompt' (explicit form) or whole dialogues (implicit)"
            )
        return record, chosen, rejected
    if fmt == "explicit":
        prompt = _text_or_messages(record["prompt"], "prompt", n, where)
        if type(prompt) is not type(chosen):
            raise LMForgeError(
                f"{where} record {n}: 'prompt', 'chosen' and 'rejected' must all be strings or"
                " all message lists"
            )
        return prompt, chosen, rejected
    if chosen == rejected:  # implicit: nothing differs (refused by the caller)
        return chosen[:0], chosen, rejected
    if isinstance(chosen, str):  # implicit: the shared beginning is the prompt
        k = _shared_text(chosen, rejected)
        if k == 0:
            raise LMForgeError(
                f"{where} record {n}: 'chosen' and 'rejected' share no prompt (the implicit form"
                " takes the prompt from their common start): give a 'prompt' (explicit form)"
            )
        return chosen[:k], chosen[k:], rejected[k:]
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and chosen[k - 1].get("role") == "assistant":
        k -= 1  # the responses start at an assistant turn
    if k == 0:
        raise LMForgeError(
            f"{where} record {n}: the dialogues of 'chosen' and 'rejected' share no prompt"
            " (the messages before the differing assistant turn): give a 'prompt' (explicit form)"
        )
    return chosen[:k], chosen[k:], rejected[k:]


def _is_empty(response) -> bool:
    if isinstance(response, str):
        return not response.strip()
    return not response or all(not (m.get("content") or "").strip() for m in response)


class PairEncoder:
    """Tokens of (prompt, chosen, rejected) as ``split_pair`` gives them, with ``framing``."""

    def __init__(self, framing: Framing, cfg: PreferenceDataConfig) -> None:
        self.framing, self.cfg, self.tok = framing, cfg, framing.tokenizer

    def text(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        return self.framing.bos_ids + self.tok.encode(prompt).ids, self.response(response)

    def response(self, response: str) -> list[int]:
        return self.tok.encode(response).ids + [self.framing.eos_id]

    def chat(self, prompt: list[dict], response: list[dict], n: int, where: str):
        """The prompt rendered with the template's generation prompt, and the response's turn
        through its end-of-turn token (what ``assistant_spans`` says a model produces)."""
        f = self.framing
        if f.template is None:
            raise LMForgeError(f._no_template(n, where))
        if len(response) != 1 or response[0].get("role") != "assistant":
            raise LMForgeError(
                f"{where} record {n}: each response must be one assistant message (after the"
                " shared prompt); split longer exchanges into several records"
            )
        try:
            head = f.template.render(prompt, add_generation_prompt=True)
            full, spans = f.template.assistant_spans(prompt + response, f.specials)
        except ChatTemplateError as e:
            raise LMForgeError(f"{where} record {n}: {e}") from None
        return self.tok.encode(head).ids, self.tok.encode(full[len(head) : spans[-1][1]]).ids

    def encode(self, prompt, chosen, rejected, n: int, where: str):
        if isinstance(prompt, dict):  # an alpaca record
            if self.framing.template is None:
                p = self.framing.bos_ids + self.tok.encode(render_prompt(prompt, self.cfg)).ids
                return p, self.response(chosen), self.response(rejected)
            messages = alpaca_messages(prompt | {"output": chosen})
            prompt, chosen = messages[:-1], messages[-1:]
            rejected = [{"role": "assistant", "content": rejected}]
        if isinstance(prompt, str):
            p, c = self.text(prompt, chosen)
            return p, c, self.response(rejected)
        p, c = self.chat(prompt, chosen, n, where)
        return p, c, self.chat(prompt, rejected, n, where)[1]


def truncate(p: list[int], c: list[int], r: list[int], bos: int, cfg: PreferenceDataConfig):
    """Fit a pair in ``cfg.max_len``: the prompt keeps its end (and its first ``bos`` tokens, a
    BOS), down to ``max_prompt_len``, then the responses keep their start. Returns the pieces
    and what was cut."""
    cut = []
    longest = max(len(c), len(r))
    keep = min(len(p), max(cfg.max_len - longest, cfg.max_prompt_len))
    if keep < len(p):
        p = p[:bos] + p[len(p) - (keep - bos) :]
        cut.append("prompt truncated (its end kept)")
    room = cfg.max_len - len(p)
    if longest > room:
        cut.append("response truncated (its start kept)")
        c, r = c[:room], r[:room]
    return p, c, r, cut


def encode_pairs(
    records: list[dict], framing: Framing, cfg: PreferenceDataConfig, where: str
) -> tuple[list[Pair], Counter]:
    """The pairs of ``records`` as tokens, and counts of what was truncated or skipped."""
    enc = PairEncoder(framing, cfg)
    counts: Counter = Counter()
    out = []
    for n, record in enumerate(records, 1):
        fmt = record_format(record, n, cfg, where)
        prompt, chosen, rejected = split_pair(record, fmt, n, where)
        bad = None
        for key, response in (("chosen", chosen), ("rejected", rejected)):
            if _is_empty(response):
                bad = (
                    f"{where} record {n} has an empty {key!r} response: give it text, or drop"
                    " the record (data.on_bad_pair=skip skips such records)"
                )
                counts[f"empty {key}, skipped"] += 1
                break
        if bad is None and chosen == rejected:
            bad = (
                f"{where} record {n}: 'chosen' and 'rejected' are the same response, so there is"
                " nothing to prefer: fix or drop the record (data.on_bad_pair=skip skips such"
                " records)"
            )
            counts["chosen == rejected, skipped"] += 1
        if bad is not None:
            if cfg.on_bad_pair == "error":
                raise LMForgeError(bad)
            continue
        p, c, r = enc.encode(prompt, chosen, rejected, n, where)
        if len(p) + max(len(c), len(r)) > cfg.max_len:
            if cfg.too_long == "error":
                if len(p) >= cfg.max_len:
                    raise LMForgeError(
                        f"{where} record {n}: its prompt alone has {len(p)} tokens, and"
                        f" data.max_len={cfg.max_len} leaves no room for a response: raise"
                        " data.max_len (up to the model's context), shorten the prompt, or set"
                        " data.too_long=truncate (keeps the prompt's end) or skip"
                    )
                raise LMForgeError(
                    f"{where} record {n} has {len(p)} prompt and {max(len(c), len(r))} response"
                    f" tokens, more than data.max_len={cfg.max_len}: raise data.max_len (up to"
                    " the model's context) or set data.too_long=truncate | skip"
                )
            if cfg.too_long == "skip":
                counts["too long, skipped"] += 1
                continue
            p, c, r, cut = truncate(p, c, r, len(framing.bos_ids), cfg)
            counts.update(cut)
            if c == r:
                counts["responses the same once truncated, skipped"] += 1
                continue
        out.append(Pair(p, c, r, float(record.get("margin") or 0.0)))
    if not out:
        raise LMForgeError(f"{where} holds no usable preference pair")
    return out, counts


def pad_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of B pairs. Per side (``chosen_*``, ``rejected_*``): ``input_ids`` (B, T) the
    prompt then the response, both sides padded to the same T with ``pad_id``; ``labels`` (B, T)
    the next token where it is a response's, else -100 (blanks: all -100); ``lengths`` (B,)
    real tokens, so ``lengths - 1`` is the last one. ``prompt_lengths`` (B,), ``margin`` (B,)
    and ``real`` (B,), False for a blank."""
    T = max(len(x.prompt) + max(len(x.chosen), len(x.rejected)) for x in pairs)
    B = len(pairs)
    batch: dict[str, torch.Tensor] = {
        "prompt_lengths": torch.tensor([len(x.prompt) for x in pairs]),
        "margin": torch.tensor([x.margin for x in pairs], dtype=torch.float),
        "real": torch.tensor([x.real for x in pairs]),
    }
    for side in ("chosen", "rejected"):
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        lengths = torch.zeros(B, dtype=torch.long)
        for i, x in enumerate(pairs):
            seq = x.prompt + getattr(x, side)
            ids[i, : len(seq)] = torch.tensor(seq)
            lengths[i] = len(seq)
            if x.real:
                start = max(len(x.prompt) - 1, 0)  # the position whose next token is the first
                labels[i, start : len(seq) - 1] = ids[i, start + 1 : len(seq)]
        batch |= {f"{side}_input_ids": ids, f"{side}_labels": labels, f"{side}_lengths": lengths}
    return batch


def frame_settings(frame, tokenizer) -> TokenizerSettings:
    """Tokenizer settings from a model family's text frame (``registry.TextFrame``), for a
    tokenizer without a ``tokenizer_config.json``: its first prefix token the tokenizer has as
    a BOS that starts every text (``[CLS]``), its first such suffix token as the EOS closing a
    response (``<|endoftext|>``, ``[SEP]``), its padding token."""

    def first(tokens):
        return next((t for t in tokens if tokenizer.token_to_id(t) is not None), None)

    bos = first(frame.prefix)
    return TokenizerSettings(
        bos_token=bos,
        eos_token=first(frame.suffix),
        pad_token=frame.pad if tokenizer.token_to_id(frame.pad) is not None else None,
        add_bos_token=bos is not None,
        source="the model family's text frame (no tokenizer_config.json)",
    )


def model_settings(settings: TokenizerSettings | None, frame, tokenizer) -> TokenizerSettings:
    """The settings a model's pairs are framed with: its ``tokenizer_config.json``'s when they
    name an EOS, else its family's frame (``frame_settings``) with any chat template kept."""
    if settings is not None and settings.eos_token is not None:
        return settings
    framed = frame_settings(frame, tokenizer)
    return replace(framed, chat_template=settings.chat_template if settings else None)


def encode_responses(
    records: list[dict], framing: Framing, cfg: PreferenceDataConfig, where: str
) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) tokens of records to score, framed as pairs are: a ``response`` with
    the alpaca form's ``instruction`` (and ``input``), or with a ``prompt``; or a ``text`` alone
    (a prompt of just the BOS, if any). Too long: the prompt keeps its end, the response its
    start."""
    enc, out = PairEncoder(framing, cfg), []
    for n, record in enumerate(records, 1):
        if not isinstance(record, dict) or not isinstance(
            record.get("response", record.get("text")), str
        ):
            raise LMForgeError(
                f"{where} record {n} needs a string 'response' (with 'instruction' or 'prompt')"
                " or a string 'text'"
            )
        if "response" not in record:
            p, r = enc.text("", record["text"])
        else:
            pair = record | {"chosen": record["response"], "rejected": record["response"]}
            prompt, chosen, rejected = split_pair(
                pair, record_format(pair, n, cfg, where), n, where
            )
            p, r, _ = enc.encode(prompt, chosen, rejected, n, where)
        if len(p) + len(r) > cfg.max_len:
            p, r, _, _ = truncate(p, r, r, len(framing.bos_ids), cfg)
        out.append((p, r))
    return out


def __getattr__(name: str):
    """``PreferenceDataModule`` (defined in ``datamodule``, beside the other data modules) on
    first use: importing the config does not import Lightning."""
    if name == "PreferenceDataModule":
        from lmforge.data.datamodule import PreferenceDataModule

        return PreferenceDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
