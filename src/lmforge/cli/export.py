"""lmforge-export: write a checkpoint of ours as a Hugging Face transformers directory.

    lmforge-export logs/causal_lm/<run>/checkpoints/last.ckpt exports/my-gpt
    python -c "import transformers; transformers.GPT2LMHeadModel.from_pretrained('exports/my-gpt')"

GPT checkpoints become ``GPT2LMHeadModel`` directories, BERT (masked-LM) checkpoints
``BertForMaskedLM`` ones, with the pooler that ``BertModel`` loads; reward models (task=reward)
``GPT2ForSequenceClassification`` / ``BertForSequenceClassification`` with ``num_labels=1``: ``config.json``,
``model.safetensors``, ``tokenizer.json`` and ``tokenizer_config.json``
(``PreTrainedTokenizerFast.from_pretrained`` reads them). Options
that the transformers class cannot express (rotary positions, a pre-LayerNorm BERT) are
refused. The directory is built aside and renamed into place.
"""

from __future__ import annotations

import argparse
import sys

from lmforge.cli import reports_errors


def export(checkpoint: str, out: str) -> str:
    """Write ``checkpoint`` as a transformers directory of its family (recorded in it)."""
    from lmforge.checkpoint import is_reward_model, load_model, load_reward_model
    from lmforge.data.chat import add_to_tokenizer_config

    if is_reward_model(checkpoint):  # a *ForSequenceClassification with one label
        return str(load_reward_model(checkpoint).export_hf(out))
    loaded = load_model(checkpoint)
    written = loaded.family.export_hf(loaded.model, out, loaded.tokenizer)
    if loaded.tokenizer is not None:  # the chat template an instruction tune rendered with
        add_to_tokenizer_config(written, loaded.tokenizer_settings)
    return str(written)


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
