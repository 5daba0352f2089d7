"""Hugging Face interop: import checkpoints saved by ``transformers`` and export ours to them."""
