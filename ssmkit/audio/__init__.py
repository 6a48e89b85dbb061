"""Waveform models (SaShiMi), WAV/mu-law data and fast recurrent generation.

Importing the package registers `sashimi_sc09` and `sashimi_small` with `ssmkit.create_model`.
"""
from ssmkit.audio.checkpoints import load_official_sashimi
from ssmkit.audio.sashimi import SashimiConfig, SashimiLM, sashimi_sc09, sashimi_small

__all__ = ["SashimiConfig", "SashimiLM", "sashimi_sc09", "sashimi_small", "load_official_sashimi"]
