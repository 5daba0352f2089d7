"""The modded-nanogpt speedrun's options of our GPT: squared-ReLU MLP, zero-initialised output
projections, logit soft-capping, QK-norm, an untied head; and the exports that refuse them."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LMForgeError
from lmforge.interop.hf_gpt2 import export_hf_gpt2
from lmforge.interop.hf_llama import export_hf_llama
from lmforge.models.gpt import GPT, GPTConfig, LlamaConfig, Qwen3Config


def nano(**kw) -> GPTConfig:
    return GPTConfig(
        **({"vocab_size": 65, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32} | kw)
    )


def tokens(seed: int = 0, shape=(2, 16)) -> torch.Tensor:
    return torch.randint(0, 65, shape, generator=torch.Generator().manual_seed(seed))


def test_relu2_mlp_is_proj_of_squared_relu():
    torch.manual_seed(0)
    model = GPT(nano(mlp="relu2"))
    mlp = model.blocks[0].mlp
    x = torch.randn(2, 5, 32)
    h = x @ mlp.fc.weight.T + mlp.fc.bias
    expected = (h.clamp(min=0) ** 2) @ mlp.proj.weight.T + mlp.proj.bias
    torch.testing.assert_close(mlp(x), expected)
    assert not torch.allclose(GPT(nano()).blocks[0].mlp(x), expected)
    gelu = GPT(nano())  # the same matmuls: the same parameters and FLOPs
    assert model.num_params() == gelu.num_params()
    assert model.flops_per_token() == gelu.flops_per_token()
    with pytest.raises(ValueError, match="GPTConfig.mlp must be one of gelu, swiglu, relu2"):
        nano(mlp="relu3")


def projections(model: GPT) -> list[torch.Tensor]:
    return [w for b in model.blocks for w in (b.attn.proj.weight, b.mlp.proj.weight)]


def test_zero_init_proj_makes_every_block_the_identity():
    torch.manual_seed(0)
    model = GPT(nano(zero_init_proj=True)).eval()
    assert all(torch.count_nonzero(w) == 0 for w in projections(model))
    others = [model.tok_emb.weight, model.pos_emb.weight]
    others += [w for b in model.blocks for w in (b.attn.qkv.weight, b.mlp.fc.weight)]
    assert all(torch.count_nonzero(w) == w.numel() for w in others)
    assert all(torch.count_nonzero(w) > 0 for w in projections(GPT(nano())))  # the default
    x = tokens()
    positions = torch.arange(16)
    embedded = model.ln_f(model.tok_emb(x) + model.pos_emb(positions))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.lm_logits(embedded), rtol=0, atol=0)
        for w in projections(model):  # reset_parameters zeroes them again
            w.normal_()
    model.reset_parameters()
    assert all(torch.count_nonzero(w) == 0 for w in projections(model))
    with torch.device("meta"):  # a model given storage later (to_empty), then initialised
        late = GPT(nano(zero_init_proj=True))
    late.to_empty(device="cpu")
    late.reset_parameters()
    late.tie_weights()
    assert all(torch.count_nonzero(w) == 0 for w in projections(late))
    assert torch.count_nonzero(late.blocks[0].attn.qkv.weight) > 0


def test_logit_softcap_bounds_every_logit_by_the_formula():
    torch.manual_seed(0)
    plain = GPT(nano())
    capped = GPT(nano(logit_softcap=5))
    capped.load_state_dict(plain.state_dict())
    for model in (plain, capped):
        with torch.no_grad():
            model.lm_head.weight.mul_(200)  # logits far beyond the cap
        model.eval()
    x = tokens()
    with torch.no_grad():
        hidden = plain.hidden(x)
        raw = F.linear(hidden, plain.lm_head.weight)[..., :65]
        assert raw.abs().max() > 20
        torch.testing.assert_close(plain(x), raw, rtol=0, atol=0)  # cap=None: unchanged
        logits = capped(x)
        assert logits.dtype == torch.float32 and logits.abs().max() <= 5
        torch.testing.assert_close(logits, 5 * torch.tanh(raw / 5))
        picked = torch.zeros(2, 16, dtype=torch.bool)  # masked-LM and GRPO read lm_logits
        picked[:, ::3] = True
        torch.testing.assert_close(
            capped.lm_logits(hidden, picked), 5 * torch.tanh(raw[picked] / 5)
        )
    # generation samples from the capped distribution
    prompt = tokens(1, (64, 4))
    sampled = capped.generate(prompt, 1, generator=torch.Generator().manual_seed(3))[:, -1:]
    with torch.no_grad():
        probs = F.softmax(capped(prompt)[:, -1].float(), dim=-1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampled, expected)
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="GPTConfig.logit_softcap must be positive"):
            nano(logit_softcap=bad)


def test_untied_head_trains_apart_from_the_embedding():
    torch.manual_seed(0)
    model = GPT(nano(tie_weights=False))
    head, emb = model.lm_head.weight, model.tok_emb.weight
    assert head.data_ptr() != emb.data_ptr() and not torch.equal(head, emb)
    before_head, before_emb = head.detach().clone(), emb.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = tokens()
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()
    step_head, step_emb = head.detach() - before_head, emb.detach() - before_emb
    assert step_head.abs().sum() > 0 and step_emb.abs().sum() > 0
    assert not torch.allclose(step_head, step_emb)


@pytest.mark.parametrize("pos_emb", ["learned", "rotary"])
def test_qk_norm_gives_each_head_unit_rms_times_the_weight(pos_emb, monkeypatch):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        seen.append((q, k))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    torch.manual_seed(0)
    normed = GPT(nano(pos_emb=pos_emb, qk_norm=True, ln_eps=1e-8)).eval()
    with torch.no_grad():
        for block in normed.blocks:
            block.attn.q_norm.weight.fill_(3.0)
            block.attn.k_norm.weight.fill_(0.5)
        normed(tokens())
        assert len(seen) == 2  # one per block
        for q, k in seen:  # (B, n_head, T, head_dim); rotary turns each head, keeping its RMS
            rms = lambda t: t.pow(2).mean(-1).sqrt()  # noqa: E731
            torch.testing.assert_close(rms(q), torch.full_like(rms(q), 3.0))
            torch.testing.assert_close(rms(k), torch.full_like(rms(k), 0.5))
        seen.clear()
        GPT(nano(pos_emb=pos_emb)).eval()(tokens())  # without QK-norm the RMS is far from 1
        assert all((q.pow(2).mean(-1).sqrt() - 1).abs().min() > 0.5 for q, _ in seen)


SMALL = {"vocab_size": 64, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}


@pytest.mark.parametrize(
    ("config", "export", "needle"),
    [
        (GPTConfig(**SMALL, mlp="relu2"), export_hf_gpt2, "mlp=relu2 (no transformers"),
        (
            GPTConfig(**SMALL, logit_softcap=15),
            export_hf_gpt2,
            "logit_softcap=15.0 (GPT-2 does not soft-cap its logits",
        ),
        (GPTConfig(**SMALL, qk_norm=True), export_hf_gpt2, "qk_norm=True (GPT-2 has False"),
        (LlamaConfig(**SMALL, mlp="relu2"), export_hf_llama, "mlp=relu2 (LlamaForCausalLM has"),
        (
            Qwen3Config(**SMALL, logit_softcap=30),
            export_hf_llama,
            "logit_softcap=30.0 (Qwen3ForCausalLM does not soft-cap its logits",
        ),
    ],
)
def test_export_refuses_speedrun_options_transformers_cannot_compute(
    config, export, needle, tmp_path
):
    with pytest.raises(LMForgeError) as e:
        export(GPT(config), tmp_path / "out")
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
