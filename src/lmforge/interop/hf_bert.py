"""BERT checkpoints of ``transformers`` (BertForMaskedLM or BertModel) to and from ours.

Our attention fuses query, key and value into one ``qkv`` matrix; theirs keeps three. The
vocabulary is padded to a multiple of 64 on import and cut back on export.

Our Bert has both an MLM head and a pooler; a BertForMaskedLM directory holds no pooler and a
bare BertModel no MLM head. What a directory lacks is newly initialised on import, said in a
warning, and recorded in ``model.untrained`` ({"mlm_head", "pooler"}), so that export never
writes it as trained weights: an imported BertModel exports as a BertModel again.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from lmforge.errors import LMForgeError
from lmforge.interop.common import pad_rows, read_hf_dir, write_hf_dir
from lmforge.models.bert import Bert, BertConfig

ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def config_from_hf(hf: dict) -> BertConfig:
    if hf.get("model_type", "bert") != "bert":
        raise LMForgeError(
            f"model_type {hf.get('model_type')!r} is not bert: only BERT checkpoints import here"
        )
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise LMForgeError(
            f"position_embedding_type {hf['position_embedding_type']!r} has no lmforge equivalent"
        )
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise LMForgeError(
            f"hidden_act {act!r} has no lmforge equivalent (supported: {', '.join(ACTIVATIONS)})"
        )
    if hf["intermediate_size"] % hf["hidden_size"]:
        raise LMForgeError(
            f"intermediate_size {hf['intermediate_size']} is not a multiple of hidden_size {hf['hidden_size']}"
        )
    return BertConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        type_vocab_size=hf["type_vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        mlp_ratio=hf["intermediate_size"] // hf["hidden_size"],
        dropout=hf.get("hidden_dropout_prob", 0.1),
        ln_eps=hf.get("layer_norm_eps", 1e-12),
        gelu_approximate=ACTIVATIONS[act],
    )


def config_to_hf(c: BertConfig, architecture: str = "BertForMaskedLM") -> dict:
    if c.pre_ln:
        raise LMForgeError(
            "a pre-LayerNorm BERT (model.pre_ln=true) has no transformers BertForMaskedLM equivalent"
        )
    act = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[c.gelu_approximate]
    return {
        "architectures": [architecture],
        "model_type": "bert",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "intermediate_size": c.mlp_ratio * c.n_embd,
        "hidden_act": act,
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": c.dropout,
        "max_position_embeddings": c.block_size,
        "type_vocab_size": c.type_vocab_size,
        "initializer_range": 0.02,
        "layer_norm_eps": c.ln_eps,
        "position_embedding_type": "absolute",
        "pad_token_id": 0,
        "tie_word_embeddings": True,
    }


def _pairs(c: BertConfig) -> list[tuple[str, str]]:
    """(ours, theirs) names of every tensor that maps one to one."""
    pairs = [
        ("tok_emb.weight", "bert.embeddings.word_embeddings.weight"),
        ("pos_emb.weight", "bert.embeddings.position_embeddings.weight"),
        ("type_emb.weight", "bert.embeddings.token_type_embeddings.weight"),
        ("emb_ln.weight", "bert.embeddings.LayerNorm.weight"),
        ("emb_ln.bias", "bert.embeddings.LayerNorm.bias"),
        ("mlm_head.dense.weight", "cls.predictions.transform.dense.weight"),
        ("mlm_head.dense.bias", "cls.predictions.transform.dense.bias"),
        ("mlm_head.ln.weight", "cls.predictions.transform.LayerNorm.weight"),
        ("mlm_head.ln.bias", "cls.predictions.transform.LayerNorm.bias"),
        ("mlm_head.bias", "cls.predictions.bias"),
        ("pooler.weight", "bert.pooler.dense.weight"),
        ("pooler.bias", "bert.pooler.dense.bias"),
    ]
    for i in range(c.n_layer):
        ours, theirs = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        for a, b in [
            ("attn.proj", "attention.output.dense"),
            ("ln_1", "attention.output.LayerNorm"),
            ("mlp.fc", "intermediate.dense"),
            ("mlp.proj", "output.dense"),
            ("ln_2", "output.LayerNorm"),
        ]:
            pairs += [
                (f"{ours}{a}.weight", f"{theirs}{b}.weight"),
                (f"{ours}{a}.bias", f"{theirs}{b}.bias"),
            ]
    return pairs


def load_hf_bert(path: str | Path) -> Bert:
    """Our Bert with the weights of a transformers BERT directory (MLM head and pooler when present)."""
    hf_config, state = read_hf_dir(path)
    c = config_from_hf(hf_config)
    if not any(k.startswith("bert.") for k in state):  # a bare BertModel
        state = {f"bert.{k}": v for k, v in state.items()}
    model = Bert(c)
    ours = model.state_dict()
    new = {}
    for a, b in _pairs(c):
        if b in state:
            new[a] = (
                pad_rows(state[b], ours[a].size(0))
                if a in ("tok_emb.weight", "mlm_head.bias")
                else state[b]
            )
    for i in range(c.n_layer):
        p = f"bert.encoder.layer.{i}.attention.self."
        new[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [state[f"{p}{n}.weight"] for n in ("query", "key", "value")]
        )
        new[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
            [state[f"{p}{n}.bias"] for n in ("query", "key", "value")]
        )
    new["mlm_head.decoder.weight"] = new["tok_emb.weight"]
    missing = [k for k in ours if k not in new and not k.startswith(("mlm_head.", "pooler."))]
    if missing:
        raise LMForgeError(
            f"{path} lacks weights for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
        )
    model.load_state_dict(new, strict=False)  # what is absent keeps its initialisation
    model.untrained = {part for part in ("mlm_head", "pooler") if f"{part}.bias" not in new}
    if "mlm_head" in model.untrained:
        warnings.warn(
            f"{path} is a bare BertModel: the MLM head is newly initialised (untrained); masked-LM"
            " predictions are noise until it is trained, and an export writes a BertModel",
            stacklevel=2,
        )
    if "pooler" in model.untrained:
        warnings.warn(
            f"{path} holds no pooler (BertForMaskedLM): it is newly initialised (untrained), as"
            " transformers does for sequence classification",
            stacklevel=2,
        )
    return model.eval()


def export_hf_bert(
    model: Bert, out: str | Path, tokenizer=None, score=None, pad_id: int | None = None
) -> Path:
    """Write ``model`` as a transformers BertForMaskedLM directory (safetensors, config,
    tokenizer), its pooler under ``bert.pooler.dense``, where BertModel and
    BertForSequenceClassification load it (BertForMaskedLM has none and ignores it). Parts that
    were newly initialised on import (``model.untrained``) are left out: a model without a
    trained MLM head is written as a BertModel. With ``score`` (a (1, n_embd) head on the pooled
    [CLS]: a reward model), a BertForSequenceClassification with one label (a zero bias)."""
    c = model.config
    untrained = getattr(model, "untrained", set())
    if score is not None:
        untrained = {"mlm_head"}  # a reward model has none; its pooler was trained
    sd = model.state_dict()
    state = {theirs: sd[ours] for ours, theirs in _pairs(c) if ours.split(".")[0] not in untrained}
    state["bert.embeddings.word_embeddings.weight"] = sd["tok_emb.weight"][: c.vocab_size]
    if "mlm_head" not in untrained:
        state["cls.predictions.bias"] = sd["mlm_head.bias"][: c.vocab_size]
    for i in range(c.n_layer):
        p = f"bert.encoder.layer.{i}.attention.self."
        for n, w, b in zip(
            ("query", "key", "value"),
            sd[f"blocks.{i}.attn.qkv.weight"].chunk(3),
            sd[f"blocks.{i}.attn.qkv.bias"].chunk(3),
        ):
            state[f"{p}{n}.weight"], state[f"{p}{n}.bias"] = w, b
    architecture, labels = "BertForMaskedLM", {}
    if score is not None:
        architecture = "BertForSequenceClassification"
        state["classifier.weight"] = score.reshape(1, c.n_embd)
        state["classifier.bias"] = score.new_zeros(1)
        labels = {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    elif "mlm_head" in untrained:  # BertModel's own names, without the "bert." prefix
        architecture = "BertModel"
        state = {k.removeprefix("bert."): v for k, v in state.items()}
    tok_cfg = {
        "tokenizer_class": "BertTokenizerFast",
        "model_max_length": c.block_size,
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "mask_token": "[MASK]",
        "unk_token": "[UNK]",
    }
    return write_hf_dir(out, config_to_hf(c, architecture) | labels, state, tokenizer, tok_cfg)
