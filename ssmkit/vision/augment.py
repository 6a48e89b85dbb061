"""Batch-level augmentation for image classification."""
from __future__ import annotations

import math

import torch

__all__ = ["mix_batch"]


def mix_batch(x: torch.Tensor, y: torch.Tensor, mixup: float, cutmix: float):
    """Mixup or CutMix of a batch with its reverse (drawn from torch's global RNG, which the runner seeds
    and checkpoints): returns (mixed x, y, y reversed, weight of y). With both alphas set, one of the two
    is chosen per batch with equal probability."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand(()) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    x2, y2 = x.flip(0), y.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
        t, b = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        l, r = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., t:b, l:r] = x2[..., t:b, l:r]
        lam = 1 - (b - t) * (r - l) / (h * w)
    else:
        x = lam * x + (1 - lam) * x2
    return x, y, y2, lam
