"""Reading checkpoints: the family recorded in each, and checkpoints of the previous format.

``assets/previous_format/{gpt,bert}.ckpt`` were written by lmforge-train before checkpoints
recorded their family (a gpt-nano of 3 steps on Tiny Shakespeare characters, and a one-block
BERT of 3 masked-LM steps on a 300-token WordPiece); their optimizer states are left out to keep
them small.
"""

import json
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import checkpoint_family, load_model
from lmforge.cli.export import export
from lmforge.errors import LMForgeError
from lmforge.models import GPT, Bert

PREVIOUS = Path(__file__).parent / "assets" / "previous_format"


@pytest.mark.parametrize(("name", "family", "cls"), [("gpt", "gpt", GPT), ("bert", "bert", Bert)])
def test_checkpoints_of_the_previous_format_load_and_export(name, family, cls, tmp_path):
    path = PREVIOUS / f"{name}.ckpt"
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]
    assert "family" not in hparams  # the format before families were recorded
    loaded = load_model(path)
    assert loaded.family.name == family and isinstance(loaded.model, cls) and loaded.ours
    assert loaded.tokenizer is not None
    ids = torch.tensor([loaded.tokenizer.encode("ROMEO: what").ids])
    assert loaded.model(ids).shape[-1] == loaded.model.config.vocab_size
    out = Path(export(str(path), str(tmp_path / "hf")))
    assert json.loads((out / "config.json").read_text())["model_type"] == (
        "gpt2" if family == "gpt" else "bert"
    )
    assert load_model(out).family.name == family  # and read back from the export


def test_new_checkpoints_record_their_family(train_cfg):
    from lmforge.cli.train import train

    cfg = train_cfg("trainer.max_steps=2", "logger=csv", "callbacks.text_samples=null")
    train(cfg)
    ckpts = list(Path(cfg.paths.output_dir).rglob("*.ckpt"))
    hparams = torch.load(ckpts[0], weights_only=True)["hyper_parameters"]
    assert hparams["family"] == "gpt" and checkpoint_family(hparams) == "gpt"
    assert hparams["task"]["name"] == "causal_lm" and "optim" in hparams["task"]


def test_a_masked_lm_is_refused_where_a_causal_lm_is_needed():
    with pytest.raises(LMForgeError, match="holds a BERT: lmforge-generate needs a causal LM"):
        load_model(PREVIOUS / "bert.ckpt", causal=True, what="lmforge-generate")
