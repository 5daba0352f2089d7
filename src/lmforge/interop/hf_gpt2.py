"""GPT-2 checkpoints of ``transformers`` (GPT2LMHeadModel or GPT2Model) to and from our GPT.

GPT-2 stores its linear layers as ``Conv1D`` with the weight transposed ((in, out)); ours are
``nn.Linear`` ((out, in)). Its attention already fuses query, key and value (``c_attn``), like
ours. The vocabulary is padded to a multiple of 64 on import and cut back on export; the head is
tied to the token embedding unless the config says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.errors import LMForgeError
from lmforge.interop.common import pad_rows, read_hf_dir, write_hf_dir
from lmforge.models.gpt import GPT, GPTConfig

ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
# (ours, theirs, transposed): per block
BLOCK = [
    ("ln_1.weight", "ln_1.weight", False),
    ("ln_1.bias", "ln_1.bias", False),
    ("attn.qkv.weight", "attn.c_attn.weight", True),
    ("attn.qkv.bias", "attn.c_attn.bias", False),
    ("attn.proj.weight", "attn.c_proj.weight", True),
    ("attn.proj.bias", "attn.c_proj.bias", False),
    ("ln_2.weight", "ln_2.weight", False),
    ("ln_2.bias", "ln_2.bias", False),
    ("mlp.fc.weight", "mlp.c_fc.weight", True),
    ("mlp.fc.bias", "mlp.c_fc.bias", False),
    ("mlp.proj.weight", "mlp.c_proj.weight", True),
    ("mlp.proj.bias", "mlp.c_proj.bias", False),
]


def config_from_hf(hf: dict) -> GPTConfig:
    if hf.get("model_type") != "gpt2":
        raise LMForgeError(
            f"model_type {hf.get('model_type')!r} is not gpt2: only GPT-2-family checkpoints import here"
        )
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise LMForgeError(f"{flag}=true has no lmforge equivalent")
    if not hf.get("scale_attn_weights", True):
        raise LMForgeError("scale_attn_weights=false has no lmforge equivalent")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise LMForgeError(
            f"activation_function {act!r} has no lmforge equivalent (supported: {', '.join(ACTIVATIONS)})"
        )
    n_embd = hf["n_embd"]
    inner = hf.get("n_inner") or 4 * n_embd
    if inner % n_embd:
        raise LMForgeError(f"n_inner {inner} is not a multiple of n_embd {n_embd}")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=n_embd,
        mlp_ratio=inner // n_embd,
        dropout=hf.get("resid_pdrop", 0.1),
        gelu_approximate=ACTIVATIONS[act],
        ln_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_weights=hf.get("tie_word_embeddings", True),
    )


def config_to_hf(c: GPTConfig) -> dict:
    why = []
    if c.pos_emb != "learned":
        why.append(f"pos_emb={c.pos_emb} (GPT-2 has learned position embeddings)")
    if not c.bias:
        why.append("bias=false (GPT-2 has biases in every linear layer and LayerNorm)")
    if c.mlp == "relu2":
        why.append(
            "mlp=relu2 (no transformers architecture lmforge exports to has a squared-ReLU MLP)"
        )
    if c.logit_softcap is not None:
        why.append(
            f"logit_softcap={c.logit_softcap} (GPT-2 does not soft-cap its logits;"
            " export a model trained without it)"
        )
    for key, gpt2 in (
        ("norm", "layernorm"),
        ("mlp", "gelu"),
        ("n_kv_head", c.n_head),
        ("head_dim", c.n_embd // c.n_head),
        ("qkv_bias", False),
        ("qk_norm", False),
        ("sliding_window", None),
        ("rope_scaling", None),
    ):
        if getattr(c, key) != gpt2 and not (key == "mlp" and c.mlp == "relu2"):
            why.append(f"{key}={getattr(c, key)} (GPT-2 has {gpt2}; export a Llama-family config)")
    if why:
        raise LMForgeError(
            "this GPT does not map onto transformers' GPT2LMHeadModel: " + "; ".join(why)
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.intermediate_size,
        "activation_function": {"tanh": "gelu_new", "none": "gelu"}[c.gelu_approximate],
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "layer_norm_epsilon": c.ln_eps,
        "initializer_range": 0.02,
        "tie_word_embeddings": c.tie_weights,
        "bos_token_id": c.vocab_size - 1,
        "eos_token_id": c.vocab_size - 1,
    }


def gpt_from_hf(hf_config: dict, state: dict[str, torch.Tensor]) -> GPT:
    """Our GPT (eval mode) with the weights of a transformers GPT-2 state dict."""
    c = config_from_hf(hf_config)
    if not any(k.startswith("transformer.") for k in state):  # a bare GPT2Model
        state = {f"transformer.{k}": v for k, v in state.items()}
    model = GPT(c)
    ours = model.state_dict()
    new = {
        "tok_emb.weight": pad_rows(state["transformer.wte.weight"], c.padded_vocab_size),
        "pos_emb.weight": state["transformer.wpe.weight"],
        "ln_f.weight": state["transformer.ln_f.weight"],
        "ln_f.bias": state["transformer.ln_f.bias"],
    }
    for i in range(c.n_layer):
        for a, b, transposed in BLOCK:
            t = state[f"transformer.h.{i}.{b}"]
            new[f"blocks.{i}.{a}"] = t.t() if transposed else t
    if c.tie_weights:
        new["lm_head.weight"] = new["tok_emb.weight"]
    elif "lm_head.weight" in state:
        new["lm_head.weight"] = pad_rows(state["lm_head.weight"], c.padded_vocab_size)
    missing = [k for k in ours if k not in new]
    if missing:
        raise LMForgeError(f"the checkpoint lacks weights for {', '.join(missing[:3])}")
    model.load_state_dict(new)
    return model.eval()


def load_hf_gpt2(path: str | Path) -> GPT:
    """Our GPT with the weights of a ``save_pretrained`` GPT-2 directory."""
    try:
        return gpt_from_hf(*read_hf_dir(path))
    except KeyError as e:
        raise LMForgeError(f"{path} is not a complete GPT-2 checkpoint (no {e})") from None


def export_hf_gpt2(
    model: GPT,
    out: str | Path,
    tokenizer=None,
    score: torch.Tensor | None = None,
    pad_id: int | None = None,
) -> Path:
    """Write ``model`` as a transformers GPT2LMHeadModel directory (safetensors, config,
    tokenizer.json); refuses options GPT-2 has no equivalent for. With ``score`` (a (1, n_embd)
    head: a reward model), a GPT2ForSequenceClassification with one label, scoring the last
    token that is not ``pad_id``."""
    c = model.config
    hf_config = config_to_hf(c)
    sd = model.state_dict()
    if score is not None:
        hf_config |= {
            "architectures": ["GPT2ForSequenceClassification"],
            "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0},
            "pad_token_id": pad_id,
        }
    state = {
        "transformer.wte.weight": sd["tok_emb.weight"][: c.vocab_size],
        "transformer.wpe.weight": sd["pos_emb.weight"],
        "transformer.ln_f.weight": sd["ln_f.weight"],
        "transformer.ln_f.bias": sd["ln_f.bias"],
    }
    for i in range(c.n_layer):
        for a, b, transposed in BLOCK:
            t = sd[f"blocks.{i}.{a}"]
            state[f"transformer.h.{i}.{b}"] = t.t() if transposed else t
    if score is not None:
        state["score.weight"] = score.reshape(1, c.n_embd)
    elif not c.tie_weights:
        state["lm_head.weight"] = sd["lm_head.weight"][: c.vocab_size]
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c.block_size}
    if tokenizer is not None and tokenizer.token_to_id("<|endoftext|>") is not None:
        eot = tokenizer.token_to_id("<|endoftext|>")
        hf_config["bos_token_id"] = hf_config["eos_token_id"] = eot
        tok_cfg |= {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    return write_hf_dir(out, hf_config, state, tokenizer, tok_cfg)
