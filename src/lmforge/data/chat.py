"""The special tokens and the chat template of a Hugging Face tokenizer directory.

A transformers directory keeps what ``tokenizer.json`` does not say in ``tokenizer_config.json``
(and the older ``special_tokens_map.json``, and transformers 5's ``chat_template.jinja``): which
tokens are BOS, EOS and padding, whether a text starts with BOS, and the Jinja template that turns
a conversation (a list of ``{"role", "content"}`` messages) into the text the model was tuned on.

``ChatTemplate.render`` renders a template as transformers' ``apply_chat_template(tokenize=False)``
does (``transformers/utils/chat_template_utils.py``): a sandboxed ``ImmutableSandboxedEnvironment``
with ``trim_blocks`` and ``lstrip_blocks``, the loop-controls extension and a ``{% generation %}``
block, the ``raise_exception`` and ``strftime_now`` globals, a ``tojson`` that does not escape HTML,
message keys whose value is None dropped, and the special tokens as variables (``bos_token``,
``eos_token``, ...). ``assistant_spans`` finds the characters of each assistant turn that a model
is trained to produce: the turn's text and the end-of-turn token that closes it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

from lmforge.errors import LMForgeError

SPECIAL_KEYS = (  # transformers' SPECIAL_TOKENS_ATTRIBUTES: the template sees those that are set
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
ROLES = ("system", "user", "assistant")


class ChatTemplateError(LMForgeError):
    """A chat template that cannot be compiled, or that refused a conversation."""


def token_content(value, added: dict[int, str] | None = None) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string, an AddedToken dict
    (``{"content": ..., "__type": "AddedToken", ...}``), or the id of an entry of its
    ``added_tokens_decoder``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, int) and added and value in added:
        return added[value]
    return None


@dataclass(frozen=True)
class TokenizerSettings:
    """What ``tokenizer_config.json`` says about a tokenizer that ``tokenizer.json`` does not.

    Checkpoints of lmforge-train carry it as ``checkpoint["tokenizer_config"]`` (the form of
    ``to_dict``: the keys of a ``tokenizer_config.json``), beside ``checkpoint["tokenizer"]``."""

    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    sep_token: str | None = None
    pad_token: str | None = None
    cls_token: str | None = None
    mask_token: str | None = None
    add_bos_token: bool = False  # texts start with bos_token (Llama 2, Mistral; not GPT-2, Qwen)
    chat_template: str | None = None
    source: str = "tokenizer_config.json"  # where it was read, for messages

    @classmethod
    def from_dict(cls, config: dict, source: str = "tokenizer_config.json") -> TokenizerSettings:
        """The settings of a ``tokenizer_config.json``'s dict (or of ``to_dict``'s)."""
        added = {
            int(i): t.get("content") if isinstance(t, dict) else t
            for i, t in (config.get("added_tokens_decoder") or {}).items()
        }
        tokens = {k: token_content(config.get(k), added) for k in SPECIAL_KEYS}
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: transformers uses "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise LMForgeError(f"{source}: chat_template must be a string (a Jinja template)")
        return cls(
            **tokens,
            add_bos_token=bool(config.get("add_bos_token", False)),
            chat_template=template,
            source=source,
        )

    def to_dict(self) -> dict:
        """The keys of a ``tokenizer_config.json`` that are set (nothing for a GPT-2 or character
        tokenizer of lmforge's own, so their checkpoints stay as they were)."""
        d = {k: v for k, v in asdict(self).items() if k != "source" and v is not None}
        if not d.get("add_bos_token"):
            d.pop("add_bos_token", None)
        return d

    def special_tokens(self) -> dict[str, str]:
        """The special tokens a chat template sees as variables."""
        return {k: getattr(self, k) for k in SPECIAL_KEYS if getattr(self, k) is not None}

    def with_template(self, template: str | None, source: str | None = None) -> TokenizerSettings:
        return replace(self, chat_template=template, source=source or self.source)


def _post_processor_adds(spec: dict, token: str | None) -> bool:
    """Whether a ``tokenizer.json``'s post-processor puts ``token`` before a single text (as
    Llama 3's does with ``<|begin_of_text|>``): lmforge switches the post-processor off and adds
    BOS itself, so this is read once, here."""
    if token is None:
        return False
    processors = [spec.get("post_processor") or {}]
    if processors[0].get("type") == "Sequence":
        processors = processors[0].get("processors") or []
    for p in processors:
        if p.get("type") == "TemplateProcessing":
            first = (p.get("single") or [{}])[0]
            if first.get("SpecialToken", {}).get("id") == token:
                return True
        if p.get("type") == "BertProcessing" and (p.get("cls") or [None])[0] == token:
            return True
    return False


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMForgeError(f"{path} is not valid JSON ({e}): repair or remove it") from None
    if not isinstance(data, dict):
        raise LMForgeError(f"{path} must hold a JSON object")
    return data


def read_tokenizer_settings(directory: str | Path) -> TokenizerSettings:
    """The settings of a transformers tokenizer directory: ``tokenizer_config.json``, with
    ``special_tokens_map.json`` for the tokens it does not name (older directories, whose config
    has no ``added_tokens_decoder``), a ``chat_template.jinja``
    (transformers 5 saves the template there) before the config's ``chat_template``, and
    ``add_bos_token`` from the config or else from ``tokenizer.json``'s post-processor."""
    directory = Path(directory)
    config_file = directory / "tokenizer_config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    special_map = directory / "special_tokens_map.json"
    # As transformers: the older file counts only for configs without an added_tokens_decoder.
    if special_map.is_file() and "added_tokens_decoder" not in config:
        for key, value in read_json(special_map).items():
            if key in SPECIAL_KEYS and config.get(key) is None:
                config[key] = value
    settings = TokenizerSettings.from_dict(config, source=str(config_file))
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        settings = settings.with_template(jinja.read_text(encoding="utf-8"))
    if "add_bos_token" not in config and (directory / "tokenizer.json").is_file():
        spec = read_json(directory / "tokenizer.json")
        settings = replace(settings, add_bos_token=_post_processor_adds(spec, settings.bos_token))
    return settings


def read_template_file(path: str | Path) -> str:
    """A chat template from a file: a ``.jinja`` (or any text) file holds the template itself, a
    ``.json`` file is a ``tokenizer_config.json`` whose ``chat_template`` is taken."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer_config.json"
    if not path.is_file():
        raise LMForgeError(
            f"chat template {path} not found: pass a .jinja file or a tokenizer_config.json"
        )
    if path.suffix == ".json":
        template = TokenizerSettings.from_dict(read_json(path), str(path)).chat_template
        if template is None:
            raise LMForgeError(f"{path} has no chat_template: pass a file that holds one")
        return template
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LMForgeError(f"chat template {path} is not UTF-8 text ({e.reason})") from None


@functools.lru_cache(maxsize=16)
def compile_template(template: str):
    """The compiled Jinja template, in an environment like transformers' (see the module
    docstring); a template that is not valid Jinja raises ``jinja2.TemplateSyntaxError``."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}``: renders its body (transformers marks the
        assistant's tokens with it; lmforge finds them by rendering prefixes instead)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format):
        return datetime.now().strftime(format)

    class Namespace(jinja2.utils.Namespace):
        # As transformers: no underscore-prefixed attributes (no way to CPython internals).
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore-prefixed attributes ({name!r})"
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = dict
    env.globals["namespace"] = Namespace
    return env.from_string(template)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class ChatTemplate:
    """A tokenizer's chat template with its special tokens; ``where`` names its file."""

    def __init__(self, template: str, settings: TokenizerSettings, where: str) -> None:
        import jinja2

        self.template, self.settings, self.where = template, settings, where
        try:
            self.compiled = compile_template(template)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"{where}: the chat template is not valid Jinja (line {e.lineno}: {one_line(e.message)})"
                ": fix it, or pass another with data.chat_template=<file.jinja>"
            ) from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **extra) -> str:
        """The conversation's text, as ``apply_chat_template(messages, tokenize=False,
        add_generation_prompt=...)`` of transformers gives it; a template that raises (its
        ``raise_exception``, or an error of its own) raises ChatTemplateError."""
        import jinja2

        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self.compiled.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **(self.settings.special_tokens() | extra),
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(
                f"the chat template of {self.where} refused the conversation: {one_line(e)}"
            ) from None

    def assistant_spans(self, messages: list[dict], specials: Iterable[str]) -> tuple[str, list]:
        """The rendered conversation and, for each assistant message, the (start, end)
        characters a model is trained to produce: from the end of the generation prompt that
        ``messages[:i]`` renders to (``add_generation_prompt=True``), through the first special
        token of ``specials`` after the message's content (its end-of-turn token, e.g.
        ``<|im_end|>``); what the template writes after that token (a newline) is context.

        Each prefix must render as the start of the whole conversation; a template that renders
        earlier turns differently once later ones follow raises ChatTemplateError."""
        full = self.render(messages)
        specials = sorted(set(specials), key=len, reverse=True)
        spans, at = [], 0
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (
                len(prompt) >= at and full.startswith(prompt) and through.startswith(prompt)
            ) or not full.startswith(through):
                raise ChatTemplateError(
                    f"the chat template of {self.where} does not render message {i + 1} (an"
                    " assistant turn) after the same text as its generation prompt: its turns"
                    " cannot be told apart; pass another template with data.chat_template=<file>"
                )
            turn = through[len(prompt) :]
            content = m.get("content") or ""
            needle = content if content in turn else content.strip()  # some templates trim it
            pos = turn.find(needle)
            after = pos + len(needle) if pos >= 0 else 0
            spans.append((len(prompt), len(prompt) + self._first_end(turn, after, specials)))
            at = spans[-1][1]
        return full, spans

    @staticmethod
    def _first_end(turn: str, after: int, specials: list[str]) -> int:
        """The end of the first special token at or after ``after`` in ``turn`` (all of it when
        none follows)."""
        found = [(k, k + len(t)) for t in specials if (k := turn.find(t, after)) >= 0]
        return min(found)[1] if found else len(turn)

    def end_of_turn(self, specials: Iterable[str]) -> str | None:
        """The token that closes an assistant turn (``<|im_end|>``, ``<|eot_id|>``, ``</s>``),
        read from a probe conversation; None when the template closes it with none."""
        probe = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]
        specials = list(specials)
        try:
            full, spans = self.assistant_spans(probe, specials)
        except ChatTemplateError:
            return None
        text = full[spans[0][0] : spans[0][1]]
        return next((t for t in sorted(specials, key=len, reverse=True) if text.endswith(t)), None)


def check_messages(messages, where: str) -> list[dict]:
    """``messages`` when it is a conversation lmforge can train on: a list of
    ``{"role": system|user|assistant, "content": str}`` with at least one assistant turn, the
    first message not one."""
    if not isinstance(messages, list) or not messages:
        raise LMForgeError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for k, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise LMForgeError(
                f"{where}: message {k} must be an object with a 'role' and a string 'content'"
            )
        if m.get("role") not in ROLES:
            raise LMForgeError(
                f"{where}: message {k} has role {m.get('role')!r}: use one of {', '.join(ROLES)}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise LMForgeError(
            f"{where} has no assistant message: nothing to train on; add the assistant's reply"
        )
    if messages[0]["role"] == "assistant":
        raise LMForgeError(
            f"{where} starts with an assistant message: put a user (or system) message first"
        )
    return messages


def alpaca_messages(record: dict) -> list[dict]:
    """An Alpaca record as a conversation: the instruction (and its input, after a blank line)
    as the user's message, the output as the assistant's."""
    user = record.get("instruction", "")
    if record.get("input"):
        user += "\n\n" + record["input"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def add_to_tokenizer_config(directory: str | Path, settings: TokenizerSettings | None) -> None:
    """Write ``settings`` (a checkpoint's chat template and special tokens) into the
    ``tokenizer_config.json`` of an exported directory, keeping what the exporter wrote there;
    transformers' ``apply_chat_template`` then renders as the model was tuned."""
    from lmforge.files import atomic_write_bytes

    path = Path(directory) / "tokenizer_config.json"
    if settings is None or not settings.to_dict() or not path.is_file():
        return
    config = read_json(path)
    for key, value in settings.to_dict().items():
        if config.get(key) is None:
            config[key] = value
    atomic_write_bytes(path, json.dumps(config, indent=2, ensure_ascii=False).encode())
