"""PSNR / SSIM with BasicSR's semantics, checked against hand-computed values and BasicSR's own recipe."""
import math

import cv2
import numpy as np
import pytest
import torch

from ssmkit.vision.metrics import metric_name, psnr, rgb_to_y, ssim, to_uint8_range


def const(values, h=16, w=16):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).expand(-1, h, w).clone()


def test_rounding_to_8_bit_clamps_and_rounds():
    x = torch.tensor([-0.2, 0.3 / 255, 0.7 / 255, 100.4 / 255, 1.5])
    assert to_uint8_range(x).tolist() == [0.0, 0.0, 1.0, 100.0, 255.0]
    # the model output is rounded before comparing: values that round to the same byte give inf
    assert psnr(const([0.5]), const([0.5 + 0.1 / 255])).item() == math.inf


def test_psnr_hand_computed():
    a, b = const([100 / 255] * 3), const([110 / 255] * 3)
    assert psnr(a, b).item() == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)
    # batched: one value per image
    batch = psnr(torch.stack([a, a]), torch.stack([b, a]))
    assert batch.shape == (2,) and batch[1].item() == math.inf


def test_y_channel_constants():
    y = rgb_to_y(torch.tensor([255.0, 0, 0]).view(3, 1, 1))
    assert y.item() == pytest.approx(16 + 65.481)
    white, black = rgb_to_y(torch.full((3, 1, 1), 255.0)), rgb_to_y(torch.zeros(3, 1, 1))
    assert white.item() == pytest.approx(235.0) and black.item() == pytest.approx(16.0)
    red, blk = const([1.0, 0, 0]), const([0.0, 0, 0])
    assert psnr(red, blk, y_channel=True).item() == pytest.approx(20 * math.log10(255 / 65.481))
    # RGB: mse = 255^2 / 3
    assert psnr(red, blk).item() == pytest.approx(20 * math.log10(255 / math.sqrt(255 ** 2 / 3)))


def test_crop_border_drops_the_edges():
    a = torch.rand(3, 20, 24)
    b = a.clone()
    b[:, 0, :] = 1 - b[:, 0, :]
    b[:, :, -2:] = 0
    assert psnr(a, b, crop_border=1).item() < 100
    assert psnr(a, b, crop_border=2).item() == math.inf
    with pytest.raises(ValueError, match="crop_border 10 leaves nothing"):
        psnr(a, b, crop_border=10)
    with pytest.raises(ValueError, match="one shape"):
        psnr(a, b[:, :10])


def test_ssim_of_constant_images_hand_computed():
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 110 + c1) / (100 ** 2 + 110 ** 2 + c1)
    assert ssim(const([100 / 255]), const([110 / 255])).item() == pytest.approx(expected, rel=1e-12)
    x = torch.rand(3, 24, 24)
    assert ssim(x, x).item() == pytest.approx(1.0)


def _basicsr_ssim(img, img2):
    """BasicSR's `_ssim` per channel (cv2.filter2D with an 11x11 Gaussian, valid region) on 0-255 arrays."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())
    mu1 = cv2.filter2D(img, -1, window)[5:-5, 5:-5]
    mu2 = cv2.filter2D(img2, -1, window)[5:-5, 5:-5]
    s1 = cv2.filter2D(img ** 2, -1, window)[5:-5, 5:-5] - mu1 ** 2
    s2 = cv2.filter2D(img2 ** 2, -1, window)[5:-5, 5:-5] - mu2 ** 2
    s12 = cv2.filter2D(img * img2, -1, window)[5:-5, 5:-5] - mu1 * mu2
    return (((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))).mean()


@pytest.mark.parametrize("y_channel", [False, True])
def test_ssim_and_psnr_match_basicsr_recipe(y_channel):
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 30, 27, generator=g)
    out = (gt + 0.1 * torch.randn(3, 30, 27, generator=g)).clamp(0, 1)
    a = (out.clamp(0, 1) * 255).round().double().permute(1, 2, 0).numpy()[2:-2, 2:-2]
    b = (gt.clamp(0, 1) * 255).round().double().permute(1, 2, 0).numpy()[2:-2, 2:-2]
    if y_channel:  # BasicSR's to_y_channel on the BGR image: 16 + 24.966 B + 128.553 G + 65.481 R
        a = (a[..., ::-1] / 255 @ np.array([24.966, 128.553, 65.481]) + 16)[..., None]
        b = (b[..., ::-1] / 255 @ np.array([24.966, 128.553, 65.481]) + 16)[..., None]
    expected_ssim = np.mean([_basicsr_ssim(np.ascontiguousarray(a[..., i]), np.ascontiguousarray(b[..., i]))
                             for i in range(a.shape[2])])
    expected_psnr = 20 * np.log10(255.0 / np.sqrt(np.mean((a - b) ** 2)))
    assert ssim(out, gt, crop_border=2, y_channel=y_channel).item() == pytest.approx(expected_ssim, rel=1e-9)
    assert psnr(out, gt, crop_border=2, y_channel=y_channel).item() == pytest.approx(expected_psnr, rel=1e-12)


def test_metric_names_say_which_variant():
    assert metric_name("psnr", 2, True) == "PSNR (Y, crop 2)"
    assert metric_name("ssim", 0, False) == "SSIM (RGB, crop 0)"
