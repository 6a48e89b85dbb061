"""Moving digits: the Moving-MNIST construction on digits that ship with an installed package.

Each sequence places `n_digits` digit images at random positions in a blank `frame_size` square and
moves each one in a straight line at constant speed, bouncing off the frame's edges (the velocity
component is reflected and the position mirrored back inside); frames are the pixelwise maximum of
the digits, in [0, 1]. This is the construction of the Moving-MNIST benchmark (two 28 px digits in a
64×64 frame); by default the digits are scikit-learn's bundled 8×8 handwritten digits, upsampled
(bilinear) to `digit_size` px, and Fashion-MNIST images are used instead when its IDX files are
given (`fashion_dir`). Item i is a pure function of (seed, split, index): the same index always
gives the same sequence, and the train and eval splits draw from disjoint digit images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ssmkit.errors import DataError
from ssmkit.util import derive_seed
from ssmkit.vision.data import read_idx

__all__ = ["MovingDigits", "load_digit_images", "FASHION_FILES"]

FASHION_FILES = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")
_EVAL_FRACTION = 0.2  # the last 20% of the images belong to the eval split


def _find_fashion(fashion_dir: str | Path) -> Path | None:
    for name in FASHION_FILES:
        for candidate in (Path(fashion_dir) / name, Path(fashion_dir) / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_digit_images(digit_size: int = 16, source: str = "sklearn", fashion_dir: str | Path = "") -> torch.Tensor:
    """(n, digit_size, digit_size) float32 images in [0, 1].

    source "sklearn": the 1,797 8×8 digits of `sklearn.datasets.load_digits` (values 0..16).
    source "fashion": Fashion-MNIST 28×28 from `fashion_dir` (train-images-idx3-ubyte[.gz], else t10k).
    source "auto": Fashion-MNIST when its files are in `fashion_dir`, else sklearn.
    Images are resized (bilinear, antialiased) to `digit_size`.
    """
    if source not in ("sklearn", "fashion", "auto"):
        raise ValueError(f"source must be 'sklearn', 'fashion' or 'auto', got {source!r}")
    path = _find_fashion(fashion_dir) if fashion_dir and source != "sklearn" else None
    if source == "fashion" and path is None:
        raise DataError(f"no Fashion-MNIST IDX file ({' or '.join(FASHION_FILES)}, optionally .gz) "
                        f"in {fashion_dir!r}")
    if path is not None:
        images = torch.from_numpy(read_idx(path)).float() / 255.0
        if images.ndim != 3:
            raise DataError(f"{path} holds an array of shape {tuple(images.shape)}, not (n, rows, cols) images")
    else:
        from sklearn.datasets import load_digits

        images = torch.from_numpy(load_digits().images).float() / 16.0
    if images.shape[-1] != digit_size or images.shape[-2] != digit_size:
        images = F.interpolate(images[:, None], size=(digit_size, digit_size), mode="bilinear",
                               align_corners=False, antialias=True)[:, 0]
    return images.clamp_(0, 1).contiguous()


def _bounce(start: float, velocity: float, steps: int, limit: float) -> np.ndarray:
    """Positions start + t·velocity reflected into [0, limit] (a ball bouncing between two walls)."""
    if limit <= 0:
        return np.zeros(steps)
    x = start + velocity * np.arange(steps)
    period = 2 * limit
    x = np.mod(x, period)
    return np.where(x > limit, period - x, x)


class MovingDigits(Dataset):
    """Map-style dataset of moving-digit sequences: item i is frames (seq_len, 1, frame_size, frame_size)
    float32 in [0, 1].

    n_digits digits of digit_size px each move at a speed drawn uniformly in [speed_min, speed_max] px
    per frame in a uniformly random direction, bouncing off the edges; split 0 (train) and 1 (eval)
    use disjoint digit images. `images` may be passed to share one loaded image set.
    """

    def __init__(self, size: int, seq_len: int = 12, frame_size: int = 32, n_digits: int = 2, digit_size: int = 14,
                 seed: int = 0, split: int = 0, speed_min: float = 1.0, speed_max: float = 3.0,
                 source: str = "sklearn", fashion_dir: str | Path = "", images: torch.Tensor | None = None):
        if digit_size > frame_size:
            raise ValueError(f"digit_size ({digit_size}) cannot exceed frame_size ({frame_size})")
        if min(size, seq_len, n_digits, digit_size) < 1 or not 0 <= speed_min <= speed_max:
            raise ValueError("size, seq_len, n_digits and digit_size must be >= 1 and 0 <= speed_min <= speed_max")
        if split not in (0, 1):
            raise ValueError(f"split must be 0 (train) or 1 (eval), got {split}")
        self.size, self.seq_len, self.frame_size, self.n_digits = size, seq_len, frame_size, n_digits
        self.digit_size, self.seed, self.split = digit_size, seed, split
        self.speed_min, self.speed_max = speed_min, speed_max
        images = load_digit_images(digit_size, source, fashion_dir) if images is None else images
        n_eval = max(1, int(len(images) * _EVAL_FRACTION))
        self.images = images[len(images) - n_eval:] if split else images[: len(images) - n_eval]

    def __len__(self) -> int:
        return self.size

    def trajectories(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(digit image indices (n_digits,), top-left positions (n_digits, seq_len, 2) as ints (row, col))."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng(derive_seed(self.seed, self.split, index))
        which = rng.integers(0, len(self.images), self.n_digits)
        limit = self.frame_size - self.digit_size
        pos = np.empty((self.n_digits, self.seq_len, 2), dtype=np.int64)
        for d in range(self.n_digits):
            start = rng.uniform(0, limit, 2)
            angle = rng.uniform(0, 2 * np.pi)
            speed = rng.uniform(self.speed_min, self.speed_max)
            velocity = speed * np.array([np.sin(angle), np.cos(angle)])
            for axis in range(2):
                pos[d, :, axis] = np.rint(_bounce(start[axis], velocity[axis], self.seq_len, limit))
        return which, np.clip(pos, 0, limit)

    def __getitem__(self, index: int) -> torch.Tensor:
        which, pos = self.trajectories(index)
        s = self.digit_size
        frames = torch.zeros(self.seq_len, 1, self.frame_size, self.frame_size)
        for d, image_index in enumerate(which.tolist()):
            image = self.images[image_index]
            for t in range(self.seq_len):
                r, c = pos[d, t].tolist()
                window = frames[t, 0, r:r + s, c:c + s]
                torch.maximum(window, image, out=window)
        return frames
