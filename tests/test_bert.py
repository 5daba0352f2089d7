"""BERT: parity with transformers, masking statistics, loss normalisation, the MLM task."""

import json

import lightning as L
import pytest
import torch

from lmforge.data.datasets import MLMBatches, RandomWindows
from lmforge.data.masking import Masker, MaskingConfig
from lmforge.interop.hf_bert import export_hf_bert, load_hf_bert
from lmforge.models.bert import Bert, BertConfig
from lmforge.tasks.masked_lm import MaskedLMTask

transformers = pytest.importorskip("transformers")


def hf_config(**kw):
    return transformers.BertConfig(
        **(
            {
                "vocab_size": 99,
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 128,
                "max_position_embeddings": 40,
                "type_vocab_size": 2,
                "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0,
            }
            | kw
        )
    )


def inputs(batch=3, T=16, vocab=99):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, T), generator=g)
    mask = torch.ones(batch, T, dtype=torch.long)
    mask[1, 10:] = 0  # padding
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, 8:] = 1
    return ids, mask, types


def safetensors_keys(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def randomize(model: torch.nn.Module) -> None:
    """Non-trivial values everywhere (LayerNorms and biases are initialised to 1 and 0)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def test_import_matches_transformers_logits_with_padding(tmp_path):
    ref = transformers.BertForMaskedLM(hf_config()).eval()
    randomize(ref)
    ref.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="holds no pooler"):
        ours = load_hf_bert(tmp_path)
    assert ours.untrained == {"pooler"}
    export_hf_bert(ours, tmp_path / "export")  # the new pooler is not written as trained
    assert not any("pooler" in k for k in safetensors_keys(tmp_path / "export"))
    ids, mask, types = inputs()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, mask, types)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert ours.mlm_head.decoder.weight is ours.tok_emb.weight


def test_import_bare_bert_model_hidden_states(tmp_path):
    ref = transformers.BertModel(hf_config()).eval()
    randomize(ref)
    ref.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="bare BertModel: the MLM head is newly initialised"):
        ours = load_hf_bert(tmp_path)
    assert ours.untrained == {"mlm_head"}
    ids, mask, types = inputs()
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, token_type_ids=types)
        hidden = ours.hidden(ids, mask, types)
    torch.testing.assert_close(hidden, out.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        ours.sequence_features(hidden), out.pooler_output, rtol=1e-5, atol=1e-5
    )
    # Exported again, it is a BertModel: the untrained MLM head is not written as trained.
    export_hf_bert(ours, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == ["BertModel"]
    assert not any(k.startswith("cls.") for k in safetensors_keys(tmp_path / "export"))
    again, info = transformers.BertModel.from_pretrained(
        tmp_path / "export", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        back = again.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(back.pooler_output, out.pooler_output, rtol=1e-6, atol=1e-6)


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    ours = Bert(
        BertConfig(vocab_size=99, block_size=40, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    ).eval()
    randomize(ours)
    export_hf_bert(ours, tmp_path / "export")
    ref = transformers.BertForMaskedLM.from_pretrained(tmp_path / "export").eval()
    ids, mask, types = inputs()
    with torch.no_grad():
        expected = ours(ids, mask, types)
        got = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The pooler is written where BertModel and BertForSequenceClassification load it.
    bare, info = transformers.BertModel.from_pretrained(
        tmp_path / "export", output_loading_info=True
    )
    assert not info["missing_keys"]
    with torch.no_grad():
        pooled = bare.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output
        torch.testing.assert_close(
            pooled, ours.sequence_features(ours.hidden(ids, mask, types)), rtol=1e-5, atol=1e-5
        )
    again = load_hf_bert(tmp_path / "export")  # and back
    assert again.untrained == set()
    torch.testing.assert_close(again(ids, mask, types), expected, rtol=1e-6, atol=1e-6)


def test_sparse_prediction_equals_dense_logits_at_masked_positions():
    torch.manual_seed(0)
    model = Bert(
        BertConfig(vocab_size=70, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    ).eval()
    ids = torch.randint(0, 70, (2, 16))
    positions = torch.rand(2, 16) < 0.3
    hidden = model.hidden(ids)
    torch.testing.assert_close(
        model.lm_logits(hidden, positions), model.lm_logits(hidden)[positions]
    )


def make_masker(whole_word=False, mask_prob=0.15, vocab=1000, continuation=None):
    specials = [0, 1, 2, 3, 4]  # [PAD] [UNK] [CLS] [SEP] [MASK]
    return Masker(
        MaskingConfig(mask_prob=mask_prob, whole_word=whole_word), vocab, 4, specials, continuation
    )


@pytest.mark.parametrize("mask_prob", [0.15, 0.3])
def test_masking_statistics_over_100k_tokens(mask_prob):
    masker = make_masker(mask_prob=mask_prob)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (100, 1000), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    ids[:10, 500:] = 0  # padding
    out, labels = masker(ids, torch.Generator().manual_seed(1))
    eligible = ids >= 5
    selected = labels != -100
    assert not (selected & ~eligible).any()  # never special or padding
    assert torch.equal(labels[selected], ids[selected])
    frac = selected.sum().item() / eligible.sum().item()
    assert abs(frac - mask_prob) < 0.005
    n = selected.sum().item()
    masked = (out[selected] == 4).sum().item() / n
    kept = (out[selected] == ids[selected]).sum().item() / n
    random = 1 - masked - kept
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(random - 0.1) < 0.01
    assert (
        out[selected & (out != 4) & (out != ids)] >= 5
    ).all()  # random replacements are normal tokens
    assert torch.equal(out[~selected], ids[~selected])


def test_masks_are_seeded_and_differ_between_steps():
    masker = make_masker()
    ids = torch.randint(5, 1000, (8, 64))
    a = masker(ids, torch.Generator().manual_seed(3))
    b = masker(ids, torch.Generator().manual_seed(3))
    c = masker(ids, torch.Generator().manual_seed(4))
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


def test_whole_word_masking_selects_all_pieces_of_a_word():
    continuation = torch.zeros(1000, dtype=torch.bool)
    continuation[500:] = True  # ids >= 500 are "##" pieces
    masker = make_masker(whole_word=True, mask_prob=0.3, continuation=continuation)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (20, 200), generator=g)
    ids[:, 0] = 2
    _, labels = masker(ids, torch.Generator().manual_seed(1))
    selected = labels != -100
    # a continuation piece right after an eligible token belongs to that token's word
    follows = continuation[ids[:, 1:]] & (ids[:, :-1] >= 5)
    assert follows.sum() > 1000
    assert torch.equal(selected[:, 1:][follows], selected[:, :-1][follows])
    frac = selected.sum().item() / selected.numel()
    assert 0.2 < frac < 0.4


class FixedBatches(L.LightningDataModule):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None)


class Grads(L.Callback):
    """The gradients the optimizer stepped with (they stay until the next step's zero_grad)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.grads = {
            n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None
        }


def mlm_batch(n_rows, seed, mask_prob):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (n_rows, 12), generator=g)
    labels = torch.where(
        torch.rand(n_rows, 12, generator=g) < mask_prob, ids, torch.full_like(ids, -100)
    )
    return {"input_ids": ids, "labels": labels, "token_type_ids": torch.zeros_like(ids)}


def tiny_mlm_task():
    torch.manual_seed(0)
    return MaskedLMTask(
        BertConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    )


def grads_after_one_step(batches, accumulate, clip=None):
    task = tiny_mlm_task()
    grads = Grads()
    trainer = L.Trainer(
        max_steps=1,
        accumulate_grad_batches=accumulate,
        callbacks=[grads],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        gradient_clip_val=clip,
    )
    trainer.fit(task, datamodule=FixedBatches(batches))
    return grads.grads


def test_accumulated_micro_batches_give_the_one_batch_gradient():
    a, b = mlm_batch(4, 0, 0.1), mlm_batch(4, 1, 0.5)  # very different masked-token counts
    assert (a["labels"] != -100).sum() * 2 < (b["labels"] != -100).sum()
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    accumulated = grads_after_one_step([a, b], accumulate=2)
    single = grads_after_one_step([both], accumulate=1)
    assert accumulated.keys() == single.keys() and len(single) > 10
    for name in single:
        torch.testing.assert_close(accumulated[name], single[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_step_gradient_is_the_clipped_gradient_of_the_token_mean_loss(clip):
    """What the optimizer sees equals torch's clip_grad_norm_ applied to grad(sum of losses / tokens)."""
    a, b = mlm_batch(4, 0, 0.1), mlm_batch(4, 1, 0.5)
    got = grads_after_one_step([a, b], accumulate=2, clip=clip)
    task = tiny_mlm_task()
    total, count = 0.0, 0
    for batch in (a, b):
        loss_sum, n, _ = task.mlm_loss(batch)
        total, count = total + loss_sum, count + n
    (total / count).backward()
    if clip:
        norm = torch.nn.utils.clip_grad_norm_(task.parameters(), clip)
        assert norm > clip  # clipping did act
    assert len(got) > 10
    for name, p in task.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7)


def test_mlm_batches_from_prepared_shards(train_cfg, tmp_path):
    from lmforge.cli.train import train

    cfg = train_cfg(
        "model=bert-nano",
        "data=shakespeare_wordpiece",
        "task=masked_lm",
        f"data.dir={tmp_path}/wp",
        "seed=1",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "data.max_val_windows=16",
        "data.prepare.tokenizer.vocab_size=500",
        "logger=csv",
    )
    metrics = train(cfg)
    assert {"val/loss", "val/ppl", "val/mlm_acc"} <= metrics.keys()
    from lmforge.cli.train import validate
    from lmforge.data.datamodule import TokenDataModule

    typed = validate(cfg)
    dm = TokenDataModule(typed.data, seed=1, masking=typed.task.masking)
    dm.setup("fit")
    batch = dm.train_set.batch(0)
    cls_id, sep_id = dm.tokenizer.token_to_id("[CLS]"), dm.tokenizer.token_to_id("[SEP]")
    assert (batch["input_ids"][:, 0] == cls_id).all() and (
        batch["input_ids"][:, -1] == sep_id
    ).all()
    assert (batch["labels"][:, 0] == -100).all() and (batch["labels"][:, -1] == -100).all()
    assert batch["input_ids"].shape == (32, 64)  # bert-nano: block_size 64
    assert torch.equal(dm.train_set.batch(0)["labels"], batch["labels"])  # a function of the step
    # Each row's window and mask are the same whether the global batch is split over 2 ranks.
    half = MLMBatches(
        RandomWindows(dm.train_set.windows.shards, 62, 16, seed=1, rank=1, world_size=2),
        dm.train_set.masker,
        cls_id,
        sep_id,
    ).batch(0)
    for key in ("input_ids", "labels"):
        assert torch.equal(half[key], batch[key][16:])


def test_masked_lm_on_a_tokenizer_without_mask_token_is_refused(train_cfg):
    from lmforge.cli.train import train
    from lmforge.errors import LMForgeError

    with pytest.raises(
        LMForgeError, match=r"lacks \[CLS\], \[SEP\], \[MASK\], \[PAD\]: .*wordpiece"
    ):
        train(train_cfg("model=bert-nano", "task=masked_lm", "logger=csv", "trainer.max_steps=2"))
