"""Export parity of a trained reward model: export it with lmforge-export, load the directory with
transformers' AutoModelForSequenceClassification, and compare its logits with lmforge's scores on
every sequence of the bundled test pairs (padded batches); prints the largest difference and the
test accuracy transformers' scores give.

    python bench/reward_parity.py logs/reward/<run>/checkpoints/last.ckpt exports/my-rm
"""

import sys

import torch
import transformers

from lmforge.checkpoint import load_reward_model
from lmforge.cli.export import export
from lmforge.data.instructions import Framing
from lmforge.data.preferences import (
    PreferenceDataConfig,
    encode_pairs,
    model_settings,
    pad_pairs,
    read_pairs,
)

ckpt, out = sys.argv[1], sys.argv[2]
rm = load_reward_model(ckpt)
written = export(ckpt, out)
hf = transformers.AutoModelForSequenceClassification.from_pretrained(written).eval()
cfg = PreferenceDataConfig("", "", max_len=rm.backbone.config.block_size)
settings = model_settings(rm.tokenizer_settings, rm.family.frame, rm.tokenizer)
pairs, _ = encode_pairs(
    read_pairs("data/preferences/test.json"), Framing(rm.tokenizer, cfg, settings), cfg, "test"
)
worst, correct = 0.0, 0
for i in range(0, len(pairs), 16):
    b = pad_pairs(pairs[i : i + 16], rm.pad_id)
    r = {}
    for side in ("chosen", "rejected"):
        ids, n = b[f"{side}_input_ids"], b[f"{side}_lengths"]
        mask = (torch.arange(ids.size(1))[None] < n[:, None]).long()
        with torch.no_grad():
            ours = rm(ids, n)
            theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        worst = max(worst, (ours - theirs).abs().max().item())
        r[side] = theirs
    correct += (r["chosen"] > r["rejected"]).sum().item()
print(
    f"{type(hf).__name__}: max |lmforge - transformers| = {worst:.2e} over {2 * len(pairs)} sequences; transformers' test accuracy {correct}/{len(pairs)} = {correct / len(pairs):.4f}"
)
