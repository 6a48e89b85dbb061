"""CLAM-style feature bags, slide tables, patient-grouped splits and synthetic planted-signal bags.

On-disk layout (what CLAM's `extract_features_fp.py` writes and MambaMIL / TransMIL read):

    <root>/h5_files/<slide_id>.h5   datasets `features` float32 (N, D) and `coords` int (N, 2),
                                    level-0 top-left (x, y) of each patch, in the same row order
    <root>/pt_files/<slide_id>.pt   the features alone, a float32 tensor (N, D)
    <csv>                           columns case_id, slide_id, label (classification) and
                                    survival_months, censorship (survival; 1 = censored)
    <split_dir>/splits_{k}.csv      columns train, val, test of slide ids (ragged, blank-padded)

A case (patient) is the unit of splitting; for survival it is also the unit of a bag (all its slides'
features concatenated, in CSV order).
"""
from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from ssmkit.errors import DataError
from ssmkit.medical.survival import discretize

__all__ = ["Case", "read_bag", "bag_shape", "check_bags", "read_bag_attrs", "write_bag", "read_slide_ids", "read_cases",
           "BagDataset", "make_splits", "write_splits", "read_splits", "check_leakage", "SplitLeakageError", "make_synthetic_bags", "make_demo_bags"]

PARTS = ("train", "val", "test")


class SplitLeakageError(DataError):
    """A patient appears in more than one of train / val / test."""


@dataclass
class Case:
    """One patient: its slides, class label and (for survival) time and censorship."""

    case_id: str
    slide_ids: list[str] = field(default_factory=list)
    label: str = ""
    time: float = math.nan
    censorship: float = math.nan


# ----------------------------------------------------------------------------------------------
# Bag files


def read_bag(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features float32 (N, D), coords int64 (N, 2) or None) of a CLAM .h5 or .pt bag file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature bag {path} does not exist")
    n, _ = bag_shape(path)
    if path.suffix == ".h5":
        with h5py.File(path, "r") as f:
            features = torch.from_numpy(np.asarray(f["features"], dtype=np.float32))
            coords = torch.from_numpy(np.asarray(f["coords"], dtype=np.int64)) if "coords" in f else None
    else:
        features, coords = torch.load(path, map_location="cpu", weights_only=True).float(), None
    if coords is not None and coords.shape != (n, 2):
        raise DataError(f"{path}: coords shape {tuple(coords.shape)} does not match {n} features")
    return features, coords


def bag_shape(path: str | Path) -> tuple[int, int]:
    """(instances, feature width) of a CLAM .h5 or .pt bag, read without loading the features (the .pt
    tensor memory-mapped); a DataError names the file when it is not a readable (N, D) bag."""
    path = Path(path)
    if path.suffix == ".h5":
        try:
            with h5py.File(path, "r") as f:
                if "features" not in f:
                    raise DataError(f"{path} has no 'features' dataset (found: {', '.join(f) or 'nothing'})")
                shape = tuple(f["features"].shape)
        except OSError as e:
            raise DataError(f"{path} is not a readable HDF5 feature bag: {e}") from None
    elif path.suffix == ".pt":
        try:
            features = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise DataError(f"{path} is not a readable .pt feature bag: {type(e).__name__}: {e}") from None
        if not isinstance(features, torch.Tensor):
            raise DataError(f"{path} holds a {type(features).__name__}, not a (N, D) feature tensor")
        shape = tuple(features.shape)
    else:
        raise DataError(f"{path}: feature bags are .h5 or .pt files")
    if len(shape) != 2:
        raise DataError(f"{path}: features must be (N, D), got shape {shape}")
    if shape[0] == 0:
        raise DataError(f"{path} is an empty bag (0 instances)")
    return shape


def check_bags(paths: list[Path], in_dim: int = 0) -> int:
    """The feature width shared by every bag of `paths`, each opened once (not loaded): a DataError names a
    bag that cannot be read, and the bags whose width differs from the others' (or from `in_dim`)."""
    widths: dict[int, list[Path]] = {}
    for path in paths:
        widths.setdefault(bag_shape(path)[1], []).append(path)
    common = in_dim or max(widths, key=lambda w: len(widths[w]))
    odd = sorted((p for w, ps in widths.items() if w != common for p in ps), key=str)
    if odd:
        width = bag_shape(odd[0])[1]
        expected = f"--in-dim {in_dim}" if in_dim else f"{common}, the width of the other {len(widths[common])} bags"
        more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        raise DataError(f"{odd[0]}: feature width {width}, not {expected}{more}; re-extract the features with the "
                        f"same backbone")
    return common


def read_bag_attrs(path: str | Path) -> dict:
    """The attributes of a CLAM .h5 bag's `coords` (patch_size, patch_level, ...); {} for .pt bags."""
    path = Path(path)
    if path.suffix != ".h5":
        return {}
    with h5py.File(path, "r") as f:
        return dict(f["coords"].attrs) if "coords" in f else {}


def write_bag(root: str | Path, slide_id: str, features: torch.Tensor, coords: torch.Tensor,
              attrs: dict | None = None) -> tuple[Path, Path]:
    """Write `h5_files/<slide_id>.h5` (features, coords with patch `attrs`) and `pt_files/<slide_id>.pt`."""
    root = Path(root)
    h5, pt = root / "h5_files" / f"{slide_id}.h5", root / "pt_files" / f"{slide_id}.pt"
    h5.parent.mkdir(parents=True, exist_ok=True)
    pt.parent.mkdir(parents=True, exist_ok=True)
    features = features.detach().float().cpu()
    with h5py.File(h5, "w") as f:
        f.create_dataset("features", data=features.numpy())
        dset = f.create_dataset("coords", data=coords.detach().cpu().numpy().astype(np.int64))
        for key, value in (attrs or {}).items():
            dset.attrs[key] = value
    torch.save(features.clone(), pt)
    return h5, pt


# ----------------------------------------------------------------------------------------------
# Slide table


def read_slide_ids(csv_path: str | Path) -> list[str]:
    """The slide_id column of a slide table."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "slide_id" not in rows[0]:
        raise DataError(f"{csv_path} has no slide_id column (or no rows)")
    return [r["slide_id"].strip() for r in rows if r["slide_id"].strip()]


def read_cases(csv_path: str | Path, task: str = "classification", label_col: str = "label") -> list[Case]:
    """The patients of a CLAM/MambaMIL CSV, in first-appearance order, each with its slides in CSV order.

    Classification needs case_id, slide_id and `label_col`; survival needs case_id, slide_id,
    survival_months and censorship. Duplicate slide ids and bad values raise ValueError naming the row."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"slide table {csv_path} does not exist")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = ["case_id", "slide_id"] + ([label_col] if task == "classification" else ["survival_months", "censorship"])
    header = list(rows[0]) if rows else []
    missing = [c for c in need if c not in header]
    if missing:
        raise DataError(f"{csv_path} lacks column(s) {', '.join(missing)} (has: {', '.join(header) or 'no rows'})")
    cases: dict[str, Case] = {}
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        case_id, slide_id = row["case_id"].strip(), row["slide_id"].strip()
        if not case_id or not slide_id:
            raise DataError(f"{csv_path}:{line}: empty case_id or slide_id")
        if slide_id in seen:
            raise DataError(f"{csv_path}:{line}: slide_id {slide_id!r} is listed twice")
        seen.add(slide_id)
        case = cases.setdefault(case_id, Case(case_id))
        case.slide_ids.append(slide_id)
        if task == "classification":
            label = row[label_col].strip()
            if not label:
                raise DataError(f"{csv_path}:{line}: slide {slide_id} has no {label_col}")
            if case.label and case.label != label:
                raise DataError(f"{csv_path}:{line}: patient {case_id} has slides labelled {case.label!r} and "
                                f"{label!r}; one label per patient")
            case.label = label
        else:
            try:
                time, cens = float(row["survival_months"]), float(row["censorship"])
            except ValueError:
                raise DataError(f"{csv_path}:{line}: survival_months and censorship must be numbers, got "
                                f"{row['survival_months']!r}, {row['censorship']!r}") from None
            if not (math.isfinite(time) and time >= 0) or cens not in (0.0, 1.0):
                raise DataError(f"{csv_path}:{line}: need survival_months >= 0 and censorship 0 or 1, got "
                                f"{time}, {cens}")
            case.time, case.censorship = time, cens
    if not cases:
        raise DataError(f"{csv_path} lists no slides")
    return list(cases.values())


class BagDataset(Dataset):
    """One item per case: its slides' features concatenated (N, D), coords, and its target.

    Reads `h5_files/<slide>.h5` when present (it has coords), else `pt_files/<slide>.pt`. `labels` maps
    class names to indices (classification; an unknown label raises); `bin_edges` discretises survival
    times. Every bag is opened once when the dataset is made (`check_bags`), so a missing, unreadable or
    mis-shaped bag fails here, naming it, not in the middle of an epoch; `in_dim` is their feature width."""

    def __init__(self, root: str | Path, cases: list[Case], task: str = "classification",
                 labels: dict[str, int] | None = None, bin_edges: np.ndarray | None = None, in_dim: int = 0):
        self.root, self.cases, self.task = Path(root), cases, task
        self.labels, self.bin_edges = labels or {}, bin_edges
        for case in cases:
            if task == "classification" and case.label not in self.labels:
                raise DataError(f"patient {case.case_id} has label {case.label!r}, not one of "
                                f"{sorted(self.labels)}")
        self.in_dim = check_bags([self.bag_path(s) for c in cases for s in c.slide_ids], in_dim)

    def bag_path(self, slide_id: str) -> Path:
        for path in (self.root / "h5_files" / f"{slide_id}.h5", self.root / "pt_files" / f"{slide_id}.pt"):
            if path.is_file():
                return path
        raise DataError(f"slide {slide_id} is listed in the CSV but has no bag: neither "
                               f"{self.root}/h5_files/{slide_id}.h5 nor {self.root}/pt_files/{slide_id}.pt exists")

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict:
        case = self.cases[i]
        feats, coords, right = [], [], 0
        for slide in case.slide_ids:
            path = self.bag_path(slide)
            f, c = read_bag(path)
            feats.append(f)
            if c is None:  # .pt bags have no coords
                coords.append(torch.full((f.shape[0], 2), -1, dtype=torch.long))
                continue
            # a patient's later slides are laid out to the right of the earlier ones, so no two patches
            # of one bag share a position (what the 2-D model needs)
            c = c.clone()
            c[:, 0] += right - int(c[:, 0].min())
            right = int(c[:, 0].max()) + int(read_bag_attrs(path).get("patch_size", 1))
            coords.append(c)
        item = {"features": torch.cat(feats), "coords": torch.cat(coords), "index": torch.tensor(i)}
        if self.task == "classification":
            item["label"] = torch.tensor(self.labels[case.label])
        else:
            item["bin"] = torch.tensor(int(discretize([case.time], self.bin_edges)[0]))
            item["time"] = torch.tensor(case.time, dtype=torch.float32)
            item["censorship"] = torch.tensor(case.censorship, dtype=torch.float32)
        return item


# ----------------------------------------------------------------------------------------------
# Splits


def make_splits(cases: list[Case], k: int = 5, mode: str = "kfold", val_frac: float = 0.1,
                test_frac: float = 0.1, seed: int = 0) -> list[dict[str, list[str]]]:
    """`k` splits of slide ids into train / val / test, grouped by patient and stratified by label.

    "kfold": disjoint patient folds; fold i is the val set of split i, test is empty (the mahmoodlab
    survival protocol, with the patient grouping its shipped splits lack). "montecarlo": CLAM's
    protocol, each split draws val_frac / test_frac of the patients per class anew (test sets overlap
    across splits)."""
    if mode not in ("kfold", "montecarlo"):
        raise ValueError(f"split mode must be 'kfold' or 'montecarlo', got {mode!r}")
    if k < 2 and mode == "kfold":
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    strata: dict[str, list[int]] = {}
    for i, case in enumerate(cases):
        key = case.label if case.label else str(int(case.censorship)) if math.isfinite(case.censorship) else ""
        strata.setdefault(key, []).append(i)
    rng = np.random.default_rng(seed)
    slides = lambda idx: [s for i in sorted(idx) for s in cases[i].slide_ids]  # noqa: E731
    splits = []
    if mode == "kfold":
        fold_of = np.empty(len(cases), dtype=np.int64)
        offset = 0
        for members in strata.values():  # deal each stratum round-robin, continuing across strata
            for j, i in enumerate(rng.permutation(members)):
                fold_of[i] = (offset + j) % k
            offset += len(members)
        for f in range(k):
            val = np.flatnonzero(fold_of == f)
            train = np.flatnonzero(fold_of != f)
            splits.append({"train": slides(train), "val": slides(val), "test": []})
    else:
        for _ in range(k):
            part = {name: [] for name in PARTS}
            for members in strata.values():
                perm = rng.permutation(members)
                n_val, n_test = round(val_frac * len(perm)), round(test_frac * len(perm))
                part["val"] += perm[:n_val].tolist()
                part["test"] += perm[n_val:n_val + n_test].tolist()
                part["train"] += perm[n_val + n_test:].tolist()
            splits.append({name: slides(idx) for name, idx in part.items()})
    return splits


def write_splits(split_dir: str | Path, splits: list[dict[str, list[str]]]) -> list[Path]:
    """Write `splits_{i}.csv` files (columns train, val, test; blank where a column is shorter)."""
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, split in enumerate(splits):
        path = split_dir / f"splits_{i}.csv"
        rows = max(len(split.get(p, [])) for p in PARTS)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["", *PARTS])
            for r in range(rows):
                w.writerow([r, *(split[p][r] if r < len(split.get(p, [])) else "" for p in PARTS)])
        paths.append(path)
    return paths


def read_splits(path: str | Path) -> dict[str, list[str]]:
    """train / val / test slide ids of a CLAM `splits_{i}.csv` (ids kept as strings)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"train", "val"} <= set(rows[0]):
        raise DataError(f"{path} needs train and val columns, has {', '.join(rows[0])}")
    return {p: [r[p].strip() for r in rows if (r.get(p) or "").strip()] for p in PARTS}


def check_leakage(split: dict[str, list[str]], cases: list[Case], strict: bool = True,
                  where: str = "split") -> list[str]:
    """Patients whose slides sit in more than one of train / val / test. `strict` raises
    SplitLeakageError naming them; otherwise it warns loudly and returns them."""
    case_of = {s: c.case_id for c in cases for s in c.slide_ids}
    unknown = [s for p in PARTS for s in split.get(p, []) if s not in case_of]
    if unknown:
        raise DataError(f"{where} names slide(s) missing from the CSV: {', '.join(unknown[:5])}")
    parts_of: dict[str, set[str]] = {}
    for p in PARTS:
        for s in split.get(p, []):
            parts_of.setdefault(case_of[s], set()).add(p)
    leaked = sorted(c for c, parts in parts_of.items() if len(parts) > 1)
    if leaked:
        message = (f"{where}: {len(leaked)} patient(s) have slides in more than one of train/val/test "
                   f"(patient-level leakage): {', '.join(leaked[:10])}{' ...' if len(leaked) > 10 else ''}")
        if strict:
            raise SplitLeakageError(message + "; regenerate the splits grouped by patient (make_splits)")
        warnings.warn("LEAKAGE " + message, stacklevel=2)
    return leaked


# ----------------------------------------------------------------------------------------------
# Synthetic planted-signal bags


def make_synthetic_bags(root: str | Path, n_cases: int = 48, dim: int = 32, min_instances: int = 40,
                        max_instances: int = 120, key_fraction: float = 0.1, shift: float = 1.5,
                        multi_slide_every: int = 4, seed: int = 0) -> Path:
    """Write a CLAM-layout data set with a known signal; returns the CSV path (`<root>/slides.csv`).

    Each patient is positive with probability 1/2. Instances are N(0, I) at the cells of a rectangular
    patch grid (coords at stride 256); a positive bag also holds a contiguous run of `key_fraction` of its
    instances shifted by `shift` along a fixed random unit direction. Every `multi_slide_every`-th
    patient has two slides (the signal in the first). Survival columns: an exponential event time whose
    rate is 4x higher for positives, censored by a uniform follow-up (about half censored)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    rows = []
    for c in range(n_cases):
        positive = c % 2 if c < 2 else int(rng.random() < 0.5)
        case_id = f"patient_{c:03d}"
        n_slides = 2 if multi_slide_every and c % multi_slide_every == multi_slide_every - 1 else 1
        event_time = rng.exponential(12.0 if positive else 48.0)
        follow_up = rng.uniform(6.0, 90.0)
        time, censored = min(event_time, follow_up), float(event_time > follow_up)
        for s in range(n_slides):
            n = int(rng.integers(min_instances, max_instances + 1))
            width = int(math.ceil(math.sqrt(n)))
            cells = np.arange(n)
            coords = np.stack([cells % width, cells // width], 1) * 256
            feats = rng.standard_normal((n, dim)).astype(np.float32)
            if positive and s == 0:
                n_key = max(1, int(round(key_fraction * n)))
                start = int(rng.integers(0, n - n_key + 1))
                feats[start:start + n_key] += (shift * direction).astype(np.float32)
            slide_id = f"{case_id}_slide{s}"
            write_bag(root, slide_id, torch.from_numpy(feats), torch.from_numpy(coords),
                      {"patch_size": 256, "patch_level": 0})
            rows.append([case_id, slide_id, "tumor" if positive else "normal", f"{time:.3f}", int(censored)])
    path = root / "slides.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "slide_id", "label", "survival_months", "censorship"])
        w.writerows(rows)
    return path


def make_demo_bags(root: Path, features: torch.Tensor, coords: np.ndarray, key: np.ndarray, train_tiles: np.ndarray,
               n_train: int, n_eval: int, bag_size: int, seed: int) -> None:
    """CLAM bags (and slides.csv, splits/splits_0.csv) in `root` of real tiles of one slide (`features`,
    `coords`): train bags from the `train_tiles`, eval bags from the others; a positive bag holds 1-3 of
    the `key` tiles among ordinary ones, a negative bag none. One bag per case."""
    rng = np.random.default_rng(seed)
    rows, split = [], {"train": [], "val": [], "test": []}
    for part, n, pool in (("train", n_train, train_tiles), ("val", n_eval, ~train_tiles)):
        normal, keys = np.flatnonzero(pool & ~key), np.flatnonzero(pool & key)
        for b in range(n):
            positive = b % 2
            idx = rng.choice(normal, size=bag_size, replace=len(normal) < bag_size)
            if positive:
                n_key = int(rng.integers(1, 4))
                idx[rng.choice(bag_size, n_key, replace=False)] = rng.choice(keys, n_key, replace=len(keys) < n_key)
            bag_id = f"{part}_bag{b:03d}"
            write_bag(root, bag_id, features[idx], torch.from_numpy(coords[idx]))
            rows.append(f"{bag_id},{bag_id},{'dense_nuclei' if positive else 'ordinary'}")
            split[part].append(bag_id)
    (root / "slides.csv").write_text("case_id,slide_id,label\n" + "\n".join(rows) + "\n")
    write_splits(root / "splits", [split])
