"""Llama, Mistral, Qwen2 and Qwen3 checkpoints of transformers in and out: logits and greedy
generations agree both ways; sharded and bf16 checkpoints import; bad directories are refused
with one line naming the file."""

import json

import pytest
import torch
import transformers

from lmforge.checkpoint import load_model
from lmforge.errors import LMForgeError
from lmforge.interop.hf_llama import export_hf_llama, load_hf_llama
from lmforge.models.gpt import GPT, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from lmforge.models.layers import KVCache
from lmforge.models.registry import family_of

VOCAB = 128
GEOMETRY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3-rope-tied": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True},
    ),
    "mistral-window": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        {"sliding_window": 6},
    ),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"rope_theta": 1e6}),
    "qwen3-mqa": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        {"num_key_value_heads": 1, "head_dim": 32},
    ),
}


def randomize(model: torch.nn.Module) -> None:
    """Every parameter moved off its initial value (norm weights too), reproducibly."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def ids(T: int = 20) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(0))


def reference(case: str) -> transformers.PreTrainedModel:
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    ref = model_cls(config_cls(**(GEOMETRY | extra))).eval()
    randomize(ref)
    return ref


def greedy(ref, prompt: torch.Tensor, n: int = 8) -> torch.Tensor:
    return ref.generate(
        prompt,
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompt),
    )


@pytest.mark.parametrize("case", list(CASES))
def test_import_and_export_match_transformers(tmp_path, case):
    ref = reference(case)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_hf_llama(tmp_path / "hf")
    assert family_of(ours.config).hf_model_type == ref.config.model_type
    x = ids()
    with torch.no_grad():
        expected = ref(x).logits
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    prompt = x[:1, :5]
    assert torch.equal(ours.generate(prompt, 8, temperature=0), greedy(ref, prompt))
    assert (ours.lm_head.weight is ours.tok_emb.weight) == ref.config.tie_word_embeddings

    export_hf_llama(ours, tmp_path / "out")
    back = type(ref).from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(ref) and back.config.model_type == ref.config.model_type
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy(back, prompt), ours.generate(prompt, 8, temperature=0))
    assert (tmp_path / "out" / "generation_config.json").is_file()
    assert load_hf_llama(tmp_path / "out").config == ours.config  # the config.json we write


def test_lmforge_model_exports_and_generates_in_transformers(tmp_path):
    """The other direction from scratch: a model of ours (GQA, qkv biases) as a Qwen2."""
    torch.manual_seed(0)
    c = Qwen2Config(
        vocab_size=100, block_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
        intermediate_size=80,
    )  # fmt: skip
    ours = GPT(c).eval()
    randomize(ours)
    export_hf_llama(ours, tmp_path / "out")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(ref) is transformers.Qwen2ForCausalLM
    x = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, ours(x), rtol=1e-5, atol=1e-5)
    prompt = x[:1, :4]
    assert torch.equal(greedy(ref, prompt), ours.generate(prompt, 8, temperature=0))
    again = load_hf_llama(tmp_path / "out")
    assert again.config == ours.config
    for name, t in ours.state_dict().items():  # the padded vocabulary rows are not exported
        rows = c.vocab_size if name in ("tok_emb.weight", "lm_head.weight") else None
        assert torch.equal(again.state_dict()[name][:rows], t[:rows]), name


@pytest.mark.parametrize("window", [None, 5])
def test_gqa_kv_cache_equals_the_full_forward(window):
    torch.manual_seed(0)
    c = MistralConfig(
        vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
        intermediate_size=48, sliding_window=window,
    )  # fmt: skip
    model = GPT(c).eval()
    randomize(model)
    x = ids(16)
    with torch.no_grad():
        full = model(x)
        cache = KVCache()
        steps = [model(x[:, :7], cache=cache)]  # a prompt, then one token at a time
        steps += [model(x[:, t : t + 1], cache=cache) for t in range(7, 16)]
    assert cache.layers[0][0].shape == (3, 2, 16, 8)  # n_kv_head heads are cached
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    with_cache = model.generate(x[:, :3], 12, temperature=0)
    without = model.generate(x[:, :3], 12, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)


def test_sliding_window_limits_what_a_token_sees():
    """With a window of 4, the logits at position 10 ignore tokens 0..6, which a full causal
    model does not."""
    torch.manual_seed(0)
    geometry = dict(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=2, n_embd=32)
    windowed = GPT(MistralConfig(**geometry, sliding_window=4)).eval()
    x = ids(12)
    y = x.clone()
    y[:, :7] = (y[:, :7] + 1) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(windowed(x)[:, 10], windowed(y)[:, 10], rtol=0, atol=0)
        assert not torch.allclose(windowed(x)[:, 6], windowed(y)[:, 6])


def test_sharded_bf16_checkpoint_imports_in_place(tmp_path):
    ref = reference("llama")
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    ours = load_model(tmp_path / "hf").model  # through the registry, by model_type
    assert next(ours.parameters()).dtype == torch.float32
    x = ids()
    ref32 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        expected = ref32.eval()(x).logits  # the bf16 weights, in fp32
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    assert ours.hf_files["tokenizer_config.json"] == '{"model_max_length": 64}'
    export_hf_llama(ours, tmp_path / "out", max_shard_bytes=200_000)  # sharded export
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_refuses_what_the_architecture_cannot_hold(tmp_path):
    c = LlamaConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, qk_norm=True)
    with pytest.raises(LMForgeError, match="qk_norm=true .*Qwen3Config"):
        export_hf_llama(GPT(c), tmp_path / "x")
    c = Qwen3Config(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, sliding_window=4)
    with pytest.raises(LMForgeError, match="sliding_window=4 .*MistralConfig"):
        export_hf_llama(GPT(c), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    ok = GPT(LlamaConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(LMForgeError, match="holds files lmforge did not write"):
        export_hf_llama(ok, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def tiny_dir(tmp_path, shards: bool):
    ref = reference("llama")
    ref.save_pretrained(tmp_path / "hf", max_shard_size="100KB" if shards else "50MB")
    return tmp_path / "hf"


def cli_error(capsys, path) -> str:
    """What ``lmforge-export`` prints when reading ``path``: one line, exit status 2."""
    from lmforge.cli.export import main

    capsys.readouterr()  # what transformers printed while writing the directory
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), str(path.parent / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_unsupported_architecture_names_the_file_and_the_supported(tmp_path, capsys):
    path = tiny_dir(tmp_path, shards=False)
    config = json.loads((path / "config.json").read_text())
    config |= {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}
    (path / "config.json").write_text(json.dumps(config))
    err = cli_error(capsys, path)
    assert f"{path}/config.json" in err and "'phi3'" in err
    for supported in ("gpt2", "llama", "mistral", "qwen2", "qwen3"):
        assert supported in err


def test_missing_shard_names_the_file(tmp_path, capsys):
    path = tiny_dir(tmp_path, shards=True)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    err = cli_error(capsys, path)
    assert f"{shard} not found" in err and "download the missing shard" in err


def test_index_naming_a_tensor_its_shard_lacks(tmp_path, capsys):
    path = tiny_dir(tmp_path, shards=True)
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    right = index["weight_map"][name]
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != right)
    index["weight_map"][name] = wrong
    index_file.write_text(json.dumps(index))
    err = cli_error(capsys, path)
    assert f"{path / wrong} has no tensor {name}" in err and "download it again" in err


def test_missing_tensor_in_a_single_file(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    path = tiny_dir(tmp_path, shards=False)
    state = load_file(path / "model.safetensors")
    del state["model.layers.0.self_attn.k_proj.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    err = cli_error(capsys, path)
    assert f"{path}/model.safetensors has no tensor model.layers.0.self_attn.k_proj.weight" in err


@pytest.mark.parametrize(
    ("name", "published"),
    [("smollm2-135m", 134_515_008), ("qwen2.5-0.5b", 494_032_768), ("llama-3.2-1b", 1_235_814_400)],
)
def test_gpu_geometries_have_the_published_parameter_counts(name, published):
    """Built on the meta device from conf/model/<name>.yaml; transformers' model of the same
    config.json counts the same."""
    from omegaconf import OmegaConf

    from lmforge.config import CONF_DIR, build
    from lmforge.interop.hf_llama import ARCHITECTURES, config_to_hf

    c = build(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"), "model")
    kind = family_of(c).name
    with torch.device("meta"):
        ours = GPT(c)
        hf = config_to_hf(c, kind)
        hf_config = transformers.AutoConfig.for_model(**hf)
        theirs = getattr(transformers, ARCHITECTURES[kind])(hf_config)
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters()) == published


def test_gpt2_export_refuses_the_llama_options(tmp_path):
    from lmforge.interop.hf_gpt2 import export_hf_gpt2
    from lmforge.models.gpt import GPTConfig

    geometry = dict(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    for option, shown in [
        ({"norm": "rmsnorm"}, "norm=rmsnorm"),
        ({"mlp": "swiglu"}, "mlp=swiglu"),
        ({"n_kv_head": 1}, "n_kv_head=1"),
        ({"qkv_bias": True}, "qkv_bias=True"),
    ]:
        with pytest.raises(LMForgeError, match=f"{shown} \\(GPT-2 has"):
            export_hf_gpt2(GPT(GPTConfig(**geometry, **option)), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_trained_llama_checkpoint_exports_as_llama(train_cfg, tmp_path):
    """model=llama-nano trains, records its family, and exports as a LlamaForCausalLM with its
    tokenizer; transformers computes the same logits."""
    from lmforge.cli.export import main as export_main
    from lmforge.cli.train import train

    cfg = train_cfg(
        "model=llama-nano", "trainer.max_steps=2", "logger=csv", "callbacks.text_samples=null"
    )
    train(cfg)
    ckpt = f"{cfg.paths.output_dir}/checkpoints/last.ckpt"
    loaded = load_model(ckpt)
    assert loaded.family.name == "llama" and loaded.model.config.n_kv_head == 2
    assert export_main([ckpt, str(tmp_path / "hf")]) == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(ref) is transformers.LlamaForCausalLM
    text = "ROMEO: wherefore"
    assert tok(text).input_ids == loaded.tokenizer.encode(text).ids
    x = torch.tensor([loaded.tokenizer.encode(text).ids])
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, loaded.model(x), rtol=1e-5, atol=1e-5)
