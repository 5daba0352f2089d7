"""The model families lmforge knows, each registered with its config, model, text framing and
Hugging Face adapter.

A family is named in every checkpoint (``hyper_parameters.family``) and found again by that
name, by its config class, or by a transformers ``model_type``: never guessed from a model's
fields. Both families' models follow one protocol, so tasks do not branch on the family:

    hidden(input_ids, attention_mask=None, ...) -> (B, T, C)   final hidden states
    lm_logits(hidden, positions=None)           -> vocabulary logits (all, or the positions)
    sequence_features(hidden, attention_mask)   -> (B, C): a GPT's last real token, a BERT's
                                                   pooled [CLS]
    top_modules(), pooling_modules(), remove_lm_head(), blocks, config, num_params(),
    flops_per_token(T)

Adding a family means a config (and, if its block is new, model code) in ``models/``, an
adapter in ``interop/``, and one ``register(Family(...))`` line here. Llama, Mistral, Qwen2 and
Qwen3 are four families of one model: each its own config class (the GPT's options with that
family's defaults), the GPT, and one adapter (``interop/hf_llama.py``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import (
    GPT,
    GPTConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)


@dataclass
class FromPretrained:
    """``model=pretrained``, the model of a fine-tune: the architecture is that of ``init_from``
    (recorded in the run's config once read); only the dropout may be set afresh."""

    dropout: float | None = None  # null: the pretrained model's

    def __post_init__(self) -> None:
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TextFrame:
    """How a family frames one text for sequence tasks (classification, instructions): the
    special tokens before and after it, and the padding token."""

    prefix: tuple[str, ...]
    suffix: tuple[str, ...]
    pad: str


@dataclass(frozen=True)
class Family:
    name: str
    config: type
    model: type
    frame: TextFrame
    causal: bool  # predicts the next token (generates text); False: a bidirectional encoder
    hf_model_type: str  # transformers' config.json model_type
    hf_import: str  # "module:function": a transformers directory -> our model
    hf_export: str  # "module:function": (model, out dir, tokenizer) -> the directory written

    def build(self, config: Any):
        return self.model(config)

    def import_hf(self, path):
        return _resolve(self.hf_import)(path)

    def export_hf(self, model, out, tokenizer=None, **head):
        """Write ``model`` as a transformers directory; ``head`` (``score``: a (1, C) scalar
        head, ``pad_id``) makes it a ``*ForSequenceClassification`` with one label, for an
        adapter that takes them."""
        export = _resolve(self.hf_export)
        if head and "score" not in inspect.signature(export).parameters:
            raise ValueError(f"the {self.name} family exports no sequence-classification head")
        return export(model, out, tokenizer, **head)


def _resolve(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family(name: str) -> Family:
    """The family registered as ``name``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}: one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(config: Any) -> Family:
    """The family whose config class ``config`` is."""
    for f in FAMILIES.values():
        if type(config) is f.config:
            return f
    raise ValueError(f"{type(config).__name__} is not the config of a registered model family")


def family_for_hf(model_type: str | None) -> Family:
    """The family that imports transformers checkpoints of ``model_type``."""
    for f in FAMILIES.values():
        if f.hf_model_type == model_type:
            return f
    raise ValueError(
        f"model_type {model_type!r} has no lmforge family (supported: {', '.join(hf_model_types())})"
    )


def hf_model_types() -> list[str]:
    """The transformers ``model_type`` of every registered family."""
    return [f.hf_model_type for f in FAMILIES.values()]


register(
    Family(
        name="gpt",
        config=GPTConfig,
        model=GPT,
        frame=TextFrame(prefix=(), suffix=("<|endoftext|>",), pad="<|endoftext|>"),
        causal=True,
        hf_model_type="gpt2",
        hf_import="lmforge.interop.hf_gpt2:load_hf_gpt2",
        hf_export="lmforge.interop.hf_gpt2:export_hf_gpt2",
    )
)
register(
    Family(
        name="bert",
        config=BertConfig,
        model=Bert,
        frame=TextFrame(prefix=("[CLS]",), suffix=("[SEP]",), pad="[PAD]"),
        causal=False,
        hf_model_type="bert",
        hf_import="lmforge.interop.hf_bert:load_hf_bert",
        hf_export="lmforge.interop.hf_bert:export_hf_bert",
    )
)

# Frames of the modern decoders: the tokens of a tokenizer that it lacks are left out, so one
# frame serves Llama 2 (<s> ... </s>), Llama 3 (<|begin_of_text|> ... <|end_of_text|>), SmolLM2
# and the character tokenizers of lmforge (... <|endoftext|>).
LLAMA_FRAME = TextFrame(
    prefix=("<s>", "<|begin_of_text|>"),
    suffix=("</s>", "<|end_of_text|>", "<|endoftext|>"),
    pad="<|endoftext|>",
)
QWEN_FRAME = TextFrame(prefix=(), suffix=("<|endoftext|>",), pad="<|endoftext|>")
for name, config, frame in (
    ("llama", LlamaConfig, LLAMA_FRAME),
    ("mistral", MistralConfig, LLAMA_FRAME),
    ("qwen2", Qwen2Config, QWEN_FRAME),
    ("qwen3", Qwen3Config, QWEN_FRAME),
):
    register(
        Family(
            name=name,
            config=config,
            model=GPT,
            frame=frame,
            causal=True,
            hf_model_type=name,
            hf_import="lmforge.interop.hf_llama:load_hf_llama",
            hf_export="lmforge.interop.hf_llama:export_hf_llama",
        )
    )
