"""LightningModules, one per training objective."""
