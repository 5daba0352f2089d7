"""Llama, Mistral, Qwen2 and Qwen3 checkpoints of ``transformers`` to and from our GPT.

The four architectures (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``) share one layout of tensors; they differ in options of our GPT (q/k/v
biases, QK-norm, a sliding window), and each is a family of its own in ``models/registry.py``.
Ours fuses query, key and value into ``attn.qkv`` and gate and up into ``mlp.fc``; theirs keeps
them apart, so every tensor of ours is a stack of slices along its first dimension, each one
tensor of theirs (``layout``).

Import builds the model on the meta device, gives it storage once (``to_empty``) and fills each
parameter from the checkpoint one tensor at a time (``SafetensorsDir``), converting bf16/fp16
weights to the model's dtype as they are copied: the weights are never held twice. Sharded
checkpoints (``model.safetensors.index.json``) import as single files do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.errors import LMForgeError
from lmforge.interop.common import SafetensorsDir, config_json, write_hf_dir
from lmforge.models.gpt import GPT, GPTConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SIDE_FILES = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json")
ROPE_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
MAX_SHARD_BYTES = 2 * 1024**3  # exports larger than this are written in shards
# Tensors some checkpoints hold that carry nothing a model needs (older Llama files saved the
# rotary frequencies).
IGNORED = ("rotary_emb.inv_freq",)


def _family(model_type: str | None):
    from lmforge.models.registry import family_for_hf

    if model_type not in ARCHITECTURES:
        raise LMForgeError(
            f"model_type {model_type!r} is not one of {', '.join(ARCHITECTURES)}: import it with"
            " the family of its model_type (lmforge.checkpoint.load_model)"
        )
    return family_for_hf(model_type)


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(rope base, Llama 3 scaling or None) from transformers 5's ``rope_parameters`` or the
    older ``rope_theta`` / ``rope_scaling``."""
    params = hf.get("rope_parameters")
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise LMForgeError("partial_rotary_factor != 1 has no lmforge equivalent")
    if kind == "default":
        return theta, None
    if kind == "llama3":
        missing = [k for k in ROPE_SCALING if k not in params]
        if missing:
            raise LMForgeError(f"llama3 rope scaling without {', '.join(missing)}")
        return theta, {k: float(params[k]) for k in ROPE_SCALING}
    raise LMForgeError(f"rope type {kind!r} has no lmforge equivalent (supported: default, llama3)")


def config_from_hf(hf: dict) -> GPTConfig:
    """The config of our family for a Llama / Mistral / Qwen2 / Qwen3 ``config.json``."""
    fam = _family(hf.get("model_type"))
    kind = fam.name
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise LMForgeError(f"hidden_act {act!r} has no lmforge equivalent (supported: silu)")
    refused = []
    if kind in ("llama", "mistral", "qwen3") and hf.get("attention_bias"):
        refused.append("attention_bias=true")
    if hf.get("mlp_bias"):
        refused.append("mlp_bias=true")
    window = hf.get("sliding_window")
    if kind in ("qwen2", "qwen3"):
        layers = hf.get("layer_types") or []
        if hf.get("use_sliding_window") or "sliding_attention" in layers:
            refused.append("use_sliding_window=true (sliding windows on some layers only)")
        window = None
    if refused:
        raise LMForgeError(f"{', '.join(refused)} has no lmforge equivalent for {kind}")
    theta, scaling = _rope(hf)
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    return fam.config(
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_embd=n_embd,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        head_dim=hf.get("head_dim") or n_embd // n_head,
        intermediate_size=hf["intermediate_size"],
        dropout=hf.get("attention_dropout", 0.0),
        rope_base=theta,
        rope_scaling=scaling,
        ln_eps=hf.get("rms_norm_eps", 1e-6),
        tie_weights=hf.get("tie_word_embeddings", False),
        sliding_window=window,
    )


def config_to_hf(c: GPTConfig, kind: str) -> dict:
    """The ``config.json`` of transformers' architecture for family ``kind``; refuses options
    that architecture has no place for, naming the family that has."""
    why = []
    for key, want in (("pos_emb", "rotary"), ("norm", "rmsnorm"), ("mlp", "swiglu")):
        if getattr(c, key) != want:
            why.append(f"{key}={getattr(c, key)} ({ARCHITECTURES[kind]} has {want})")
    if c.bias:
        why.append("bias=true (only Qwen2 has biases, on q/k/v: qkv_bias=true)")
    if c.logit_softcap is not None:
        why.append(
            f"logit_softcap={c.logit_softcap} ({ARCHITECTURES[kind]} does not soft-cap its logits;"
            " export a model trained without it)"
        )
    if c.qkv_bias != (kind == "qwen2"):
        why.append(
            f"qkv_bias={str(c.qkv_bias).lower()} (q/k/v biases are Qwen2's: lmforge.models.gpt.Qwen2Config)"
        )
    if c.qk_norm != (kind == "qwen3"):
        why.append(
            f"qk_norm={str(c.qk_norm).lower()} (QK-norm is Qwen3's: lmforge.models.gpt.Qwen3Config)"
        )
    if c.sliding_window is not None and kind != "mistral":
        why.append(
            f"sliding_window={c.sliding_window} (Mistral's option: lmforge.models.gpt.MistralConfig)"
        )
    if why:
        raise LMForgeError(
            f"this {type(c).__name__} does not map onto transformers' {ARCHITECTURES[kind]}: "
            + "; ".join(why)
        )
    rope_scaling = None
    if c.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3"} | c.rope_scaling
        n = "original_max_position_embeddings"
        rope_scaling[n] = int(rope_scaling[n])
    hf = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.ln_eps,
        "rope_theta": c.rope_base,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": c.tie_weights,
        "attention_dropout": c.dropout,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if kind in ("llama", "qwen3"):
        hf |= {"attention_bias": False}
    if kind == "llama":
        hf |= {"mlp_bias": False}
    if kind == "mistral":
        hf |= {"sliding_window": c.sliding_window}
    if kind in ("qwen2", "qwen3"):
        hf |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": c.n_layer}
    return hf


def layout(c: GPTConfig) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """For every tensor of ours, the tensors of theirs it stacks: (ours, [(theirs, first row,
    end row)]). The embedding and head take the first ``vocab_size`` rows (ours are padded)."""
    V = c.vocab_size
    q, kv, inner = c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.intermediate_size
    out = [("tok_emb.weight", [("model.embed_tokens.weight", 0, V)])]
    for i in range(c.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        att = theirs + "self_attn."
        out += [
            (ours + "ln_1.weight", [(theirs + "input_layernorm.weight", 0, c.n_embd)]),
            (
                ours + "attn.qkv.weight",
                [
                    (att + "q_proj.weight", 0, q),
                    (att + "k_proj.weight", q, q + kv),
                    (att + "v_proj.weight", q + kv, q + 2 * kv),
                ],
            ),
            (ours + "attn.proj.weight", [(att + "o_proj.weight", 0, c.n_embd)]),
            (ours + "ln_2.weight", [(theirs + "post_attention_layernorm.weight", 0, c.n_embd)]),
            (
                ours + "mlp.fc.weight",
                [
                    (theirs + "mlp.gate_proj.weight", 0, inner),
                    (theirs + "mlp.up_proj.weight", inner, 2 * inner),
                ],
            ),
            (ours + "mlp.proj.weight", [(theirs + "mlp.down_proj.weight", 0, c.n_embd)]),
        ]
        if c.qkv_bias:
            out.append(
                (
                    ours + "attn.qkv.bias",
                    [
                        (att + "q_proj.bias", 0, q),
                        (att + "k_proj.bias", q, q + kv),
                        (att + "v_proj.bias", q + kv, q + 2 * kv),
                    ],
                )
            )
        if c.qk_norm:
            out += [
                (ours + "attn.q_norm.weight", [(att + "q_norm.weight", 0, c.head_dim)]),
                (ours + "attn.k_norm.weight", [(att + "k_norm.weight", 0, c.head_dim)]),
            ]
    out.append(("ln_f.weight", [("model.norm.weight", 0, c.n_embd)]))
    if not c.tie_weights:
        out.append(("lm_head.weight", [("lm_head.weight", 0, V)]))
    return out


def load_hf_llama(path: str | Path, dtype: torch.dtype = torch.float32) -> GPT:
    """Our GPT (eval mode, ``dtype``) with the weights of a ``save_pretrained`` Llama, Mistral,
    Qwen2 or Qwen3 directory, filled in place one tensor at a time. The directory's generation
    and tokenizer settings (``SIDE_FILES``) and its special token ids ride along in
    ``model.hf_files`` and are written again by ``export_hf_llama``."""
    path = Path(path)
    hf = config_json(path)
    c = config_from_hf(hf)
    arch = f"config.json ({ARCHITECTURES[hf['model_type']]})"
    weights = SafetensorsDir(path)
    with torch.device("meta"):
        model = GPT(c).to(dtype)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.reset_buffers()
    params = model.state_dict(keep_vars=True)
    used = set()
    with torch.no_grad():
        for ours, parts in layout(c):
            dest = params[ours]
            for theirs, start, end in parts:
                shape = weights.shape(theirs, needed_by=arch)
                if shape != tuple(dest[start:end].shape):
                    raise LMForgeError(
                        f"{weights.files[theirs]}: {theirs} has shape {shape}, config.json"
                        f" implies {tuple(dest[start:end].shape)}: config.json belongs to another"
                        " model"
                    )
                weights.read_into(theirs, dest[start:end], needed_by=arch)
                used.add(theirs)
            if end < dest.size(0):  # the padded vocabulary rows
                dest[end:].zero_()
    unused = sorted(
        n
        for n in weights.names() - used
        if not n.endswith(IGNORED) and not (c.tie_weights and n == "lm_head.weight")
    )
    if unused:
        raise LMForgeError(
            f"{weights.source} holds tensors {arch} has no place for ({', '.join(unused[:3])}"
            f"{' ...' if len(unused) > 3 else ''}): config.json belongs to another model"
        )
    model.hf_files = {
        name: (path / name).read_text() for name in SIDE_FILES if (path / name).is_file()
    }
    model.hf_files["config.json"] = json.dumps(
        {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
    )
    return model.eval()


def _special_ids(tokenizer, kind: str) -> dict:
    """bos/eos token ids of a tokenizer of ours, from the family's frame tokens it has."""
    from lmforge.models.registry import family

    frame = family(kind).frame
    ids = {}
    for key, tokens in (("bos_token_id", frame.prefix), ("eos_token_id", frame.suffix)):
        found = [t for t in tokens if tokenizer.token_to_id(t) is not None]
        if found:
            ids[key] = tokenizer.token_to_id(found[0])
            ids[key.replace("_id", "")] = found[0]
    return ids


def export_hf_llama(
    model: GPT, out: str | Path, tokenizer=None, max_shard_bytes: int = MAX_SHARD_BYTES
) -> Path:
    """Write ``model`` as a transformers directory of its family's architecture (config.json,
    safetensors, sharded beyond ``max_shard_bytes``, generation_config.json, tokenizer files);
    refuses options that architecture has no place for. The side files of an imported directory
    (``model.hf_files``) are written as they came."""
    from lmforge.models.registry import family_of

    c = model.config
    kind = family_of(c).name
    hf_config = config_to_hf(c, kind)
    hf_config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    sources = dict(getattr(model, "hf_files", {}))
    special = _special_ids(tokenizer, kind) if tokenizer is not None else {}
    ids = {k: v for k, v in special.items() if k.endswith("_id")}
    ids |= json.loads(sources.pop("config.json", "{}"))  # an imported model's own ids
    hf_config |= ids
    if "generation_config.json" not in sources:
        sources["generation_config.json"] = json.dumps(
            {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids},
            indent=2,
        )
    if tokenizer is None:
        sources = {k: v for k, v in sources.items() if k == "generation_config.json"}
    sd = model.state_dict()
    state = {}
    for ours, parts in layout(c):
        for theirs, start, end in parts:
            state[theirs] = sd[ours][start:end]
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c.block_size}
    tok_cfg |= {k: v for k, v in special.items() if not k.endswith("_id")}
    return write_hf_dir(
        out,
        hf_config,
        state,
        tokenizer,
        tok_cfg,
        extra_files=sources,
        max_shard_bytes=max_shard_bytes,
    )
