"""Image classification data adapters: IDX files, image folders, the embedded digits, transforms."""
import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from ssmkit.errors import DataError
from ssmkit.vision.data import (ClassificationDataset, ImageFolderDataset, ImageTransform,
                                load_digits_split, load_fashion_mnist, load_idx_folder, load_image_folder,
                                read_idx, stratified_split, stratified_subset, write_idx)


def _mnist_folder(root, n_train=12, n_test=5, gz=True, size=6):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        y = (np.arange(n) % 3).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", x)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", y)
        arrays[prefix] = (x, y)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    arrays = _mnist_folder(tmp_path, gz=gz)
    for name, array in [("a.idx", np.arange(24, dtype=np.int32).reshape(2, 3, 4)),
                        ("b.idx.gz", np.linspace(0, 1, 6, dtype=np.float32))]:
        write_idx(tmp_path / name, array)
        back = read_idx(tmp_path / name)
        assert back.dtype == array.dtype and np.array_equal(back, array)
    train, test = load_idx_folder(tmp_path)
    assert len(train) == 12 and len(test) == 5 and train.classes == ["0", "1", "2"] and train.channels == 1
    assert np.array_equal(train.images[..., 0], arrays["train"][0])
    x, y = train.raw(4)
    assert x.shape == (1, 6, 6) and y == 1 and torch.allclose(x[0], torch.from_numpy(arrays["train"][0][4]) / 255)


def test_idx_bad_files_name_the_file(tmp_path):
    bad = tmp_path / "bad-magic.idx"
    bad.write_bytes(b"\x08\x03\x00\x00" + b"\x00" * 32)
    with pytest.raises(DataError, match="bad-magic.idx.*magic"):
        read_idx(bad)
    short = tmp_path / "short.idx.gz"
    raw = bytes([0, 0, 8, 2]) + np.asarray([3, 4], ">u4").tobytes() + b"\x01" * 10
    short.write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match="short.idx.gz.*truncated"):
        read_idx(short)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(raw)[:-8])
    with pytest.raises(DataError, match="broken.gz"):
        read_idx(broken)
    _mnist_folder(tmp_path / "m")
    write_idx(tmp_path / "m" / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match="5 images but .*t10k-labels.* 4 labels"):
        load_idx_folder(tmp_path / "m")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")


def _png(path, size=(8, 8), value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def _folder(root, per_class=3, classes=("cat", "dog")):
    for c, name in enumerate(classes):
        for i in range(per_class):
            _png(root / name / f"{i}.png", value=40 * c + i)


def test_image_folder_reads_classes_and_splits(tmp_path):
    _folder(tmp_path / "f", per_class=5)
    data = ImageFolderDataset(tmp_path / "f", channels=3)
    assert data.classes == ["cat", "dog"] and len(data) == 10 and list(data.labels) == [0] * 5 + [1] * 5
    x, y = data.raw(6)
    assert x.shape == (3, 8, 8) and y == 1
    train, test = load_image_folder(tmp_path / "f", seed=0, test_fraction=0.2)
    assert len(train) == 8 and len(test) == 2 and sorted(test.labels.tolist()) == [0, 1]
    # train/ + val/ layout; the val folder may lack a class
    _folder(tmp_path / "tv" / "train")
    _folder(tmp_path / "tv" / "val", per_class=1, classes=("dog",))
    train, val = load_image_folder(tmp_path / "tv")
    assert val.classes == ["cat", "dog"] and val.labels.tolist() == [1]


def test_image_folder_truncated_image_skip_or_error(tmp_path):
    _folder(tmp_path / "f")
    good = (tmp_path / "f" / "dog" / "0.png").read_bytes()
    bad = tmp_path / "f" / "dog" / "broken.png"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="broken.png.*on-bad-image skip"):
        ImageFolderDataset(tmp_path / "f", on_bad_image="error")
    with pytest.warns(UserWarning, match="broken.png"):
        data = ImageFolderDataset(tmp_path / "f", on_bad_image="skip")
    assert len(data) == 6 and data.skipped[0][0] == bad


def test_image_folder_clear_errors(tmp_path):
    _folder(tmp_path / "empty")
    (tmp_path / "empty" / "bird").mkdir()
    with pytest.raises(DataError, match="bird holds no image files"):
        ImageFolderDataset(tmp_path / "empty")
    _folder(tmp_path / "single", classes=("cat",))
    with pytest.raises(DataError, match="single class"):
        ImageFolderDataset(tmp_path / "single")
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        ImageFolderDataset(tmp_path / "none")
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing")


def test_digits_split_is_stratified_and_deterministic():
    train, test = load_digits_split(seed=0)
    again_train, again_test = load_digits_split(seed=0)
    other_train, _ = load_digits_split(seed=1)
    assert len(train) + len(test) == 1797 and abs(len(test) - 0.2 * 1797) < 10
    assert np.array_equal(train.labels, again_train.labels) and np.array_equal(test.images, again_test.images)
    assert not np.array_equal(train.images, other_train.images)
    counts_all = np.bincount(np.concatenate([train.labels, test.labels]), minlength=10)
    counts_test = np.bincount(test.labels, minlength=10)
    assert np.all(np.abs(counts_test - 0.2 * counts_all) <= 1)  # every class in proportion
    x, y = test.raw(0)
    assert x.shape == (1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    tr, te = stratified_split(np.array([0, 0, 1, 1, 1, 1, 2]), 0.5, seed=3)
    assert sorted(tr.tolist() + te.tolist()) == list(range(7)) and 6 in tr.tolist()


def test_stratified_subset_is_fixed_and_class_balanced():
    _, test = load_digits_split(seed=0)
    part = stratified_subset(test, 100, seed=1)
    assert abs(len(part) - 100) <= 10 and set(part.labels.tolist()) == set(range(10))
    assert np.all(np.bincount(part.labels, minlength=10) >= 8)
    again = stratified_subset(test, 100, seed=1)
    assert torch.equal(part.raw(5)[0], again.raw(5)[0]) and part.raw(5)[1] == again.raw(5)[1]
    assert stratified_subset(test, 0, seed=1) is test and stratified_subset(test, 10**6, seed=1) is test


def test_transforms_resize_normalise_and_draw_per_epoch():
    train_raw, _ = load_digits_split(seed=0)
    ds = ClassificationDataset(train_raw, ImageTransform(16, train=True), seed=5)
    x, y = ds[3]
    assert x.shape == (1, 16, 16) and -1.001 <= float(x.min()) and float(x.max()) <= 1.001
    assert torch.equal(ds[3][0], x)  # deterministic per (seed, epoch, index)
    ds.set_epoch(1)
    assert not torch.equal(ds[3][0], x)
    ds.set_epoch(0)
    assert torch.equal(ds[3][0], x)
    # a crop box covering the whole image is exactly the eval resize
    full = ImageTransform(16, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    raw = train_raw.raw(3)[0]
    assert torch.allclose(full(raw, torch.Generator().manual_seed(0)), ImageTransform(16)(raw), atol=1e-5)
    plain = ClassificationDataset(train_raw, ImageTransform(16), seed=5)
    a, b = plain[3][0], plain[3][0]
    assert torch.equal(a, b)
    with pytest.raises(IndexError):
        plain[len(plain)]
