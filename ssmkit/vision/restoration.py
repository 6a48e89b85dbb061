"""Image-restoration data: MATLAB bicubic resizing, on-the-fly degradations, paired and GT-only
datasets (BasicSR conventions), the embedded photographs and tiled inference.

- `imresize` is MATLAB's `imresize(..., 'bicubic')` (Keys cubic, a = -0.5, antialiasing when shrinking,
  symmetric edge handling, output size ceil(scale * size)): the LQ images of every SR benchmark.
  OpenCV's and PIL's bicubic differ from it and lower benchmark PSNR.
- Degradations are callables `(gt (C, H, W) in [0, 1], numpy Generator) -> lq`: `BicubicDown`,
  `GaussianNoise` (sigma in 0-255 units, unclipped as in MaIR's denoising protocol), `GaussianBlur`,
  `MotionBlur`, `JPEG`, chained with `Compose`; `parse_degradation("blur2+noise15")` builds them from text.
- `PairedFolderDataset`: LQ/GT folders paired by GT name (`filename_tmpl`, e.g. "{}x2"), size, scale
  and channel checks naming the files; `DegradedDataset`: GT images only, LQ made on the fly.
  Training items are random GT patches with the aligned LQ patch, random flips / transposition;
  evaluation items are whole images (GT cropped to a multiple of the scale).
- `embedded_images()`: the CC0 / public-domain photographs bundled in scikit-image and the two in
  scikit-learn, with a fixed held-out set of three.
- `tiled_forward`: run a model on overlapping tiles and blend them, so large images fit in memory.
Items are dicts {"lq": (C, h, w), "gt": (C, H, W), "name": str} of float32 in [0, 1].
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ssmkit.errors import DataError
from ssmkit.util import derive_seed
from ssmkit.vision.data import IMAGE_EXTENSIONS, load_image_file

__all__ = [
    "imresize", "resize_weights", "BicubicDown", "GaussianNoise", "GaussianBlur", "MotionBlur", "JPEG",
    "Compose", "scale_of", "parse_degradation", "list_images", "read_image", "PairedFolderDataset", "DegradedDataset",
    "load_gt_folder", "embedded_images", "EMBEDDED_HELD_OUT", "tiled_forward",
]

Degradation = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# MATLAB bicubic


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's bicubic)."""
    ax = x.abs()
    ax2, ax3 = ax ** 2, ax ** 3
    near = 1.5 * ax3 - 2.5 * ax2 + 1
    far = -0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2
    return torch.where(ax <= 1, near, torch.where(ax <= 2, far, torch.zeros_like(ax)))


def resize_weights(in_len: int, out_len: int, scale: float, antialias: bool = True) -> torch.Tensor:
    """(out_len, in_len) float64 matrix of MATLAB's bicubic resize along one axis (rows sum to 1)."""
    shrink = antialias and scale < 1
    width = 4.0 / scale if shrink else 4.0
    x = torch.arange(1, out_len + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # output pixel centre in input coordinates (1-based)
    left = torch.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None]
    dist = u[:, None] - idx
    w = scale * _cubic(scale * dist) if shrink else _cubic(dist)
    w = w / w.sum(1, keepdim=True)
    # symmetric padding: index sequence 1..n, n..1 repeated (MATLAB's aux)
    period = 2 * in_len
    m = torch.remainder(idx.long() - 1, period)
    src = torch.where(m < in_len, m, period - 1 - m)
    out = torch.zeros(out_len, in_len, dtype=torch.float64)
    out.scatter_add_(1, src, w)
    return out


def imresize(img: torch.Tensor, scale: float | None = None, size: tuple[int, int] | None = None,
             antialias: bool = True) -> torch.Tensor:
    """MATLAB `imresize(img, scale, 'bicubic')` of (..., H, W) float images (no clipping, no rounding).

    Give `scale` (output size ceil(scale * H), ceil(scale * W)) or `size` = (H', W'); the result is
    computed in float64 and returned in the input's dtype.
    """
    if img.dim() < 2 or not img.is_floating_point():
        raise ValueError(f"imresize needs a float image (..., H, W), got {img.dtype} of shape {tuple(img.shape)}")
    h, w = img.shape[-2:]
    if (scale is None) == (size is None):
        raise ValueError("imresize needs exactly one of scale and size")
    if size is None:
        if scale <= 0:
            raise ValueError(f"imresize scale must be positive, got {scale}")
        sh = sw = float(scale)
        size = (math.ceil(sh * h), math.ceil(sw * w))
    else:
        sh, sw = size[0] / h, size[1] / w
    rows = resize_weights(h, size[0], sh, antialias).to(img.device)
    cols = resize_weights(w, size[1], sw, antialias).to(img.device)
    return (rows @ img.double() @ cols.t()).to(img.dtype)


# ----------------------------------------------------------------------------------------------
# Degradations


@dataclass(frozen=True)
class BicubicDown:
    """MATLAB bicubic downsampling by an integer `scale` (the classic SR degradation)."""

    scale: int

    def __call__(self, gt: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return imresize(gt, 1.0 / self.scale)


@dataclass(frozen=True)
class GaussianNoise:
    """Additive white Gaussian noise, `sigma` in 0-255 units, not clipped (MaIR/BasicSR denoising)."""

    sigma: float

    def __call__(self, gt: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        noise = rng.standard_normal(tuple(gt.shape)).astype(np.float32)
        return gt + torch.from_numpy(noise) * (self.sigma / 255.0)


def _filter(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate every channel of (C, H, W) with a 2-D kernel, reflect-padded (OpenCV's default border)."""
    k = kernel.to(img.dtype)
    ph, pw = k.shape[0] // 2, k.shape[1] // 2
    x = F.pad(img[None], (pw, pw, ph, ph), mode="reflect" if min(img.shape[-2:]) > max(ph, pw) else "replicate")
    return F.conv2d(x, k.expand(img.shape[0], 1, *k.shape), groups=img.shape[0])[0]


@dataclass(frozen=True)
class GaussianBlur:
    """Isotropic Gaussian blur with standard deviation `sigma` (pixels), kernel `size` (odd)."""

    sigma: float
    size: int = 21

    def __call__(self, gt: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        x = torch.arange(self.size, dtype=torch.float64) - self.size // 2
        g = torch.exp(-x ** 2 / (2 * self.sigma ** 2))
        k = g[:, None] * g[None, :]
        return _filter(gt, k / k.sum())


@dataclass(frozen=True)
class MotionBlur:
    """Linear motion blur over `length` pixels at a random angle (drawn from the generator)."""

    length: int

    def __call__(self, gt: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        size = self.length + 1 - self.length % 2
        angle = rng.uniform(0, math.pi)
        k = torch.zeros(size, size, dtype=torch.float64)
        c = size // 2
        for t in np.linspace(-(self.length - 1) / 2, (self.length - 1) / 2, 4 * self.length):
            k[round(c + t * math.sin(angle)), round(c + t * math.cos(angle))] = 1.0
        return _filter(gt, k / k.sum())


@dataclass(frozen=True)
class JPEG:
    """JPEG compression at `quality` (1-100) through OpenCV, as BasicSR does."""

    quality: int

    def __call__(self, gt: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        import cv2

        img = (gt.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        img = img[..., ::-1] if img.shape[2] == 3 else img  # OpenCV works in BGR
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img), [int(cv2.IMWRITE_JPEG_QUALITY), int(self.quality)])
        out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        out = out[..., None] if out.ndim == 2 else out[..., ::-1]
        return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).float() / 255.0


@dataclass(frozen=True)
class Compose:
    """Apply degradations left to right."""

    steps: tuple

    def __call__(self, gt: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        for step in self.steps:
            gt = step(gt, rng)
        return gt


def scale_of(degradation: Degradation) -> int:
    """The downsampling factor of a degradation (1 when it keeps the size)."""
    if isinstance(degradation, BicubicDown):
        return degradation.scale
    if isinstance(degradation, Compose):
        return math.prod(scale_of(s) for s in degradation.steps)
    return 1


_PARSERS = {"bicubic": lambda v: BicubicDown(int(v)), "noise": lambda v: GaussianNoise(float(v)),
            "blur": lambda v: GaussianBlur(float(v)), "motion": lambda v: MotionBlur(int(v)),
            "jpeg": lambda v: JPEG(int(v))}


def parse_degradation(spec: str) -> Degradation:
    """"bicubic2", "noise25", "blur1.6", "motion9", "jpeg30", or steps joined by '+' ("blur2+bicubic2")."""
    steps = []
    for part in spec.split("+"):
        part = part.strip().lower()
        name = part.rstrip("0123456789.")
        value = part[len(name):]
        if name not in _PARSERS or not value:
            raise ValueError(f"unknown degradation {part!r} in {spec!r}; use bicubic<scale>, noise<sigma>, "
                             "blur<sigma>, motion<length> or jpeg<quality>, joined by '+'")
        step = _PARSERS[name](value)
        if (name in ("bicubic", "motion", "jpeg") and int(value) < 1) or float(value) <= 0:
            raise ValueError(f"degradation {part!r} needs a positive value")
        steps.append(step)
    return steps[0] if len(steps) == 1 else Compose(tuple(steps))


# ----------------------------------------------------------------------------------------------
# Image files


def list_images(folder: str | Path) -> list[Path]:
    """The image files of a folder, sorted; DataError when it is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _channels(path: Path) -> int:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return 1 if im.mode in ("1", "L", "I", "I;16", "F", "LA") else 3
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def read_image(path: str | Path, channels: int | None = None) -> torch.Tensor:
    """An image file as (C, H, W) float in [0, 1]; C = the file's own (1 gray, 3 colour) unless given."""
    path = Path(path)
    return load_image_file(path, channels or _channels(path))


def _check_channels(files: Sequence[Path], images: Sequence[torch.Tensor], what: str) -> None:
    first = images[0].shape[0]
    for f, img in zip(files, images):
        if img.shape[0] != first:
            kinds = {1: "grayscale", 3: "RGB"}
            raise DataError(f"{what} mixes {kinds[first]} ({files[0]}) and {kinds[img.shape[0]]} ({f}) images; "
                            "convert them to one kind")


# ----------------------------------------------------------------------------------------------
# Datasets


def _augment(*images: torch.Tensor, rng: np.random.Generator) -> list[torch.Tensor]:
    """BasicSR's `augment` of aligned (C, H, W) images: horizontal flip, vertical flip and
    transposition, each with p = 0.5 (the same draw for all of them)."""
    hflip, vflip, transpose = rng.random(3) < 0.5
    out = []
    for x in images:
        x = x.flip(-1) if hflip else x
        x = x.flip(-2) if vflip else x
        out.append((x.transpose(-1, -2) if transpose else x).contiguous())
    return out


class _PatchSampler:
    """Shared training / evaluation item logic of the two restoration datasets."""

    scale: int
    gt_patch: int
    train: bool
    seed: int
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(derive_seed(self.seed, self.epoch if self.train else 0, index, int(self.train)))


class PairedFolderDataset(_PatchSampler, Dataset):
    """BasicSR's paired layout: `gt_dir/<name>.<ext>` with `lq_dir/<tmpl.format(name)>.<any ext>`.

    Training: `samples` random GT patches of `gt_patch` (aligned LQ patch gt_patch / scale) per epoch,
    flipped / transposed; evaluation (`train=False`): whole images, GT cropped to LQ * scale.
    Every pair is checked up front: missing LQ, sizes that do not match the scale, mixed grayscale /
    RGB and images smaller than a patch raise DataError naming the files.
    """

    def __init__(self, gt_dir: str | Path, lq_dir: str | Path, scale: int, gt_patch: int = 0, train: bool = False,
                 filename_tmpl: str = "{}", samples: int = 0, seed: int = 0):
        gt_files = list_images(gt_dir)
        lq_by_stem = {p.stem: p for p in list_images(lq_dir)}
        self.scale, self.gt_patch, self.train, self.seed = scale, gt_patch, train, seed
        if train and (gt_patch < scale or gt_patch % scale):
            raise DataError(f"gt_patch ({gt_patch}) must be a positive multiple of the scale ({scale})")
        self.names, self.lq, self.gt = [], [], []
        for gt_path in gt_files:
            lq_name = filename_tmpl.format(gt_path.stem)
            if lq_name not in lq_by_stem:
                raise DataError(f"no LQ image for {gt_path} in {lq_dir} (expected {lq_name}.<ext> from "
                                f"filename_tmpl {filename_tmpl!r})")
            lq_path = lq_by_stem[lq_name]
            gt, lq = read_image(gt_path), read_image(lq_path)
            if gt.shape[0] != lq.shape[0]:
                raise DataError(f"{lq_path} has {lq.shape[0]} channel(s) but {gt_path} has {gt.shape[0]}")
            (h, w), (H, W) = lq.shape[-2:], gt.shape[-2:]
            if not (h * scale <= H < (h + 1) * scale and w * scale <= W < (w + 1) * scale):
                raise DataError(f"{lq_path} is {h}x{w} and {gt_path} is {H}x{W}: not a x{scale} pair")
            if train and min(h, w) * scale < gt_patch:
                raise DataError(f"{lq_path} ({h}x{w}) is smaller than the LQ patch {gt_patch // scale}")
            self.names.append(gt_path.stem)
            self.lq.append(lq)
            self.gt.append(gt[:, : h * scale, : w * scale])
        _check_channels(gt_files, self.gt, f"GT folder {gt_dir}")
        self.samples = samples or len(self.gt)

    def __len__(self) -> int:
        return self.samples if self.train else len(self.gt)

    def __getitem__(self, index: int) -> dict:
        i = index % len(self.gt)
        lq, gt = self.lq[i], self.gt[i]
        if self.train:
            rng = self._rng(index)
            p = self.gt_patch // self.scale
            top = int(rng.integers(0, lq.shape[-2] - p + 1))
            left = int(rng.integers(0, lq.shape[-1] - p + 1))
            lq = lq[:, top:top + p, left:left + p]
            gt = gt[:, top * self.scale:(top + p) * self.scale, left * self.scale:(left + p) * self.scale]
            lq, gt = _augment(lq, gt, rng=rng)
        return {"lq": lq, "gt": gt, "name": self.names[i]}


class DegradedDataset(_PatchSampler, Dataset):
    """GT images only; the LQ is made on the fly by `degradation` from a seed of (seed, epoch, index).

    Training: `samples` random GT patches of `gt_patch` per epoch (flips / transposition, then the
    degradation of the patch); evaluation: each whole image (cropped to a multiple of the scale,
    or to a centre crop of `eval_crop` when given) with a degradation fixed by its index.
    """

    def __init__(self, images: Sequence[torch.Tensor], names: Sequence[str], degradation: Degradation,
                 gt_patch: int = 0, train: bool = False, samples: int = 0, seed: int = 0, eval_crop: int = 0):
        if not images:
            raise DataError("DegradedDataset needs at least one image")
        self.degradation, self.scale = degradation, scale_of(degradation)
        self.gt_patch, self.train, self.seed, self.names = gt_patch, train, seed, list(names)
        if train and (gt_patch < self.scale or gt_patch % self.scale):
            raise DataError(f"gt_patch ({gt_patch}) must be a positive multiple of the scale ({self.scale})")
        self.images = []
        for name, img in zip(self.names, images):
            h, w = img.shape[-2:]
            if train and min(h, w) < gt_patch:
                raise DataError(f"image {name} ({h}x{w}) is smaller than the patch {gt_patch}")
            if not train and eval_crop:
                top, left = max(0, (h - eval_crop) // 2), max(0, (w - eval_crop) // 2)
                img = img[:, top:top + eval_crop, left:left + eval_crop]
                h, w = img.shape[-2:]
            if min(h, w) < self.scale:
                raise DataError(f"image {name} ({h}x{w}) is smaller than the scale {self.scale}")
            self.images.append(img[:, : h - h % self.scale, : w - w % self.scale])
        self.samples = samples or len(self.images)

    def __len__(self) -> int:
        return self.samples if self.train else len(self.images)

    def __getitem__(self, index: int) -> dict:
        i = index % len(self.images)
        gt, rng = self.images[i], self._rng(index)
        if self.train:
            p = self.gt_patch
            top = int(rng.integers(0, (gt.shape[-2] - p) // self.scale + 1)) * self.scale
            left = int(rng.integers(0, (gt.shape[-1] - p) // self.scale + 1)) * self.scale
            (gt,) = _augment(gt[:, top:top + p, left:left + p], rng=rng)
        return {"lq": self.degradation(gt, rng).float(), "gt": gt.float(), "name": self.names[i]}


def load_gt_folder(folder: str | Path) -> tuple[list[torch.Tensor], list[str]]:
    """The images of a GT-only folder (one kind: all grayscale or all RGB) and their names."""
    files = list_images(folder)
    images = [read_image(f) for f in files]
    _check_channels(files, images, f"GT folder {folder}")
    return images, [f.stem for f in files]


# ----------------------------------------------------------------------------------------------
# Embedded photographs

# scikit-image's bundled (no download) CC0 / public-domain photographs and textures
_SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
            "colorwheel", "camera", "moon", "brick", "grass", "gravel", "coins")
EMBEDDED_HELD_OUT = ("chelsea", "coffee", "camera")


@functools.lru_cache(maxsize=1)
def embedded_images() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(train, held_out) name -> RGB (3, H, W) float images: scikit-image's bundled photographs
    (grayscale ones repeated to three channels) plus scikit-learn's china.jpg and flower.jpg; the
    held-out set is `EMBEDDED_HELD_OUT`. Nothing is downloaded. Cached: treat the tensors as read-only."""
    try:
        import skimage.data
    except ImportError as e:
        raise DataError(f"the embedded restoration images need scikit-image ({e}); pip install scikit-image") from None
    from sklearn.datasets import load_sample_images

    arrays = {name: getattr(skimage.data, name)() for name in _SKIMAGE}
    for fname, img in zip(("china", "flower"), load_sample_images().images):
        arrays[fname] = img
    out = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        a = np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a[..., :3]
        out[name] = torch.from_numpy(np.array(a, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    held = {n: out.pop(n) for n in EMBEDDED_HELD_OUT}
    return out, held


# ----------------------------------------------------------------------------------------------
# Tiled inference


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if tile >= size:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def _ramp(length: int, start: int, size: int, margin: int, overlap: int) -> torch.Tensor:
    """1-D blend weight of a tile: 0 for `margin` pixels at an edge inside the image, rising linearly
    to 1 over the rest of the overlap; edges on the image border keep weight 1."""
    d = torch.arange(length, dtype=torch.float64)
    ramp_len = max(1, overlap - 2 * margin)
    w = torch.ones(length, dtype=torch.float64)
    if start > 0:
        w = torch.minimum(w, ((d - margin + 1) / ramp_len).clamp(0, 1))
    if start + length < size:
        w = torch.minimum(w, ((length - 1 - d - margin + 1) / ramp_len).clamp(0, 1))
    return w


@torch.no_grad()
def tiled_forward(model: Callable[[torch.Tensor], torch.Tensor], lq: torch.Tensor, scale: int, tile: int = 0,
                  overlap: int = 16) -> torch.Tensor:
    """model(lq) computed on overlapping `tile` x `tile` pieces of lq (batch, C, H, W) and blended.

    Tiles overlap by at least `overlap` LQ pixels; inside an overlap a tile's weight is 0 for its
    first overlap // 4 pixels (the ones its zero-padded border spoils) and then ramps up, and the
    blend is normalised. tile = 0 or tile >= the image runs the model once on the whole image.
    """
    if lq.dim() != 4:
        raise ValueError(f"tiled_forward expects (batch, C, H, W), got {tuple(lq.shape)}")
    b, _, h, w = lq.shape
    if tile <= 0 or (tile >= h and tile >= w):
        return model(lq)
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile={tile}), got {overlap}")
    margin = overlap // 4
    out = weight = None
    for top in _tile_starts(h, tile, overlap):
        for left in _tile_starts(w, tile, overlap):
            th, tw = min(tile, h), min(tile, w)
            piece = model(lq[..., top:top + th, left:left + tw])
            wy = _ramp(th, top, h, margin, overlap).repeat_interleave(scale)
            wx = _ramp(tw, left, w, margin, overlap).repeat_interleave(scale)
            wt = (wy[:, None] * wx[None, :]).to(piece.dtype)
            if out is None:
                out = piece.new_zeros(b, piece.shape[1], h * scale, w * scale)
                weight = piece.new_zeros(h * scale, w * scale)
            region = (..., slice(top * scale, (top + th) * scale), slice(left * scale, (left + tw) * scale))
            out[region] += piece * wt
            weight[region[1:]] += wt
    return out / weight


def charbonnier_loss(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Mean of sqrt((x - y)^2 + eps^2): the smooth L1 of MaIR's denoising training."""
    return torch.sqrt((x - y) ** 2 + eps ** 2).mean()


def save_png(img: torch.Tensor, path: Path) -> Path:
    """Write a (C, H, W) image in [0, 1] as an 8-bit PNG."""
    from PIL import Image

    array = (img.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)
    return path
