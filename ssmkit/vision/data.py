"""Image classification data: IDX (MNIST / Fashion-MNIST) files, ImageFolder-style folders and the
embedded scikit-learn digits, with deterministic pure-torch transforms.

Every dataset yields `(image, label)` with `image` a float tensor (channels, size, size), resized to
the model's input size and normalised. Training augmentation (a light random-resized crop, optional
horizontal flip) is a pure function of (seed, epoch, index): the runner calls `set_epoch(epoch)`
before each epoch, so a resumed run sees exactly the images the original run would have seen.

No torchvision on the data path (the data must load where torchvision's wheels do not): PIL reads
image files, numpy reads IDX files.

    train, test = load_digits_split(seed=0)                  # ArrayImageDataset pair, 8x8 digits
    train, test = load_idx_folder("/usr/share/datasets/fashion-mnist")
    train, test = load_image_folder("path/to/folder", seed=0)  # class per subfolder
    train = ClassificationDataset(train, ImageTransform(32, train=True, seed=0))
"""
from __future__ import annotations

import functools
import gzip
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ssmkit.errors import DataError
from ssmkit.util import derive_seed

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "ArrayImageDataset",
    "ClassificationDataset",
    "ImageFolderDataset",
    "ImageTransform",
    "load_digits_split",
    "load_fashion_mnist",
    "load_idx_folder",
    "load_image_folder",
    "read_idx",
    "write_idx",
    "stratified_split",
    "load_image_file",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# IDX type codes (third magic byte) -> numpy big-endian dtype
_IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


# ----------------------------------------------------------------------------------------------
# IDX files


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":  # gzip, whatever the file name says
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"IDX file {path} is a broken gzip file: {e}") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in IDX file `path` (gzip-compressed or not), checking magic number and size."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty file)'} "
                        f"(expected 0000 + type code 08/09/0b/0c/0d/0e + number of dimensions)")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated: its header declares {ndim} dimensions "
                        f"but the file has only {len(raw)} bytes")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "too long"
        raise DataError(f"IDX file {path} has {len(raw)} bytes (uncompressed) but its header {shape} of "
                        f"{dtype.name} needs {expected}: the file is {problem}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write `array` as an IDX file (gzip-compressed when the name ends in .gz)."""
    path, array = Path(path), np.asarray(array)
    codes = {v.newbyteorder("="): k for k, v in _IDX_TYPES.items()}
    key = array.dtype.newbyteorder("=")
    if key not in codes:
        raise DataError(f"IDX cannot store dtype {array.dtype}")
    head = bytes([0, 0, codes[key], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    raw = head + array.astype(_IDX_TYPES[codes[key]]).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root} has no {stem} or {stem}.gz (an MNIST-format folder needs train-images-idx3-ubyte, "
                    f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, gzipped or not)")


def _idx_split(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path} holds an array of shape {images.shape}, expected (n, rows, cols)")
    if labels.ndim != 1:
        raise DataError(f"{labels_path} holds an array of shape {labels.shape}, expected (n,)")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{labels_path} has negative labels")
    return images, labels.astype(np.int64)


def load_idx_folder(root: str | Path, classes: Sequence[str] | None = None
                    ) -> tuple["ArrayImageDataset", "ArrayImageDataset"]:
    """(train, test) of an MNIST-format folder (train-*/t10k-* IDX files, gzipped or not)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"MNIST-format folder {root} does not exist")
    train_x, train_y = _idx_split(root, "train")
    test_x, test_y = _idx_split(root, "t10k")
    n_classes = int(max(train_y.max(initial=0), test_y.max(initial=0))) + 1
    if classes is None or len(classes) < n_classes:
        classes = [str(i) for i in range(n_classes)]
    classes = list(classes)[:n_classes]
    if len(set(train_y.tolist())) < 2:
        raise DataError(f"the training split of {root} has a single class; classification needs at least two")
    return (ArrayImageDataset(train_x, train_y, classes, source=str(root)),
            ArrayImageDataset(test_x, test_y, classes, source=str(root)))


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> tuple["ArrayImageDataset", "ArrayImageDataset"]:
    """Fashion-MNIST from the Debian package dataset-fashion-mnist (or another folder of its files)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST is not installed ({root} does not exist): run "
                        f"`sudo apt-get install dataset-fashion-mnist`, or pass --data with a folder holding "
                        f"its IDX files")
    return load_idx_folder(root, FASHION_MNIST_CLASSES)


# ----------------------------------------------------------------------------------------------
# In-memory arrays and the embedded digits


class ArrayImageDataset:
    """Raw images in memory: `images` (n, h, w) or (n, h, w, c) uint8 (0..255) or float (0..1), int labels.
    Indexing gives (float tensor (c, h, w) in [0, 1], label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], source: str = "arrays"):
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise DataError(f"{source}: images must be (n, h, w) or (n, h, w, c), got shape {images.shape}")
        if len(images) != len(labels):
            raise DataError(f"{source}: {len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.classes, self.source = list(classes), source
        self.channels = images.shape[-1]

    def __len__(self) -> int:
        return len(self.images)

    def raw(self, index: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return x, int(self.labels[index])

    def subset(self, indices: np.ndarray) -> "ArrayImageDataset":
        return ArrayImageDataset(self.images[indices], self.labels[indices], self.classes, self.source)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), sorted: a `test_fraction` share of every class (at least one sample
    of each class with two or more) goes to test, drawn with `seed`."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(derive_seed(seed, 7919))
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(len(idx) * test_fraction))
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@functools.cache
def _digits_arrays(load_digits) -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    images.flags.writeable = False
    return images, digits.target.astype(np.int64)


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[ArrayImageDataset, ArrayImageDataset]:
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16, 10 classes), split stratified."""
    from sklearn.datasets import load_digits

    images, target = _digits_arrays(load_digits)
    data = ArrayImageDataset(images, target, [str(i) for i in range(10)], source="sklearn digits")
    train, test = stratified_split(data.labels, test_fraction, seed)
    return data.subset(train), data.subset(test)


# ----------------------------------------------------------------------------------------------
# Image folders


def load_image_file(path: str | Path, channels: int) -> torch.Tensor:
    """An image file as a float tensor (channels, h, w) in [0, 1] (channels 1: grayscale, 3: RGB);
    raises DataError naming the file when it cannot be decoded (unreadable, truncated)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            im.load()
            array = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    x = torch.from_numpy(array.copy())
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return x.float() / 255.0


class ImageFolderDataset:
    """Images in `root/<class>/<file>`; classes are the sorted subfolder names. Every image is decoded
    once when the dataset is built: an unreadable or truncated one is reported by name and then
    skipped with a warning (`on_bad_image="skip"`) or raises DataError (`"error"`)."""

    def __init__(self, root: str | Path, channels: int = 3, on_bad_image: str = "error",
                 classes: Sequence[str] | None = None):
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        self.root, self.channels, self.source = Path(root), channels, str(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is not None:  # a test split takes the training classes; it may lack some of them
            extra = sorted(set(found) - set(classes))
            if extra:
                raise DataError(f"{self.root} has class folders {extra} that the training classes "
                                f"{list(classes)} lack")
            found = list(classes)
        if not found:
            raise DataError(f"{self.root} has no class subfolders (expected {self.root}/<class name>/<image files>)")
        if len(found) < 2:
            raise DataError(f"{self.root} has a single class folder ({found[0]}); classification needs at least two")
        self.classes = list(found)
        self.paths: list[Path] = []
        labels: list[int] = []
        self.skipped: list[tuple[Path, str]] = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS) \
                if folder.is_dir() else []
            if not files and classes is None:
                raise DataError(f"class folder {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            for path in files:
                try:
                    x = load_image_file(path, channels)
                except DataError as e:
                    if on_bad_image == "error":
                        raise DataError(f"{e} (pass --on-bad-image skip to leave such files out)") from None
                    warnings.warn(f"skipping {e}", stacklevel=2)
                    self.skipped.append((path, str(e)))
                    continue
                self.paths.append(path)
                labels.append(label)
        if not self.paths:
            raise DataError(f"{self.root} holds no readable images")
        self.labels = np.asarray(labels, dtype=np.int64)
        for label, name in enumerate(self.classes):
            if classes is None and not (self.labels == label).any():
                raise DataError(f"class folder {self.root / name} holds no readable images")

    def __len__(self) -> int:
        return len(self.paths)

    def raw(self, index: int) -> tuple[torch.Tensor, int]:
        return load_image_file(self.paths[index], self.channels), int(self.labels[index])


class _Subset:
    def __init__(self, base, indices: np.ndarray):
        self.base, self.indices = base, np.asarray(indices)
        self.classes, self.channels, self.source = base.classes, base.channels, base.source
        self.labels = base.labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def raw(self, index: int):
        return self.base.raw(int(self.indices[index]))


def stratified_subset(base, size: int, seed: int):
    """A fixed class-balanced subset of about `size` samples of `base` (all of `base` when `size` is 0 or
    not smaller): evaluating a slow model on part of a large test split, the same part every time."""
    if size <= 0 or size >= len(base):
        return base
    _, keep = stratified_split(base.labels, size / len(base), seed)
    return _Subset(base, keep)


def load_image_folder(root: str | Path, seed: int = 0, test_fraction: float = 0.2, channels: int = 3,
                      on_bad_image: str = "error"):
    """(train, test) of an image folder: `root/train` + `root/val` (or `root/test`) when present, else
    `root/<class>/...` split stratified with `seed`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    kw = dict(channels=channels, on_bad_image=on_bad_image)
    if (root / "train").is_dir():
        train = ImageFolderDataset(root / "train", **kw)
        for name in ("val", "test"):
            if (root / name).is_dir():
                return train, ImageFolderDataset(root / name, classes=train.classes, **kw)
        raise DataError(f"{root} has a train/ folder but no val/ or test/ folder beside it")
    data = ImageFolderDataset(root, **kw)
    train_idx, test_idx = stratified_split(data.labels, test_fraction, seed)
    if len(test_idx) == 0:
        raise DataError(f"{root} has too few images for a test split (every class needs at least two)")
    return _Subset(data, train_idx), _Subset(data, test_idx)


# ----------------------------------------------------------------------------------------------
# Transforms and the dataset the runner sees


@dataclass
class ImageTransform:
    """Resize to `size`x`size` and normalise with per-channel `mean`/`std`; with `train`, first a light
    random-resized crop (area `scale`, aspect `ratio`) and an optional horizontal flip, drawn from
    `generator` (deterministic when the caller seeds it)."""

    size: int
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)
    train: bool = False
    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False

    def crop_box(self, h: int, w: int, g: torch.Generator) -> tuple[float, float, float, float]:
        """(top, left, height, width) in pixels, not rounded: a random-resized crop of area share
        `scale` and aspect ratio `ratio` (the full image when no draw fits in 10 tries)."""
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            u = torch.rand(4, generator=g).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
            cw, ch = math.sqrt(target * aspect), math.sqrt(target / aspect)
            if cw <= w and ch <= h:
                return u[2] * (h - ch), u[3] * (w - cw), ch, cw
        return 0.0, 0.0, float(h), float(w)

    def __call__(self, x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        c, h, w = x.shape
        if self.train and g is not None:
            top, left, ch, cw = self.crop_box(h, w, g)
            flip = self.hflip and bool(torch.rand(1, generator=g) < 0.5)
            if min(ch, cw) >= 2 * self.size:  # plenty of pixels: crop whole pixels, then resize (antialiased)
                t, l = int(top), int(left)
                x = x[:, t:t + max(1, int(ch)), l:l + max(1, int(cw))]
            else:  # small images (digits): sample the fractional crop box bilinearly
                # output pixel i samples the crop at top + (i + 0.5) * ch / size, in grid_sample's [-1, 1] units
                centers = (torch.arange(self.size, dtype=x.dtype) + 0.5) / self.size
                gy = (2 * (top + centers * ch) / h - 1).view(-1, 1).expand(self.size, self.size)
                gx = (2 * (left + centers * cw) / w - 1).view(1, -1).expand(self.size, self.size)
                grid = torch.stack([gx, gy], -1)[None]
                x = F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
            if flip:
                x = x.flip(-1)
        if x.shape[1:] != (self.size, self.size):
            down = x.shape[1] > self.size or x.shape[2] > self.size
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=down)[0]
        mean = torch.as_tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std


class ClassificationDataset(Dataset):
    """`base` (an ArrayImageDataset, ImageFolderDataset or split of one) through `transform`; training
    draws are a pure function of (seed, epoch, index)."""

    def __init__(self, base, transform: ImageTransform, seed: int = 0):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0
        self.classes, self.channels = base.classes, base.channels

    @property
    def labels(self) -> np.ndarray:
        return self.base.labels

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self.base):
            raise IndexError(index)
        x, y = self.base.raw(index)
        g = None
        if self.transform.train:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index))
        return self.transform(x, g), y
