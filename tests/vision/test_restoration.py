"""MATLAB bicubic, degradations, paired / GT-only datasets, the embedded images and tiled inference."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from ssmkit.errors import DataError
from ssmkit.vision.restoration import (JPEG, BicubicDown, Compose, DegradedDataset, GaussianBlur, GaussianNoise,
                                       MotionBlur, PairedFolderDataset, embedded_images, imresize, load_gt_folder,
                                       parse_degradation, resize_weights, scale_of, tiled_forward)

# MATLAB's bicubic taps (Keys, a = -0.5): x2 shrinking with antialiasing (kernel stretched to 8 taps,
# h(x) = cubic(x / 2) / 2) and x2 enlarging
DOWN2 = [-0.01171875, -0.03515625, 0.11328125, 0.43359375, 0.43359375, 0.11328125, -0.03515625, -0.01171875]
UP2 = [-0.0234375, 0.2265625, 0.8671875, -0.0703125]


def test_bicubic_taps_are_matlabs():
    w = resize_weights(32, 16, 0.5)
    assert w[8, 13:21].tolist() == DOWN2  # output 9 (1-based) is centred at input 17.5: taps 14..21
    assert w.sum(1).allclose(torch.ones(16, dtype=torch.float64))
    up = resize_weights(16, 32, 2.0)
    assert up[10, 3:7].tolist() == UP2  # output 11 is centred at input 5.75: taps at inputs 4..7
    no_aa = resize_weights(32, 16, 0.5, antialias=False)
    assert (no_aa[8] != 0).sum() == 4  # without antialiasing: the plain 4-tap kernel


def test_imresize_known_values_with_symmetric_edges():
    # hand-computed from MATLAB's rule: u = x/s + (1 - 1/s)/2, symmetric padding 1..n, n..1
    ramp = torch.arange(1.0, 9.0, dtype=torch.float64).view(1, 8)
    assert imresize(ramp, size=(1, 4)).flatten().tolist() == [1.44921875, 3.48828125, 5.51171875, 7.55078125]
    up = imresize(torch.arange(1.0, 5.0, dtype=torch.float64).view(1, 4), size=(1, 8)).flatten()
    assert up[2].item() == pytest.approx(1.7265625)  # 1.75 minus the mirrored tap: -0.0234375 * (1 - 0)
    assert up[3].item() == pytest.approx(2.25)  # interior: cubic convolution is exact on a line


def test_imresize_sizes_constant_and_dtype():
    x = torch.full((2, 3, 5, 7), 0.3)
    y = imresize(x, 0.5)
    assert y.shape == (2, 3, 3, 4) and y.dtype == torch.float32  # ceil(scale * size), like MATLAB
    assert torch.allclose(y, torch.full_like(y, 0.3))
    with pytest.raises(ValueError, match="exactly one of scale and size"):
        imresize(x)
    with pytest.raises(ValueError, match="float image"):
        imresize(torch.zeros(4, 4, dtype=torch.uint8), 0.5)


def test_degradations_and_parser():
    rng = np.random.default_rng(0)
    gt = torch.rand(3, 32, 32)
    assert BicubicDown(2)(gt, rng).shape == (3, 16, 16)
    noisy = GaussianNoise(25)(gt, np.random.default_rng(1))
    assert (noisy - gt).std().item() == pytest.approx(25 / 255, rel=0.05)
    assert torch.equal(noisy, GaussianNoise(25)(gt, np.random.default_rng(1)))  # deterministic per seed
    flat = torch.full((3, 24, 24), 0.4)
    assert torch.allclose(GaussianBlur(2.0)(flat, rng), flat, atol=1e-6)
    assert torch.allclose(MotionBlur(7)(flat, rng), flat, atol=1e-6)
    blurred = GaussianBlur(2.0)(gt, rng)
    assert blurred.std() < gt.std() * 0.5
    jpeg = JPEG(20)(gt, rng)
    assert jpeg.shape == gt.shape and 0 <= jpeg.min() and jpeg.max() <= 1 and not torch.equal(jpeg, gt)
    chain = parse_degradation("blur1.5+bicubic2+noise15")
    assert isinstance(chain, Compose) and scale_of(chain) == 2 and chain(gt, rng).shape == (3, 16, 16)
    assert parse_degradation("jpeg30") == JPEG(30) and scale_of(parse_degradation("noise50")) == 1
    with pytest.raises(ValueError, match="unknown degradation 'sharpen3'"):
        parse_degradation("noise15+sharpen3")


def _write(path, array):
    Image.fromarray(array).save(path)


def _blocky(rng, h, w, scale, gray=False):
    """An 8-bit LQ image and its GT made of scale x scale constant blocks (so patches can be checked)."""
    shape = (h, w) if gray else (h, w, 3)
    lq = rng.integers(0, 256, shape, dtype=np.uint8)
    gt = lq.repeat(scale, 0).repeat(scale, 1)
    return lq, gt


@pytest.fixture
def paired(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "gt").mkdir()
    (tmp_path / "lq").mkdir()
    for name, (h, w) in {"0001": (12, 10), "0002": (9, 13)}.items():
        lq, gt = _blocky(rng, h, w, 2)
        _write(tmp_path / "gt" / f"{name}.png", gt)
        _write(tmp_path / "lq" / f"{name}x2.png", lq)
    return tmp_path


def test_paired_folders_give_aligned_augmented_patches(paired):
    train = PairedFolderDataset(paired / "gt", paired / "lq", 2, gt_patch=8, train=True, filename_tmpl="{}x2",
                                samples=12, seed=3)
    assert len(train) == 12
    for i in range(len(train)):
        item = train[i]
        assert item["lq"].shape == (3, 4, 4) and item["gt"].shape == (3, 8, 8)
        assert torch.equal(item["gt"], item["lq"].repeat_interleave(2, -1).repeat_interleave(2, -2))
    assert torch.equal(train[5]["lq"], train[5]["lq"])
    before = train[5]["lq"]
    train.set_epoch(1)
    assert not torch.equal(before, train[5]["lq"])
    test = PairedFolderDataset(paired / "gt", paired / "lq", 2, filename_tmpl="{}x2")
    assert [test[i]["gt"].shape[-2:] for i in range(2)] == [(24, 20), (18, 26)]


def test_paired_folder_errors_name_the_files(paired, tmp_path):
    with pytest.raises(DataError, match=r"no LQ image for .*0001.png.*0001x3"):
        PairedFolderDataset(paired / "gt", paired / "lq", 3, filename_tmpl="{}x3")
    with pytest.raises(DataError, match=r"0001x2.png is 12x10 and .*0001.png is 24x20: not a x3 pair"):
        PairedFolderDataset(paired / "gt", paired / "lq", 3, filename_tmpl="{}x2")
    with pytest.raises(DataError, match=r"0002x2.png \(9x13\) is smaller than the LQ patch 10"):
        PairedFolderDataset(paired / "gt", paired / "lq", 2, gt_patch=20, train=True, filename_tmpl="{}x2")
    rng = np.random.default_rng(1)
    lq, gt = _blocky(rng, 12, 12, 2, gray=True)
    _write(paired / "gt" / "0003.png", gt)
    _write(paired / "lq" / "0003x2.png", lq)
    with pytest.raises(DataError, match=r"mixes RGB .*0001.png.* and grayscale .*0003.png"):
        PairedFolderDataset(paired / "gt", paired / "lq", 2, filename_tmpl="{}x2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_gt_folder(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        load_gt_folder(tmp_path / "missing")


def test_degraded_dataset_makes_lq_on_the_fly():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 21, 30, generator=g), torch.rand(3, 16, 16, generator=g)]
    evals = DegradedDataset(images, ["a", "b"], BicubicDown(2))
    item = evals[0]
    assert item["gt"].shape == (3, 20, 30) and torch.allclose(item["lq"], imresize(item["gt"], 0.5))
    train = DegradedDataset(images, ["a", "b"], parse_degradation("bicubic2+noise25"), gt_patch=8, train=True,
                            samples=6, seed=1)
    a, b = train[3], train[3]
    assert a["lq"].shape == (3, 4, 4) and torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"])
    with pytest.raises(DataError, match=r"image b \(16x16\) is smaller than the patch 18"):
        DegradedDataset(images, ["a", "b"], BicubicDown(2), gt_patch=18, train=True)
    with pytest.raises(DataError, match="multiple of the scale"):
        DegradedDataset(images, ["a", "b"], BicubicDown(3), gt_patch=8, train=True)


def test_embedded_images_are_bundled_and_split():
    train, held = embedded_images()
    assert list(held) == ["chelsea", "coffee", "camera"] and len(train) >= 12
    assert not set(train) & set(held)
    for img in [*train.values(), *held.values()]:
        assert img.dtype == torch.float32 and img.shape[0] == 3 and 0 <= img.min() and img.max() <= 1


class LocalUpsampler(nn.Module):
    """A purely local x2 model (receptive radius 2 LQ pixels): tiling with margin >= 2 must be exact."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 12, 3, padding=1),
                                  nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("size", [(23, 37), (31, 18)])
def test_tiled_inference_equals_whole_image(size):
    model = LocalUpsampler().eval()
    lq = torch.rand(2, 3, *size)
    with torch.no_grad():
        whole = model(lq)
    tiled = tiled_forward(model, lq, 2, tile=12, overlap=8)  # margin 2 = the receptive radius
    assert tiled.shape == whole.shape and torch.allclose(tiled, whole, atol=1e-5)
    assert torch.equal(tiled_forward(model, lq, 2, tile=64), whole)  # the tile covers the image
    spoiled = tiled_forward(model, lq, 2, tile=12, overlap=2)  # margin 0: tile borders leak in
    assert not torch.allclose(spoiled, whole, atol=1e-3)
    with pytest.raises(ValueError, match="overlap"):
        tiled_forward(model, lq, 2, tile=8, overlap=8)
