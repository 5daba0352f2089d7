"""lmforge-export: write a checkpoint of ours as a Hugging Face transformers directory.

    lmforge-export logs/causal_lm/<run>/checkpoints/last.ckpt exports/my-gpt
    python -c "import transformers; transformers.GPT2LMHeadModel.from_pretrained('exports/my-gpt')"

GPT checkpoints become ``GPT2LMHeadModel`` directories, BERT (masked-LM) checkpoints
``BertForMaskedLM`` ones, with the pooler that ``BertModel`` loads: ``config.json``,
``model.safetensors``, ``tokenizer.json`` and ``tokenizer_config.json``
(``PreTrainedTokenizerFast.from_pretrained`` reads them). Options
that the transformers class cannot express (rotary positions, a pre-LayerNorm BERT) are
refused. The directory is built aside and renamed into place.
"""

from __future__ import annotations

import argparse
import sys

from lmforge.cli import reports_errors
from lmforge.errors import LMForgeError


def export(checkpoint: str, out: str) -> str:
    from lmforge.checkpoint import load_checkpoint, load_gpt

    ckpt = load_checkpoint(checkpoint)
    hparams = ckpt.get("hyper_parameters", {})
    if "model" not in hparams:
        raise LMForgeError(f"{checkpoint} is not a checkpoint of lmforge-train (no model config)")
    if "masking" in hparams:  # masked-LM pretraining: a BERT
        from lmforge.checkpoint import load_bert
        from lmforge.interop.hf_bert import export_hf_bert

        model, tokenizer = load_bert(checkpoint)
        return str(export_hf_bert(model, out, tokenizer))
    from lmforge.interop.hf_gpt2 import export_hf_gpt2

    model, tokenizer = load_gpt(checkpoint)
    return str(export_hf_gpt2(model, out, tokenizer))


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmforge-export", description=__doc__.split("\n")[0])
    parser.add_argument(
        "checkpoint", help="a checkpoint of lmforge-train (file or sharded directory)"
    )
    parser.add_argument("out", help="the directory to write")
    args = parser.parse_args(argv)
    out = export(args.checkpoint, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
