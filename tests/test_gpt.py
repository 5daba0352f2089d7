import pytest
import torch

from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.layers import KVCache


def nano(**kw) -> GPTConfig:
    return GPTConfig(
        **({"vocab_size": 65, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32} | kw)
    )


@pytest.mark.parametrize("pos_emb", ["learned", "rotary"])
def test_causality(pos_emb):
    """Changing token t+1 changes no logits at positions <= t."""
    torch.manual_seed(0)
    model = GPT(nano(pos_emb=pos_emb)).eval()
    x = torch.randint(0, 65, (2, 16))
    t = 7
    y = x.clone()
    y[:, t + 1] = (y[:, t + 1] + 1) % 65
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_weight_tying_by_identity():
    model = GPT(nano())
    assert model.lm_head.weight is model.tok_emb.weight
    untied = GPT(nano(tie_weights=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_param_count_matches_hand_count():
    c = nano(vocab_size=100, block_size=16, n_layer=3, n_embd=32, bias=True)
    V, T, C, L = 128, 16, 32, 3  # vocabulary padded to a multiple of 64
    per_block = (
        2 * 2 * C  # two LayerNorms, weight + bias
        + (C * 3 * C + 3 * C)  # qkv
        + (C * C + C)  # attention projection
        + (C * 4 * C + 4 * C)  # MLP up
        + (4 * C * C + C)  # MLP down
    )
    expected = V * C + T * C + L * per_block + 2 * C  # embeddings, blocks, final LayerNorm
    model = GPT(c)
    assert model.num_params() == expected
    assert model.num_params(exclude_position_embeddings=True) == expected - T * C
    no_bias = GPT(nano(vocab_size=100, n_layer=3, bias=False))
    assert no_bias.num_params() == V * C + T * C + L * (2 * C + 12 * C * C) + C


def test_flops_per_token_hand_count():
    c = nano(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False)
    model = GPT(c)
    N = 64 * 32 + 2 * (2 * 32 + 12 * 32 * 32) + 32  # no position embeddings counted
    assert model.flops_per_token() == 6 * N + 12 * 2 * 2 * 16 * 16
    assert model.flops_per_token(seq_len=8) == 6 * N + 12 * 2 * 2 * 16 * 8


def test_vocab_padding_and_logit_shape():
    c = nano(vocab_size=65)
    assert c.padded_vocab_size == 128 and c.head_dim == 16
    logits = GPT(c)(torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape == (1, 4, 65)


def test_residual_projection_init_is_scaled():
    torch.manual_seed(0)
    model = GPT(nano(n_layer=8, n_embd=256, n_head=4))
    std = model.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 8) ** 0.5) < 1e-3
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 1e-3


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(nano(block_size=32))
    x = torch.randint(0, 65, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(
            model(x[:, :-1]).reshape(-1, 65), x[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize("pos_emb", ["learned", "rotary"])
def test_kv_cache_matches_full_forward(pos_emb):
    torch.manual_seed(0)
    model = GPT(nano(pos_emb=pos_emb)).eval()
    x = torch.randint(0, 65, (2, 12))
    full = model(x)
    cache = KVCache()
    parts = [
        model(x[:, :5], cache=cache),
        model(x[:, 5:6], cache=cache),
        model(x[:, 6:], cache=cache),
    ]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generation_matches_recompute():
    torch.manual_seed(0)
    model = GPT(nano()).eval()
    prompt = torch.randint(0, 65, (1, 3))
    out = model.generate(prompt, 20, temperature=0)  # 23 > block_size: the cache is rebuilt
    ids = prompt
    for _ in range(20):
        nxt = model(ids[:, -16:])[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)


def test_sampling_respects_top_k_and_seed():
    torch.manual_seed(0)
    model = GPT(nano()).eval()
    prompt = torch.zeros(3, 1, dtype=torch.long)
    a = model.generate(
        prompt, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(1)
    )
    greedy = model.generate(prompt, 10, temperature=0)
    assert torch.equal(a, greedy)  # top_k=1 is greedy
    s1 = model.generate(prompt, 10, top_k=10, generator=torch.Generator().manual_seed(5))
    s2 = model.generate(prompt, 10, top_k=10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2)


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(vocab_size=10, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="pos_emb"):
        GPTConfig(vocab_size=10, pos_emb="alibi")
    with pytest.raises(ValueError, match="exceeds block_size"):
        GPT(nano())(torch.zeros(1, 17, dtype=torch.long))


def test_kv_cache_generation_equals_full_reforward():
    torch.manual_seed(0)
    model = GPT(nano()).eval()
    prompt = torch.randint(0, 65, (2, 5))
    for sampling in ({"temperature": 0}, {"temperature": 0.9, "top_k": 20, "top_p": 0.8}):
        cached = model.generate(prompt, 30, generator=torch.Generator().manual_seed(3), **sampling)
        full = model.generate(
            prompt, 30, use_cache=False, generator=torch.Generator().manual_seed(3), **sampling
        )
        assert torch.equal(cached, full)  # 35 > block_size 16: the cropped context too


def test_filter_logits_by_hand():
    from lmforge.models.gpt import filter_logits

    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    seen = torch.tensor([[0, 2]])
    penalised = filter_logits(logits, seen, repetition_penalty=2.0)
    assert penalised.tolist() == [[1.0, 1.0, -2.0, 0.5]]  # 2 / 2 and -1 * 2
    probs = torch.softmax(logits, -1)[0]  # 0.61, 0.22, 0.03, 0.14
    kept = filter_logits(logits, seen, top_p=0.7).isfinite()[0].tolist()
    assert kept == [True, True, False, False]  # 0.61 < 0.7, 0.61 + 0.22 reaches it
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert filter_logits(logits, seen, top_p=0.5).isfinite()[0].tolist() == [
        True,
        False,
        False,
        False,
    ]
    assert filter_logits(logits, seen, top_k=2).isfinite()[0].tolist() == [True, True, False, False]
    assert torch.equal(filter_logits(logits, seen, temperature=0.5), logits * 2)


@pytest.mark.parametrize("pos_emb", ["learned", "rotary"])
def test_packed_examples_do_not_see_each_other(pos_emb):
    """Two examples packed in one row: each gets the logits it gets alone; changing one leaves
    the other's untouched."""
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=16, pos_emb=pos_emb)
    ).eval()
    a, b = torch.randint(0, 65, (1, 6)), torch.randint(0, 65, (1, 9))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 6 + [1] * 9])
    with torch.no_grad():
        out = model(packed, segments=segments)
        torch.testing.assert_close(out[:, :6], model(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, 6:], model(b), rtol=1e-5, atol=1e-5)
        changed = packed.clone()
        changed[0, :6] = (changed[0, :6] + 1) % 65
        again = model(changed, segments=segments)
    assert torch.equal(again[:, 6:], out[:, 6:])
    assert not torch.allclose(again[:, :6], out[:, :6])
