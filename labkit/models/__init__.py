"""Models that the lessons train: a small GPT (``GPT``, ``GPTConfig``)."""

from labkit.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
