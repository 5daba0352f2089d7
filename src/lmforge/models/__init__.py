"""Plain PyTorch models: no Lightning, no Hydra. Copy a file into a notebook and it runs."""

from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.registry import FAMILIES, Family, family, family_for_hf, family_of

__all__ = [
    "GPT",
    "GPTConfig",
    "Bert",
    "BertConfig",
    "FAMILIES",
    "Family",
    "family",
    "family_for_hf",
    "family_of",
]
