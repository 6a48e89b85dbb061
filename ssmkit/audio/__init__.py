"""Waveform models (SaShiMi), WAV/mu-law data and fast recurrent generation."""
