"""lmforge: pretrain and fine-tune GPT- and BERT-style language models."""

__version__ = "0.1.0"
