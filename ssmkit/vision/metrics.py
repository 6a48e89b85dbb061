"""PSNR and SSIM with BasicSR's semantics (`basicsr/metrics/psnr_ssim.py`), the numbers SR papers report.

Both take float images in [0, 1], (C, H, W) or (batch, C, H, W), RGB channel order, and:
1. round them to 8 bits (clamp to [0, 1], x255, round half to even: BasicSR's `tensor2img`);
2. crop `crop_border` pixels from every edge (SR papers crop the scale factor);
3. on `y_channel=True` compare only the Y of YCbCr (BT.601, MATLAB's `rgb2ycbcr`) on the 0-255 scale,
   Y = 16 + 65.481 R + 128.553 G + 24.966 B with R, G, B in [0, 1], unrounded; else all channels;
4. PSNR = 20 log10(255 / sqrt(MSE)) in float64 (inf for identical images); SSIM with an 11x11
   Gaussian window (sigma 1.5) over the valid region, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2,
   averaged over pixels and channels.
Batched inputs give one value per image. Reports must say which variant they show (`metric_name`).
"""
from __future__ import annotations

import math

import torch

from ssmkit.vision.convs5 import frame_ssim

__all__ = ["Y_WEIGHTS", "Y_OFFSET", "to_uint8_range", "rgb_to_y", "psnr", "ssim", "metric_name"]

Y_WEIGHTS = (65.481, 128.553, 24.966)  # R, G, B in [0, 1] -> Y on 0-255
Y_OFFSET = 16.0


def to_uint8_range(img: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> float64 values 0..255 rounded as an 8-bit image would store them."""
    return (img.detach().double().clamp(0, 1) * 255.0).round()


def rgb_to_y(img255: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB on 0-255 -> (..., 1, H, W) Y on 0-255 (BT.601, unrounded)."""
    if img255.shape[-3] != 3:
        raise ValueError(f"the Y channel needs RGB images (3 channels), got {img255.shape[-3]} channels")
    w = img255.new_tensor(Y_WEIGHTS).view(3, 1, 1) / 255.0
    return (img255 * w).sum(-3, keepdim=True) + Y_OFFSET


def _prepare(img: torch.Tensor, ref: torch.Tensor, crop_border: int,
             y_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if img.shape != ref.shape or img.dim() not in (3, 4):
        raise ValueError(f"PSNR/SSIM need two images of one shape (C, H, W) or (batch, C, H, W), got "
                         f"{tuple(img.shape)} and {tuple(ref.shape)}")
    h, w = img.shape[-2:]
    if crop_border < 0 or 2 * crop_border >= min(h, w):
        raise ValueError(f"crop_border {crop_border} leaves nothing of a {h}x{w} image")
    a, b = to_uint8_range(img), to_uint8_range(ref)
    if crop_border:
        a = a[..., crop_border:-crop_border, crop_border:-crop_border]
        b = b[..., crop_border:-crop_border, crop_border:-crop_border]
    if y_channel and a.shape[-3] == 3:
        a, b = rgb_to_y(a), rgb_to_y(b)
    return a, b


def psnr(img: torch.Tensor, ref: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """PSNR in dB of `img` against `ref` (float64; one value per image for batched inputs)."""
    a, b = _prepare(img, ref, crop_border, y_channel)
    mse = (a - b).pow(2).mean((-3, -2, -1))
    return torch.where(mse == 0, torch.full_like(mse, math.inf), 20 * torch.log10(255.0 / mse.sqrt()))


def ssim(img: torch.Tensor, ref: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """SSIM of `img` against `ref` (float64; one value per image for batched inputs)."""
    a, b = _prepare(img, ref, crop_border, y_channel)
    return frame_ssim(a, b, window=11, sigma=1.5, data_range=255.0)


def metric_name(metric: str, crop_border: int, y_channel: bool) -> str:
    """How a report names the variant, e.g. 'PSNR (Y, crop 2)' or 'SSIM (RGB, crop 0)'."""
    return f"{metric.upper()} ({'Y' if y_channel else 'RGB'}, crop {crop_border})"
