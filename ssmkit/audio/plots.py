"""Figures of waveform clips: each waveform above its log mel spectrogram (PNG)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["save_waveform_figure"]


def save_waveform_figure(path: Path, waves: list[torch.Tensor], sample_rate: int, titles: list[str]) -> Path:
    """PNG with one column per clip: the waveform above its log mel spectrogram (torchaudio)."""
    import torchaudio.transforms as T
    from matplotlib.figure import Figure

    mel = T.MelSpectrogram(sample_rate, n_fft=512, hop_length=128, n_mels=64)
    fig = Figure(figsize=(3.2 * len(waves), 4.2), dpi=100, layout="constrained")
    axes = fig.subplots(2, len(waves), squeeze=False)
    for j, (wave, title) in enumerate(zip(waves, titles)):
        seconds = torch.arange(len(wave)) / sample_rate
        axes[0, j].plot(seconds.numpy(), wave.numpy(), linewidth=0.4)
        axes[0, j].set_ylim(-1, 1)
        axes[0, j].set_title(title, fontsize=8)
        spectrum = torch.log10(mel(F.pad(wave, (0, max(0, 513 - len(wave))))) + 1e-6)  # >= one n_fft frame
        axes[1, j].imshow(spectrum.numpy(), origin="lower", aspect="auto",
                          extent=(0, len(wave) / sample_rate, 0, spectrum.shape[0]))
        axes[1, j].set_xlabel("seconds")
    axes[0, 0].set_ylabel("amplitude")
    axes[1, 0].set_ylabel("mel bin")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
