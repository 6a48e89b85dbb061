"""Likelihood metrics of waveform models in bits per sample, and the unigram baseline."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssmkit.audio.data import IGNORE

__all__ = ["BITS_PER_NAT", "sequence_bits", "unigram_log2"]

BITS_PER_NAT = 1 / math.log(2)


def sequence_bits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL in bits, counted samples) per sequence of (batch, L, 256) logits; pads (IGNORE) excluded."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return nll.sum(1) * BITS_PER_NAT, (targets != IGNORE).sum(1)


def unigram_log2(clips: list[torch.Tensor]) -> torch.Tensor:
    """log2 of the add-one-smoothed frequency of each of the 256 codes over `clips`: the code distribution
    of a model that knows nothing about time."""
    counts = torch.ones(256, dtype=torch.float64)
    for clip in clips:
        counts += torch.bincount(clip.long(), minlength=256).double()
    return torch.log2(counts / counts.sum())
