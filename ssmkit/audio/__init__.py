"""Waveform models (SaShiMi), WAV/mu-law data and fast recurrent generation.

Importing the package registers `sashimi_sc09` and `sashimi_small` with `ssmkit.create_model`, and the
official state-spaces checkpoints with `ssmkit.load_official`.
"""
from ssmkit.audio import checkpoints  # noqa: F401  (registers the official checkpoints)
from ssmkit.audio.sashimi import SashimiConfig, SashimiLM, sashimi_sc09, sashimi_small

__all__ = ["SashimiConfig", "SashimiLM", "sashimi_sc09", "sashimi_small"]
