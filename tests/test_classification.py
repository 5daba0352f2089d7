"""Classification fine-tuning and LoRA."""

from collections import Counter
from pathlib import Path

import pytest
import torch

from lmforge.data.classification import ClassificationDataConfig, encode
from lmforge.data.tokenizer import TokenizerConfig, train_tokenizer
from lmforge.errors import LMForgeError
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.lora import LoRALinear, add_lora, merge_lora
from lmforge.models.registry import family

from .conftest import ROOT

SMS = ROOT / "data" / "sms_spam"


def small_split(tmp_path: Path, n_train: int = 300, n_eval: int = 100) -> dict[str, Path]:
    """The first rows of the bundled split files."""
    out = {}
    for name, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        lines = (SMS / f"{name}.tsv").read_text(encoding="utf-8").splitlines()[: n + 1]
        out[name] = tmp_path / f"{name}.tsv"
        out[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A gpt-nano pretrained for a few steps on Tiny Shakespeare (char tokens)."""
    from lmforge.cli.train import train

    from .conftest import compose_train

    tmp = tmp_path_factory.mktemp("pretrained")
    cfg = compose_train(
        [
            "model=gpt-nano",
            f"data.dir={tmp}/data",
            "trainer.max_steps=20",
            "trainer.val_check_interval=20",
            "logger=csv",
            "callbacks.text_samples=null",
        ],
        tmp,
    )
    train(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


def finetune(pretrained, tmp_path, *overrides):
    from lmforge.cli.train import train

    from .conftest import compose_train

    split = small_split(tmp_path)
    cfg = compose_train(
        [
            "experiment=finetune_sms_spam_gpt",
            f"init_from={pretrained}",
            f"data.train={split['train']}",
            f"data.val={split['val']}",
            f"data.test={split['test']}",
            "trainer.max_epochs=1",
            "logger=csv",
            "data.max_len=32",
            "data.on_empty=skip",  # Shakespeare's characters lack some of the messages' ones
            *overrides,
        ],
        tmp_path,
    )
    return cfg, train(cfg)


def test_checkpoint_reloads_and_predicts_identically(pretrained, tmp_path):
    from lmforge.data.classification import read_examples
    from lmforge.tasks.classification import ClassificationTask

    cfg, metrics = finetune(pretrained, tmp_path)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    task = ClassificationTask.load_from_checkpoint(ckpt, weights_only=True, map_location="cpu")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(torch.load(ckpt, weights_only=True)["tokenizer"])
    examples = read_examples(
        small_split(tmp_path)["test"], ClassificationDataConfig(train="", val="")
    )
    predicted = task.predict_texts([t for t, _ in examples], tok, max_len=32)
    accuracy = sum(p == y for p, (_, y) in zip(predicted, examples, strict=True)) / len(examples)
    assert accuracy == pytest.approx(metrics["test/acc"], abs=1e-6)  # the in-run test, reloaded
    assert task.labels == ["ham", "spam"]
    again = ClassificationTask.load_from_checkpoint(ckpt, weights_only=True, map_location="cpu")
    assert again.predict_texts([t for t, _ in examples], tok, max_len=32) == predicted


def test_lora_trains_adapters_only_and_merges_exactly(pretrained, tmp_path):
    from lmforge.tasks.classification import ClassificationTask

    base = torch.load(pretrained, weights_only=True)["state_dict"]
    cfg, metrics = finetune(pretrained, tmp_path, "task.lora.rank=4", "task.optim.lr=1e-2")
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    state = ckpt["state_dict"]
    for key, value in base.items():  # pretrained weights untouched by training
        if key in state:
            assert torch.equal(state[key], value), key
    assert any(k.endswith("lora_b") and state[k].abs().sum() > 0 for k in state)  # adapters moved
    task = ClassificationTask.load_from_checkpoint(
        Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True
    ).eval()
    batch = {
        "input_ids": torch.randint(0, 60, (4, 20)),
        "attention_mask": torch.ones(4, 20, dtype=torch.long),
        "lengths": torch.tensor([20, 15, 9, 3]),
    }
    with torch.no_grad():
        adapted = task(batch)
        merge_lora(task.model)
        merged = task(batch)
    assert not any(isinstance(m, LoRALinear) for m in task.modules())
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_lora_starts_at_the_base_model_and_wraps_the_named_layers():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    x = torch.randint(0, 50, (2, 10))
    before = model(x)
    assert add_lora(model, ["qkv", "mlp.fc"], rank=4, alpha=8) == 4  # 2 blocks x 2 layers
    torch.testing.assert_close(model(x), before)  # B = 0: the adapted model starts as the base
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert "blocks.0.attn.qkv.weight" in dict(model.named_parameters())  # base names kept


def test_bad_examples_are_refused_or_counted():
    tok = train_tokenizer(["abcdefghij klmnop"], TokenizerConfig(kind="char"))
    cfg = ClassificationDataConfig(train="", val="", max_len=6)
    labels = ["a", "b"]
    with pytest.raises(
        LMForgeError, match=r"val example 2 has the label 'c'.*on_unknown_label=skip"
    ):
        encode([("abc", "a"), ("abc", "c")], labels, tok, family("gpt").frame, cfg, "val")
    with pytest.raises(LMForgeError, match="example 1 has an empty text.*on_empty=skip"):
        encode([("  ", "a")], labels, tok, family("gpt").frame, cfg, "train")
    strict = ClassificationDataConfig(train="", val="", max_len=6, truncation="error")
    with pytest.raises(LMForgeError, match="example 1 has 10 tokens, more than data.max_len=6"):
        encode([("abcdefghij", "a")], labels, tok, family("gpt").frame, strict, "train")
    lenient = ClassificationDataConfig(
        train="", val="", max_len=6, on_unknown_label="skip", on_empty="skip"
    )
    data, counts = encode(
        [("abcdefghij", "a"), ("", "b"), ("abc", "zzz"), ("ab", "b")],
        labels,
        tok,
        family("gpt").frame,
        lenient,
        "val",
    )
    assert counts == Counter({"truncated": 1, "empty": 1, "unknown label": 1})
    assert len(data) == 2 and data.labels == [0, 1]
    eot = tok.token_to_id("<|endoftext|>")
    assert data.ids[0] == tok.encode("abcde").ids + [eot]  # tail truncation keeps the start
    head = ClassificationDataConfig(train="", val="", max_len=6, truncation="head")
    kept, _ = encode([("abcdefghij", "a")], labels, tok, family("gpt").frame, head, "train")
    assert kept.ids[0] == tok.encode("fghij").ids + [eot]


def test_a_classifier_needs_a_pretrained_model(tmp_path):
    from lmforge.cli.train import train

    from .conftest import compose_train

    cfg = compose_train(["experiment=finetune_sms_spam_gpt", "init_from=null"], tmp_path)
    with pytest.raises(LMForgeError, match="task=classification fine-tunes a pretrained model"):
        train(cfg)


def test_train_last_blocks_freezes_the_rest():
    from lmforge.tasks.classification import ClassificationTask
    from lmforge.tasks.config import ClassificationConfig

    model = {"vocab_size": 50, "block_size": 16, "n_layer": 3, "n_head": 2, "n_embd": 16}
    task = ClassificationTask(model, "gpt", ["a", "b"], ClassificationConfig(train_last_blocks=1))
    trainable = {
        n.split(".")[0] + "." + n.split(".")[1]
        for n, p in task.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"model.blocks", "model.ln_f", "head.weight", "head.bias"}
    assert all(
        p.requires_grad == n.startswith("model.blocks.2.")
        for n, p in task.named_parameters()
        if n.startswith("model.blocks.")
    )


def test_class_balance_by_weights_and_by_sampling(tmp_path):
    from lmforge.data.datamodule import ClassificationDataModule

    tok = train_tokenizer(
        [(SMS / "train.tsv").read_text(encoding="utf-8")], TokenizerConfig(kind="char")
    )
    split = small_split(tmp_path, n_train=600)
    cfg = ClassificationDataConfig(
        train=str(split["train"]), val=str(split["val"]), balance="sampling", batch_size=50
    )
    dm = ClassificationDataModule(cfg, tok, family("gpt").frame, seed=3)
    dm.setup()
    labels = torch.tensor(dm.sets["train"].labels)
    weights = dm.class_weights()
    assert weights[labels].sum().item() == pytest.approx(len(labels))  # mean weight 1
    assert weights[1] > 5 * weights[0]  # spam is the rare class
    drawn = torch.cat([b["labels"] for b in dm.train_dataloader()])
    assert labels.float().mean() < 0.2 and 0.4 < drawn.float().mean() < 0.6  # balanced batches


def test_an_epoch_run_validates_its_last_step_once(pretrained, tmp_path):
    """An epoch of 10 batches validated every 4 also validates after its last (10th) step, so
    the final weights have validation metrics, and only once."""
    import csv

    cfg, metrics = finetune(
        pretrained, tmp_path, "trainer.val_check_interval=4", "callbacks.progress_bar=null"
    )
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        val_steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("val/acc")]
    assert ckpt["global_step"] == 10
    assert val_steps == [3, 7, 9]  # the steps' indices: after steps 4, 8 and 10
