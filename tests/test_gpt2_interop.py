"""GPT-2 checkpoints of transformers in and out: logits and greedy generations agree."""

import pytest
import torch
import transformers

from lmforge.checkpoint import load_model
from lmforge.errors import LMForgeError
from lmforge.interop.hf_gpt2 import export_hf_gpt2, load_hf_gpt2
from lmforge.models.gpt import GPT, GPTConfig


def hf_config(**kw) -> transformers.GPT2Config:
    return transformers.GPT2Config(
        vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4, **kw
    )


def randomize(model: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def ids() -> torch.Tensor:
    return torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bare", [False, True], ids=["GPT2LMHeadModel", "GPT2Model"])
def test_import_matches_transformers_logits(tmp_path, bare):
    ref = transformers.GPT2LMHeadModel(hf_config()).eval()
    randomize(ref)
    (ref.transformer if bare else ref).save_pretrained(tmp_path)
    ours = load_hf_gpt2(tmp_path)
    with torch.no_grad():
        expected = ref(ids()).logits
        got = ours(ids())
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert ours.lm_head.weight is ours.tok_emb.weight


def test_export_loads_in_transformers_with_equal_logits_and_generations(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=101, block_size=48, n_layer=2, n_head=4, n_embd=32)).eval()
    randomize(ours)
    export_hf_gpt2(ours, tmp_path / "export")
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(ids()).logits, ours(ids()), rtol=1e-5, atol=1e-5)
    prompt = ids()[:1, :4]
    theirs = ref.generate(
        prompt,
        max_new_tokens=32,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompt),
    )
    mine = ours.generate(prompt, 32, temperature=0)
    assert torch.equal(mine, theirs)  # greedy, 32 tokens
    again = load_hf_gpt2(tmp_path / "export")  # and back
    with torch.no_grad():
        torch.testing.assert_close(again(ids()), ours(ids()), rtol=1e-6, atol=1e-6)


def test_untied_head_round_trips(tmp_path):
    ref = transformers.GPT2LMHeadModel(hf_config(tie_word_embeddings=False)).eval()
    randomize(ref)
    ref.save_pretrained(tmp_path / "hf")
    ours = load_hf_gpt2(tmp_path / "hf")
    assert ours.lm_head.weight is not ours.tok_emb.weight
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()), ref(ids()).logits, rtol=1e-5, atol=1e-5)
    export_hf_gpt2(ours, tmp_path / "out")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids()).logits, ref(ids()).logits, rtol=1e-5, atol=1e-5)


def test_export_refuses_what_gpt2_cannot_hold(tmp_path):
    rotary = GPT(
        GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, pos_emb="rotary")
    )
    with pytest.raises(LMForgeError, match="pos_emb=rotary .*learned position embeddings"):
        export_hf_gpt2(rotary, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_foreign_or_corrupt_checkpoints_are_refused(tmp_path):
    bert = transformers.BertConfig(
        vocab_size=20,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    transformers.BertModel(bert).save_pretrained(tmp_path / "bert")
    with pytest.raises(LMForgeError, match="holds a BERT: lmforge-generate needs a causal LM"):
        load_model(tmp_path / "bert", causal=True, what="lmforge-generate")
    hf_config().save_pretrained(tmp_path / "cut")
    (tmp_path / "cut" / "model.safetensors").write_bytes(b"\x10")
    with pytest.raises(
        LMForgeError, match="model.safetensors cannot be read .* corrupt or truncated"
    ):
        load_model(tmp_path / "cut")


def test_trained_checkpoint_exports_with_its_tokenizer(train_cfg, tmp_path):
    from lmforge.cli.export import main as export_main
    from lmforge.cli.train import train

    cfg = train_cfg("trainer.max_steps=3", "logger=csv", "callbacks.text_samples=null")
    train(cfg)
    ckpt = f"{cfg.paths.output_dir}/checkpoints/last.ckpt"
    assert export_main([ckpt, str(tmp_path / "hf")]) == 0
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "hf")
    loaded = load_model(ckpt)
    ours, our_tok = loaded.model, loaded.tokenizer
    text = "ROMEO: wherefore"
    assert tok(text).input_ids == our_tok.encode(text).ids
    x = torch.tensor([our_tok.encode(text).ids])
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, ours(x), rtol=1e-5, atol=1e-5)


def test_export_cli_refuses_a_rotary_checkpoint(train_cfg, tmp_path, capsys):
    from lmforge.cli.export import main as export_main
    from lmforge.cli.train import train

    cfg = train_cfg(
        "model.pos_emb=rotary", "trainer.max_steps=2", "logger=csv", "callbacks.text_samples=null"
    )
    train(cfg)
    with pytest.raises(SystemExit) as exit_info:
        export_main([f"{cfg.paths.output_dir}/checkpoints/last.ckpt", str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    assert "pos_emb=rotary" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_training_starts_from_an_imported_gpt2(train_cfg, tmp_path):
    """init_from a transformers directory: the run's model is GPT-2's, its weights the start."""
    from lmforge.cli.train import train

    probe = train_cfg("trainer.max_steps=1", "logger=csv", "callbacks.text_samples=null")
    probe.paths.output_dir = str(tmp_path / "probe")
    train(probe)  # prepares the data; its tokenizer sets the vocabulary
    vocab = load_model(f"{probe.paths.output_dir}/checkpoints/last.ckpt").model.config.vocab_size
    ref = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=48, n_layer=3, n_head=3)
    )
    randomize(ref)
    ref.save_pretrained(tmp_path / "gpt2")
    cfg = train_cfg(
        f"init_from={tmp_path / 'gpt2'}",
        "trainer.max_steps=1",
        "task.optim.lr=1e-12",  # a step that leaves the weights where they started
        "task.optim.min_lr=0",
        "task.optim.weight_decay=0",
        "logger=csv",
        "callbacks.text_samples=null",
    )
    train(cfg)
    trained = load_model(f"{cfg.paths.output_dir}/checkpoints/last.ckpt").model
    assert (trained.config.n_layer, trained.config.n_embd) == (3, 48)  # GPT-2's, not gpt-nano's
    x = torch.randint(0, vocab, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(trained(x), ref.eval()(x).logits, rtol=1e-4, atol=1e-4)


def test_hub_name_when_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(LMForgeError, match="gpt2 is not a file or directory here, and fetching it"):
        load_model("gpt2")
