"""Tokenizers, corpus preparation into token shards, datasets and datamodules."""
