"""Converters: Hugging Face checkpoints to .dgf."""
