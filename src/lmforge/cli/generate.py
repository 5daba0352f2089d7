"""lmforge-generate: sample text from a trained checkpoint, streaming it to the terminal.

lmforge-generate ckpt_path=logs/causal_lm/<run>/checkpoints/last.ckpt prompt="ROMEO:" top_p=0.9
lmforge-generate ckpt_path=logs/instruction/<run>/checkpoints/last.ckpt chat=true prompt="Hi!"

With ``chat=true`` the prompt is a user message rendered through the checkpoint's chat template
(its tokenizer_config.json's, or ``chat_template=<file>``) with the generation prompt; a reply
ends at the tokenizer's EOS or the template's end-of-turn token, and only the reply is printed.
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
    model, tok, _ = load_for_generation(ckpt_path, tokenizer_path)
    return model, tok


def load_for_generation(ckpt_path, tokenizer_path, what: str = "generating and scoring text"):
    """:func:`load_model_and_tokenizer`, and what the tokenizer's tokenizer_config.json says
    (special tokens, chat template); ``what``: the use named when the model is not causal."""
    from tokenizers import Tokenizer

    from lmforge.checkpoint import load_model

    if ckpt_path is None:
        raise LMForgeError("no checkpoint given: pass ckpt_path=<run dir>/checkpoints/last.ckpt")
    loaded = load_model(ckpt_path, causal=True, what=what)
    model, tok = loaded.model, loaded.tokenizer
    if tokenizer_path is not None:
        if not Path(tokenizer_path).is_file():
            raise LMForgeError(f"tokenizer={tokenizer_path}: no such file")
        try:
            tok = Tokenizer.from_file(str(tokenizer_path))
        except Exception as e:  # not JSON, or JSON of something else
            raise LMForgeError(
                f"tokenizer={tokenizer_path} cannot be read ({type(e).__name__}): pass the"
                " tokenizer.json of the checkpoint's tokenizer"
            ) from None
    if tok is None:
        raise LMForgeError(f"{ckpt_path} carries no tokenizer: pass tokenizer=<tokenizer.json>")
    if tok.get_vocab_size() > model.config.vocab_size:
        raise LMForgeError(
            f"the tokenizer has {tok.get_vocab_size()} tokens, the model {model.config.vocab_size}:"
            " they do not belong together"
        )
    return model, tok, loaded.tokenizer_settings


def chat_prompt(tok, settings, prompt: str, system: str | None, template_file: str | None):
    """The tokens of ``prompt`` as a user message (after a ``system`` one, when given) rendered
    through the chat template with its generation prompt, and the ids that end the reply: the
    tokenizer's EOS (``<|endoftext|>`` too) and the token closing an assistant turn."""
    from lmforge.data.chat import ChatTemplate, TokenizerSettings, read_template_file
    from lmforge.data.tokenizer import special_ids

    settings = settings or TokenizerSettings(source="the checkpoint (no tokenizer_config.json)")
    if template_file is not None:
        template = ChatTemplate(read_template_file(template_file), settings, str(template_file))
    elif settings.chat_template is not None:
        template = ChatTemplate(settings.chat_template, settings, settings.source)
    else:
        raise LMForgeError(
            f"chat=true, but there is no chat template in {settings.source}: pass"
            " chat_template=<file.jinja> (or a tokenizer_config.json that holds one), or chat=false"
        )
    messages = [{"role": "system", "content": system}] if system else []
    text = template.render([*messages, {"role": "user", "content": prompt}], True)
    ends = (settings.eos_token, template.end_of_turn(list(special_ids(tok))), "<|endoftext|>")
    stop_ids = {tok.token_to_id(t) for t in ends if t and tok.token_to_id(t) is not None}
    return tok.encode(text).ids, stop_ids


def unknown_characters(tok, text: str) -> tuple[list[str], list[str], str | None]:
    """The characters of ``text`` that ``tok`` drops (a character-level tokenizer has no
    unknown token: a character outside its training alphabet encodes to nothing, silently),
    those it maps to its unknown token, and that token (None when it has none)."""
    unk = getattr(tok.model, "unk_token", None)
    unk_id = tok.token_to_id(unk) if unk else None
    splits_on_space = tok.pre_tokenizer is not None  # whitespace separates words, not a token
    dropped, to_unk = [], []
    for ch in sorted(set(text)):
        ids = tok.encode(ch, add_special_tokens=False).ids
        if not ids and not (splits_on_space and ch.isspace()):
            dropped.append(ch)
        elif unk_id is not None and unk_id in ids:
            to_unk.append(ch)
    return dropped, to_unk, unk if unk_id is not None else None


def describe(chars: list[str], limit: int = 8) -> str:
    """``'é' (U+00E9), '😀' (U+1F600)``, the first ``limit`` of them."""
    shown = ", ".join(f"{ch!r} (U+{ord(ch):04X})" for ch in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")


def option(cfg: DictConfig, key: str, kind: type, ok, rule: str, nullable: bool = False):
    """``cfg[key]`` when it is a ``kind`` (ints pass as floats) satisfying ``ok``; otherwise an
    error naming the key, the value and ``rule``."""
    value = cfg[key]
    if value is None and nullable:
        return None
    kinds = (int, float) if kind is float else (kind,)
    if (
        isinstance(value, bool)
        and kind is not bool
        or not isinstance(value, kinds)
        or not ok(value)
    ):
        raise LMForgeError(f"{key}={value!r}: {rule}")
    return value


def torch_device(name: str | None):
    """The device ``name`` (None: cuda if available, else cpu), refused when it is not here."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise LMForgeError(f"device={name!r} is not a device: use cpu, cuda or cuda:<n>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LMForgeError(f"device={name}: no CUDA device here; use device=cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise LMForgeError(f"device={name}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise LMForgeError(f"device={name}: use cpu, cuda or cuda:<n>")
    return device


@hydra.main(config_path=CONFIG_PATH, config_name="generate", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> list[str]:
    import torch

    option(cfg, "max_new_tokens", int, lambda v: v > 0, "use a positive number of tokens")
    option(cfg, "temperature", float, lambda v: v >= 0, "use 0 (greedy) or a positive number")
    option(cfg, "top_k", int, lambda v: v >= 1, "use at least 1, or null for no top-k", True)
    option(
        cfg,
        "top_p",
        float,
        lambda v: 0 < v <= 1,
        "use a number in (0, 1], or null for no top-p",
        True,
    )
    option(cfg, "repetition_penalty", float, lambda v: v > 0, "use a positive number (1: none)")
    option(cfg, "num_samples", int, lambda v: v >= 1, "use at least 1 sample")
    option(cfg, "seed", int, lambda v: v >= 0, "use a non-negative integer")
    option(cfg, "stream", bool, lambda v: True, "use true or false")
    option(cfg, "chat", bool, lambda v: True, "use true or false")
    device = torch_device(cfg.device)
    prompt = cfg.prompt
    if cfg.prompt_file is not None:
        if not Path(cfg.prompt_file).is_file():
            raise LMForgeError(f"prompt_file={cfg.prompt_file}: no such file")
        try:
            prompt = Path(cfg.prompt_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LMForgeError(
                f"prompt_file={cfg.prompt_file} is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
    if not isinstance(prompt, str):
        prompt = str(prompt)  # prompt=42 is parsed as a number
    model, tok, settings = load_for_generation(cfg.ckpt_path, cfg.tokenizer)
    dropped, to_unk, unk = unknown_characters(tok, prompt)
    if dropped:
        raise LMForgeError(
            f"the prompt holds characters the tokenizer does not know: {describe(dropped)}; they"
            " would be dropped: remove them, or use a model whose tokenizer covers them"
        )
    if to_unk:  # what the model was trained to see for them: a warning, not a refusal
        print(f"warning: the prompt's {describe(to_unk)} become {unk}", file=sys.stderr)
    stop_ids: set[int] = set()
    if cfg.chat:
        system = None if cfg.system is None else str(cfg.system)
        ids, stop_ids = chat_prompt(tok, settings, prompt, system, cfg.chat_template)
    else:
        ids = tok.encode(prompt).ids
    if not ids:
        raise LMForgeError("the prompt encodes to no tokens: pass a non-empty prompt=...")
    model.to(device)
    idx = torch.tensor([ids] * cfg.num_samples, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    stream = cfg.stream and cfg.num_samples == 1
    new: list[list[int]] = [[] for _ in range(cfg.num_samples)]
    done = [False] * cfg.num_samples
    printed = 0
    if stream and not cfg.chat:  # a chat prints the reply only
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
            if not done[i] and token in stop_ids:  # the end of a chat reply: not printed
                done[i] = True
            elif not done[i]:
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
            shown = text if cfg.chat else prompt + text
            print(f"----- sample {i} -----\n{shown}", flush=True)
    tokens = n_new * cfg.num_samples
    print(
        f"----- {tokens} tokens in {elapsed:.2f} s ({tokens / elapsed:.1f} tokens/s on {device})",
        file=sys.stderr,
    )
    return samples


if __name__ == "__main__":
    main()
