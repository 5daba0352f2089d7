"""Plain PyTorch models: no Lightning, no Hydra. Copy a file into a notebook and it runs."""

from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "Bert", "BertConfig"]
