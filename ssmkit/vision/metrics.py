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

`frame_ssim` is the Gaussian-window SSIM of frames of any range (11x11, sigma 1.5; the video metrics use
data range 1), and `rollout_metrics` scores a video rollout by horizon against repeating the last frame.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["Y_WEIGHTS", "Y_OFFSET", "to_uint8_range", "rgb_to_y", "psnr", "ssim", "metric_name", "frame_ssim",
           "rollout_metrics"]

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


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g


def frame_ssim(x, y, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> torch.Tensor:
    """SSIM of each frame pair, (..., C, H, W) -> (...): Gaussian-weighted local statistics ('valid'
    windows; the window shrinks to the frame for frames smaller than `window`), K1 = 0.01, K2 = 0.03,
    mean over pixels and channels; computed in float64, returned in the input's dtype."""
    if x.shape != y.shape or x.dim() < 3:
        raise ValueError(f"frame_ssim needs two tensors of one shape (..., C, H, W); got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    lead, (C, H, W) = x.shape[:-3], x.shape[-3:]
    size = min(window, H, W)
    size -= (size + 1) % 2  # odd
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    dtype = torch.float64  # the variances are differences of nearly equal numbers
    g = _gaussian_window(size, sigma, x.device, dtype)
    kernel = (g[:, None] * g[None, :]).expand(C, 1, size, size)
    x = x.reshape(-1, C, H, W).to(dtype)
    y = y.reshape(-1, C, H, W).to(dtype)

    def blur(t):
        return F.conv2d(t, kernel, groups=C)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean((-3, -2, -1)).reshape(lead).to(out_dtype)


def rollout_metrics(pred: torch.Tensor, true: torch.Tensor, last_context: torch.Tensor) -> dict[str, list[float] | float]:
    """Per-horizon MSE/SSIM of a rollout pred (batch, T, C, H, W) vs true, and of repeating last_context
    (batch, C, H, W) for every future frame."""
    base = last_context[:, None].expand_as(true)
    out = {}
    for name, p in (("", pred), ("baseline_", base)):
        mse = (p - true).pow(2).mean((0, 2, 3, 4))
        ssim_t = frame_ssim(p, true).mean(0)
        out[f"{name}mse_per_frame"] = mse.tolist()
        out[f"{name}ssim_per_frame"] = ssim_t.tolist()
        out[f"{name}rollout_mse"] = mse.mean().item()
        out[f"{name}rollout_ssim"] = ssim_t.mean().item()
    return out
