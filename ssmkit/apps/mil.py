"""`ssmkit mil`: whole-slide multiple-instance learning with MambaMIL and its baselines.

    ssmkit mil extract   slide folder (or the embedded slide) -> CLAM bags (h5_files/, pt_files/)
    ssmkit mil train     k-fold training with the shared runner, one run folder per fold (fold_<k>/)
    ssmkit mil eval      every fold's weights on its val set; per-fold and mean +- std table
    ssmkit mil heatmap   a model's per-tile scores (attention) drawn over a slide thumbnail (PNG)

Data: a CLAM feature folder (`--data-dir`, with `slides.csv` or `--csv`: case_id, slide_id, label, or
survival_months + censorship for `--task survival`). Splits are read from `--split-dir`
(`splits_{k}.csv`) or generated, grouped by patient; a patient in two parts of a split is refused
unless `--allow-leakage` (then it is a loud warning). Without `--data-dir` the runs use synthetic
CLAM bags with a planted signal, generated deterministically into `<out_dir>/synthetic`.
Metrics: AUC (binary, or macro one-vs-rest), balanced accuracy and macro F1 for classification;
Harrell's c-index for survival.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ssmkit.apps.config import ConfigError, TrainConfig, option
from ssmkit.apps.report import ReportSection, Table
from ssmkit.apps.runner import Application, Command, RunError, Runner, eval_config, load_weights
from ssmkit.medical import data as bags
from ssmkit.medical.models import MIL_MODELS
from ssmkit.medical.survival import concordance_index, nll_survival_loss, risk_score, survival_bins
from ssmkit.medical import wsi
from ssmkit.registry import create_model

__all__ = ["MilConfig", "ExtractConfig", "HeatmapConfig", "MilApp", "application", "extract", "heatmap",
           "fold_summary"]

# constructor options each model accepts (the others are not passed)
_MODEL_OPTIONS = {
    "mambamil": ("d_model", "n_layers", "rate", "dropout", "init", "mixer"),
    "mambamil_2d": ("d_model", "n_layers", "dropout", "init"),
    "abmil": ("d_model", "dropout"),
    "transmil_lite": ("d_model",),
    "meanmil": ("d_model", "dropout"),
    "maxmil": ("d_model", "dropout"),
}


@dataclass
class MilConfig(TrainConfig):
    """Feature bags, splits, model and (redeclared) training defaults: Adam-like lr 2e-4, one bag per step."""

    data_dir: str = option("", "CLAM feature folder (h5_files/, pt_files/); empty: synthetic planted-signal bags")
    csv: str = option("", "slide table (empty: <data-dir>/slides.csv)")
    split_dir: str = option("", "folder of splits_{k}.csv (empty: generate patient-grouped splits)")
    split_mode: str = option("kfold", "generated splits: disjoint patient folds, or CLAM's Monte Carlo draws",
                             ("kfold", "montecarlo"))
    k: int = option(5, "number of folds / splits")
    fold: int = option(-1, "the fold to train or evaluate (-1: all)")
    allow_leakage: bool = option(False, "accept splits with a patient in two parts (warn instead of refusing)")
    task: str = option("classification", "what the bags predict", ("classification", "survival"))
    model: str = option("mambamil", "registered MIL model", MIL_MODELS)
    in_dim: int = option(0, "feature width of the bags (0: read it from the first bag)")
    d_model: int = option(512, "model width after the feature projection")
    n_layers: int = option(2, "Mamba blocks (mambamil, mambamil_2d)")
    mixer: str = option("sr", "MambaMIL mixer: sequence-reordered, bidirectional or plain", ("sr", "bi", "uni"))
    rate: int = option(5, "SR-Mamba reorder rate R (mambamil)")
    dropout: float = option(0.0, "dropout after the feature projection (the reference: 0 subtyping, 0.25 survival)")
    init: str = option("reference", "MambaMIL init: the reference's xavier on every Linear (dt bias 0), or Mamba's",
                       ("reference", "mamba"))
    n_bins: int = option(4, "survival time bins (quartiles of the uncensored times)")
    alpha_surv: float = option(0.0, "weight of the uncensored term in the survival NLL (MambaMIL: 0)")
    synthetic_cases: int = option(64, "patients of the generated synthetic data (without --data-dir)")
    synthetic_dim: int = option(32, "feature width of the generated synthetic data")
    epochs: float = option(10.0, "if > 0: train for this many passes over the training set instead of --steps")
    batch_size: int = option(1, "bags per optimizer step (bags of any length; each is its own forward pass)")
    lr: float = option(2e-4, "peak learning rate of AdamW")
    warmup_steps: int = option(0, "steps of linear learning-rate warm-up from 0")
    weight_decay: float = option(1e-5, "AdamW weight decay (never on norms, biases, A_log, D)")
    log_every: int = option(50, "print and log the training metrics every N steps")
    eval_batch_size: int = option(1, "bags per eval batch")

    def validate(self) -> None:
        super().validate()
        if self.k < 1 or self.fold >= self.k or self.fold < -1:
            raise ConfigError(f"need k >= 1 and -1 <= fold < k, got k={self.k}, fold={self.fold}")
        if self.k < 2 and not self.split_dir and self.split_mode == "kfold":
            raise ConfigError("generated k-fold splits need --k 2 or more (or --split-dir / --split-mode montecarlo)")
        for name in ("d_model", "n_layers", "rate", "synthetic_cases", "synthetic_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.in_dim < 0 or self.n_bins < 2 or not 0 <= self.dropout < 1 or not 0 <= self.alpha_surv <= 1:
            raise ConfigError("need in_dim >= 0, n_bins >= 2, 0 <= dropout < 1 and 0 <= alpha_surv <= 1")


@dataclass
class ExtractConfig:
    """`ssmkit mil extract`: slides -> tiles -> features -> CLAM bags."""

    slide_dir: str = option("", "folder of slides (.svs/.tif/...); empty: the embedded CMU-1-Small-Region slide")
    csv: str = option("", "optional slide table: only its slide_ids are extracted, and each must exist")
    out: str = option("runs/mil/features", "output CLAM folder (h5_files/, pt_files/)")
    backbone: str = option("resnet50", "timm model name of the tile encoder")
    weights: str = option("", "local weights file of the backbone (safetensors or torch state dict)")
    random_init: bool = option(False, "use a randomly initialised backbone (no --weights; demos and tests)")
    patch_size: int = option(256, "tile size in pixels at --target-mpp")
    target_mpp: float = option(0.5, "tile resolution in µm per pixel (0.5: 20x, 0.25: 40x)")
    image_size: int = option(224, "tiles are resized to this for the backbone")
    min_tissue: float = option(0.5, "keep tiles with at least this tissue fraction (HSV-saturation mask)")
    batch_size: int = option(32, "tiles per backbone forward pass")
    slide_mpp: float = option(0.0, "level-0 µm per pixel for slides without that metadata (0: read it)")
    seed: int = option(0, "seed of a random-init backbone")

    def validate(self) -> None:
        if self.patch_size < 8 or self.image_size < 8 or self.batch_size < 1 or self.target_mpp <= 0:
            raise ConfigError("need patch_size >= 8, image_size >= 8, batch_size >= 1 and target_mpp > 0")
        if not 0 <= self.min_tissue <= 1:
            raise ConfigError(f"min_tissue must be in [0, 1], got {self.min_tissue}")


@dataclass
class HeatmapConfig(MilConfig):
    """`ssmkit mil heatmap`: a trained model's per-tile scores over a slide."""

    slide: str = option("", "slide file (empty: the embedded slide)")
    bag_dir: str = option("", "CLAM folder with the slide's bag h5_files/<slide stem>.h5 (empty: --data-dir)")
    weights: str = option("", "model weights (empty: <out-dir>/fold_<fold or 0>/best.safetensors)")
    output: str = option("", "PNG path (empty: <out-dir>/heatmap_<slide>.png)")


# ----------------------------------------------------------------------------------------------
# data resolution shared by train / eval / heatmap


@dataclass
class _Data:
    root: Path
    cases: list
    labels: dict
    in_dim: int
    n_outputs: int
    edges: np.ndarray | None


def _data_root(cfg: MilConfig) -> Path:
    """--data-dir, or the synthetic planted-signal bags generated (once) into <out_dir>/synthetic."""
    if cfg.data_dir:
        root = Path(cfg.data_dir)
        if not root.is_dir():
            raise RunError(f"--data-dir {root} does not exist")
        return root
    root = Path(cfg.out_dir or "runs/mil") / "synthetic"
    if not (root / "slides.csv").is_file():
        bags.make_synthetic_bags(root, n_cases=cfg.synthetic_cases, dim=cfg.synthetic_dim, seed=cfg.seed)
    return root


def _data(cfg: MilConfig) -> _Data:
    """Cases, label map, feature width and survival bins of the configured data."""
    root = _data_root(cfg)
    csv_path = Path(cfg.csv) if cfg.csv else root / "slides.csv"
    try:
        cases = bags.read_cases(csv_path, cfg.task)
        labels, edges = {}, None
        if cfg.task == "classification":
            labels = {name: i for i, name in enumerate(sorted({c.label for c in cases}))}
            if len(labels) < 2:
                raise ValueError(f"{csv_path}: classification needs at least two labels, found {sorted(labels)}")
        else:
            edges = survival_bins([c.time for c in cases], [c.censorship for c in cases], cfg.n_bins)
        first = bags.BagDataset(root, cases[:1], cfg.task, labels, edges).bag_path(cases[0].slide_ids[0])
        width = bags.read_bag(first)[0].shape[1]
    except (OSError, ValueError) as e:
        raise RunError(str(e)) from None
    if cfg.in_dim and cfg.in_dim != width:
        raise RunError(f"{first}: feature width {width} does not match the model's in_dim {cfg.in_dim}; pass "
                       f"--in-dim {width} (or 0 to read it from the bags) or re-extract with the matching backbone")
    return _Data(root, cases, labels, width, len(labels) if labels else cfg.n_bins, edges)


def _split(cfg: MilConfig, d: _Data, fold: int) -> dict[str, list[str]]:
    if cfg.split_dir:
        split = bags.read_splits(Path(cfg.split_dir) / f"splits_{fold}.csv")
    else:
        split = bags.make_splits(d.cases, cfg.k, cfg.split_mode, seed=cfg.seed)[fold]
    try:
        bags.check_leakage(split, d.cases, strict=not cfg.allow_leakage, where=f"split {fold}")
    except ValueError as e:
        raise RunError(str(e)) from None
    return split


def _fold_dir(cfg: MilConfig, fold: int) -> Path:
    return Path(cfg.out_dir or "runs/mil") / f"fold_{fold}"


def _folds(cfg: MilConfig) -> list[int]:
    return list(range(cfg.k)) if cfg.fold < 0 else [cfg.fold]


def _fold_config(cfg, fold: int):
    """The configuration of one fold's run: its own folder, the data folder fixed (the synthetic data
    are shared by all folds), and c-index selection for survival."""
    best = cfg.best_metric or ("c_index" if cfg.task == "survival" else "loss")
    return dataclasses.replace(cfg, fold=fold, out_dir=str(_fold_dir(cfg, fold)), best_metric=best,
                               data_dir=str(_data_root(cfg)))


def _mean_std(values: list[float]) -> str:
    arr = np.asarray(values, dtype=float)
    return f"{arr.mean():.4f} ± {arr.std(ddof=1) if arr.size > 1 else 0.0:.4f}"


def fold_summary(per_fold: dict[int, dict[str, float]]) -> Table:
    """Per-fold metrics and their mean ± std (sample std over folds)."""
    names = list(next(iter(per_fold.values())))
    rows = [[f, *(f"{m[n]:.4f}" for n in names)] for f, m in per_fold.items()]
    rows.append(["mean ± std", *(_mean_std([m[n] for m in per_fold.values()]) for n in names)])
    return Table("Per-fold metrics", ["fold", *names], rows)


class MilApp(Application):
    """Train and evaluate MIL models on CLAM feature bags with k-fold, patient-grouped splits."""

    name = "mil"
    help = "whole-slide MIL: MambaMIL and baselines on CLAM feature bags (extract, train, eval, heatmap)"
    config = MilConfig
    metrics = {"loss": "min", "auc": "max", "balanced_acc": "max", "f1": "max", "c_index": "max"}

    def build_datasets(self, cfg: MilConfig) -> tuple[Dataset, Dataset]:
        d = self._resolved = _data(cfg)
        split = _split(cfg, d, max(cfg.fold, 0))
        parts = []
        for part in ("train", "val"):
            wanted = set(split[part])
            cases = [c for c in d.cases if wanted & set(c.slide_ids)]
            if not cases:
                raise RunError(f"split {max(cfg.fold, 0)} has no {part} slides found in the CSV")
            try:
                parts.append(bags.BagDataset(d.root, cases, cfg.task, d.labels, d.edges, in_dim=d.in_dim))
            except (OSError, ValueError) as e:
                raise RunError(str(e)) from None
        return parts[0], parts[1]

    def build_model(self, cfg: MilConfig) -> torch.nn.Module:
        d = getattr(self, "_resolved", None) or _data(cfg)
        self._task, self._alpha = cfg.task, cfg.alpha_surv
        kwargs = {k: getattr(cfg, k) for k in _MODEL_OPTIONS[cfg.model]}
        return create_model(cfg.model, in_dim=d.in_dim, n_classes=d.n_outputs, **kwargs)

    def collate(self, samples: list) -> list:
        return samples  # bags differ in length: each is run on its own

    def _bag_loss(self, logits: torch.Tensor, bag: dict) -> torch.Tensor:
        if self._task == "survival":
            return nll_survival_loss(logits, bag["bin"].view(1), bag["censorship"].view(1), self._alpha)
        return F.cross_entropy(logits.float(), bag["label"].view(1))

    def train_loss(self, model, batch: list) -> torch.Tensor:
        return torch.stack([self._bag_loss(model(b["features"], b["coords"])["logits"], b) for b in batch]).mean()

    def eval_step(self, model, batch: list) -> dict[str, torch.Tensor]:
        logits = [model(b["features"], b["coords"])["logits"].float() for b in batch]
        out = {"loss": torch.stack([self._bag_loss(x, b) for x, b in zip(logits, batch)])}
        if self._task == "survival":
            out["risk"] = torch.cat([risk_score(x) for x in logits])
            out["time"] = torch.stack([b["time"] for b in batch])
            out["event"] = torch.stack([1 - b["censorship"] for b in batch])
        else:
            out["prob"] = torch.cat([torch.softmax(x, -1) for x in logits])
            out["label"] = torch.stack([b["label"] for b in batch])
        return out

    def compute_metrics(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        metrics = {"loss": outputs["loss"].double().mean().item()}
        if "risk" in outputs:
            metrics["c_index"] = concordance_index(outputs["time"], outputs["event"], outputs["risk"])
            return metrics
        return {**metrics, **classification_metrics(outputs["prob"].numpy(), outputs["label"].numpy())}

    def commands(self) -> list[Command]:
        return [
            Command("extract", "tile slides at a target µm/px and encode the tiles with a timm backbone into "
                               "CLAM bags", ExtractConfig, extract),
            Command("train", "k-fold training (one run folder per fold) and a per-fold metrics table",
                    MilConfig, self.train_folds),
            Command("eval", "evaluate every fold's weights; per-fold and mean ± std table",
                    eval_config(MilConfig), self.eval_folds),
            Command("heatmap", "draw a trained model's per-tile scores over a slide thumbnail (PNG)",
                    HeatmapConfig, heatmap),
        ]

    def train_folds(self, cfg: MilConfig) -> dict[int, dict[str, float]]:
        """Train each selected fold with the shared runner; prints and writes the fold summary."""
        per_fold = {f: Runner(self, _fold_config(cfg, f)).train().metrics for f in _folds(cfg)}
        self._write_summary(cfg, per_fold, "train_summary")
        return per_fold

    def eval_folds(self, cfg) -> dict[int, dict[str, float]]:
        """Evaluate each selected fold's weights on its val set."""
        per_fold = {}
        for f in _folds(cfg):
            fold_cfg = _fold_config(cfg, f)
            per_fold[f] = Runner(self, fold_cfg).evaluate(cfg.weights).metrics
        self._write_summary(cfg, per_fold, "eval_summary")
        return per_fold

    def _write_summary(self, cfg: MilConfig, per_fold: dict, stem: str) -> None:
        table = fold_summary(per_fold)
        out = Path(cfg.out_dir or "runs/mil")
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps({str(k): v for k, v in per_fold.items()}, indent=2) + "\n")
        lines = [" | ".join(map(str, table.columns)), *(" | ".join(map(str, r)) for r in table.rows)]
        print(f"mil {cfg.model} ({cfg.task}), {len(per_fold)} fold(s):\n  " + "\n  ".join(lines), flush=True)

    def demo(self, out_dir: Path, smoke: bool) -> ReportSection:
        return run_demo(self, Path(out_dir) / self.name, smoke)


def classification_metrics(prob: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """AUC (binary, or macro one-vs-rest over the classes present; NaN with one class), balanced accuracy
    and macro F1 of the argmax."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    pred = prob.argmax(1)
    present = np.unique(label)
    if present.size < 2:
        auc = math.nan
    else:  # AUC over the classes present, their probabilities renormalised
        cols = prob[:, present] / prob[:, present].sum(1, keepdims=True)
        auc = (roc_auc_score(label == present[1], cols[:, 1]) if present.size == 2
               else roc_auc_score(label, cols, multi_class="ovr", labels=present))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bacc = balanced_accuracy_score(label, pred)
    f1 = f1_score(label, pred, average="macro", labels=np.arange(prob.shape[1]), zero_division=0)
    return {"auc": float(auc), "balanced_acc": float(bacc), "f1": float(f1)}


application = MilApp()


# ----------------------------------------------------------------------------------------------
# extract and heatmap


def _slides(cfg: ExtractConfig) -> list[Path]:
    if not cfg.slide_dir:
        return [wsi.EMBEDDED_SLIDE]
    folder = Path(cfg.slide_dir)
    if not folder.is_dir():
        raise RunError(f"--slide-dir {folder} does not exist")
    found = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in wsi.SLIDE_SUFFIXES}
    if cfg.csv:
        try:
            wanted = bags.read_slide_ids(cfg.csv)
        except (OSError, ValueError) as e:
            raise RunError(str(e)) from None
        missing = [s for s in wanted if s not in found]
        if missing:
            raise RunError(f"{len(missing)} slide(s) listed in {cfg.csv} are not in {folder}: {', '.join(missing[:5])}")
        return [found[s] for s in wanted]
    if not found:
        raise RunError(f"{folder} holds no slides ({', '.join(wsi.SLIDE_SUFFIXES)})")
    return list(found.values())


def extract(cfg: ExtractConfig) -> dict[str, int]:
    """Write a CLAM bag per slide; returns slide id -> number of tiles."""
    slides = _slides(cfg)
    try:
        encoder = wsi.FeatureExtractor(cfg.backbone, cfg.weights, cfg.random_init, cfg.image_size, cfg.seed)
        counts = {}
        for path in slides:
            h5, n = wsi.extract_slide(path, cfg.out, encoder, cfg.patch_size, cfg.target_mpp, cfg.min_tissue,
                                      cfg.batch_size, cfg.slide_mpp)
            counts[path.stem] = n
            print(f"mil extract: {path.name}: {n} tiles of {cfg.patch_size} px at {cfg.target_mpp} µm/px -> {h5}",
                  flush=True)
    except (OSError, ValueError) as e:
        raise RunError(str(e)) from None
    return counts


def draw_heatmap(thumb: np.ndarray, slide_size: tuple[int, int], coords: np.ndarray, size0: int,
                 scores: np.ndarray, path: Path, title: str = "") -> Path:
    """PNG of `thumb` with each tile (level-0 top-left `coords`, `size0` px) coloured by its score."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    sx = thumb.shape[1] / slide_size[0]
    fig = Figure(figsize=(6, 6 * thumb.shape[0] / thumb.shape[1] + 0.4), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.imshow(thumb)
    span = scores.max() - scores.min()
    norm = (scores - scores.min()) / span if span > 0 else np.zeros_like(scores)
    cmap = colormaps["jet"]
    for (x, y), v in zip(coords, norm):
        ax.add_patch(Rectangle((x * sx, y * sx), size0 * sx, size0 * sx, color=cmap(float(v)), alpha=0.45, lw=0))
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def heatmap(cfg: HeatmapConfig, model: torch.nn.Module | None = None) -> Path:
    """Score the slide's bag with the model and draw the scores over its thumbnail."""
    slide_path = Path(cfg.slide) if cfg.slide else wsi.EMBEDDED_SLIDE
    bag = Path(cfg.bag_dir or cfg.data_dir or ".") / "h5_files" / f"{slide_path.stem}.h5"
    try:
        slide = wsi.open_slide(slide_path)
        features, coords = bags.read_bag(bag)
        size0 = int(bags.read_bag_attrs(bag).get("patch_size", 0))
    except (OSError, ValueError) as e:
        raise RunError(str(e)) from None
    if coords is None or size0 <= 0:
        raise RunError(f"{bag} has no coords with a patch_size attribute; a heatmap needs them")
    if model is None:
        fold_cfg = _fold_config(cfg, max(cfg.fold, 0))
        model = application.build_model(fold_cfg)
        out = Path(fold_cfg.out_dir)
        weights = Path(cfg.weights) if cfg.weights else (
            out / "best.safetensors" if (out / "best.safetensors").exists() else out / "model.safetensors")
        load_weights(model, weights)
    with torch.no_grad():
        scores = model.eval()(features, coords)["scores"]
    if scores is None:
        raise RunError(f"{cfg.model} gives no per-instance scores to draw; use mambamil, abmil or meanmil")
    output = Path(cfg.output) if cfg.output else Path(cfg.out_dir or "runs/mil") / f"heatmap_{slide_path.stem}.png"
    draw_heatmap(wsi.thumbnail(slide), slide.dimensions, coords.numpy(), size0, scores.float().numpy(), output,
                 f"{cfg.model} scores over {slide_path.name}")
    print(f"mil heatmap: {len(coords)} tiles of {slide_path.name} -> {output}", flush=True)
    return output


# ----------------------------------------------------------------------------------------------
# demo on the embedded slide


def _demo_bags(root: Path, features: torch.Tensor, coords: np.ndarray, key: np.ndarray, train_tiles: np.ndarray,
               n_train: int, n_eval: int, bag_size: int, seed: int) -> None:
    """CLAM bags of real tiles of the slide: train bags from the `train_tiles`, eval bags from the others;
    a positive bag holds 1-3 key tiles among ordinary ones, a negative bag none. One bag per case."""
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
            bags.write_bag(root, bag_id, features[idx], torch.from_numpy(coords[idx]))
            rows.append(f"{bag_id},{bag_id},{'dense_nuclei' if positive else 'ordinary'}")
            split[part].append(bag_id)
    (root / "slides.csv").write_text("case_id,slide_id,label\n" + "\n".join(rows) + "\n")
    bags.write_splits(root / "splits", [split])


def run_demo(app: MilApp, out: Path, smoke: bool) -> ReportSection:
    """Tile and encode the embedded slide, build bags of its real tiles labelled by measured stain content,
    train MambaMIL against ABMIL and mean pooling, and draw MambaMIL's attention over the slide.

    Runs single-threaded (restored afterwards): bags of a dozen instances are too small for intra-op
    threads to pay off, and on a shared machine the spinning threads make every step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo(app, out, smoke)
    finally:
        torch.set_num_threads(threads)


def _demo(app: MilApp, out: Path, smoke: bool) -> ReportSection:
    import time

    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    start = time.perf_counter()
    ecfg = ExtractConfig(out=str(out / "features"), backbone="resnet10t", random_init=True,
                         patch_size=256 if smoke else 128, image_size=64 if smoke else 128, min_tissue=0.5)
    ecfg.validate()
    n_tiles = extract(ecfg)[wsi.EMBEDDED_SLIDE.stem]
    slide_bag = Path(ecfg.out) / "h5_files" / f"{wsi.EMBEDDED_SLIDE.stem}.h5"
    features, coords_t = bags.read_bag(slide_bag)
    # random-init features are tiny and offset; standardise them over the slide's tiles
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    coords = coords_t.numpy()
    slide = wsi.open_slide(wsi.EMBEDDED_SLIDE)
    tiling = wsi.tile_slide(slide, ecfg.patch_size, ecfg.target_mpp, ecfg.min_tissue)
    haematoxylin = wsi.stain_density(np.stack([wsi.read_tile(slide, xy, tiling) for xy in coords]))[:, 0]
    key = haematoxylin >= np.quantile(haematoxylin, 0.75)
    # tiles split at random into training and evaluation tiles, a quarter of each being key tiles
    train_tiles = np.zeros(len(coords), bool)
    rng = np.random.default_rng(0)
    for group in (np.flatnonzero(key), np.flatnonzero(~key)):
        train_tiles[rng.permutation(group)[: len(group) // 2]] = True
    data_dir = out / "bags"
    _demo_bags(data_dir, features, coords, key, train_tiles, n_train=12 if smoke else 96, n_eval=8 if smoke else 32,
               bag_size=8 if smoke else 12, seed=0)
    extract_s = time.perf_counter() - start

    base = dict(data_dir=str(data_dir), split_dir=str(data_dir / "splits"), k=1, fold=0, d_model=16 if smoke else 64,
                epochs=1.0 if smoke else 2.0, lr=1e-3, dropout=0.0, overwrite=True, log_every=10 ** 6, seed=0)
    runs = {"mambamil": dict(model="mambamil", init="mamba"),
            "mambamil (reference init)": dict(model="mambamil", init="reference"),
            "abmil": dict(model="abmil"), "meanmil": dict(model="meanmil")}
    results, models = {}, {}
    for label, options in runs.items():
        cfg = MilConfig(out_dir=str(out / label.replace(" (reference init)", "_reference_init")), **options, **base)
        cfg.validate()
        runner = Runner(app, _fold_config(cfg, 0))
        results[label] = runner.train().metrics
        models[label] = runner.model.cpu().eval()
    m = results["mambamil"]

    hm_cfg = HeatmapConfig(out_dir=str(out / "mambamil"), model="mambamil", bag_dir=ecfg.out,
                           output=str(out / "heatmap.png"), **{k: v for k, v in base.items() if k != "overwrite"})
    heat = heatmap(hm_cfg, model=models["mambamil"])
    thumb = wsi.thumbnail(slide)
    sx = thumb.shape[1] / slide.dimensions[0]
    fig = Figure(figsize=(6, 6 * thumb.shape[0] / thumb.shape[1] + 0.4), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.imshow(thumb)
    for (x, y), k, t in zip(coords, key, train_tiles):
        ax.add_patch(Rectangle((x * sx, y * sx), tiling.size0 * sx, tiling.size0 * sx, fill=False, lw=0.9,
                               ls="-" if t else ":", color="tab:purple" if k else "tab:green"))
    ax.set_axis_off()
    ax.set_title("tissue tiles: purple = densest haematoxylin quartile; solid = training tiles, dotted = eval tiles",
                 fontsize=8)
    tiles_png = out / "tiles.png"
    fig.savefig(tiles_png)

    n_params = sum(p.numel() for p in models["mambamil"].parameters())
    text = (
        f"Pipeline demonstration on the embedded slide (CMU-1-Small-Region, a CC0 Aperio SVS of "
        f"{slide.dimensions[0]}x{slide.dimensions[1]} px at 0.499 µm/px): HSV-saturation tissue mask, "
        f"{n_tiles} tissue tiles of {ecfg.patch_size} px at {ecfg.target_mpp} µm/px (level-0 coords, row-major), "
        f"encoded by a randomly initialised timm `{ecfg.backbone}` (no pretrained weights offline) into a CLAM bag; "
        "the features are standardised over the slide's tiles.\n\n"
        "This is not a clinical task: there is one slide and no diagnosis. Bag labels come from measured tile "
        "content: colour deconvolution (Ruifrok-Johnston stain vectors) gives each tile's mean haematoxylin "
        "density; tiles in the slide's top quartile are 'dense-nuclei' key tiles. A positive bag holds 1-3 key "
        "tiles "
        f"among ordinary ones, a negative bag none ({ecfg.patch_size} px tiles, "
        f"{'8' if smoke else '12'} per bag). The tiles are split at random in half (a quarter of each half "
        "being key tiles); train bags use only the training tiles, eval bags only the others, so no tile is "
        "shared between training and evaluation (neighbouring tiles are alike, so this is a pipeline check, "
        "not a generalisation claim).\n\n"
        f"MambaMIL (2 SR-Mamba layers, rate 5, width {base['d_model']}, {n_params:,} parameters), once with "
        "Mamba's initialisation and once with the reference code's (xavier on every Linear, dt bias 0), is "
        "compared with gated ABMIL and mean pooling of instance logits under the same training (AdamW, lr 1e-3, "
        f"{base['epochs']:g} epochs, one bag per step); chance AUC is 0.5. The heatmap shows MambaMIL's "
        "attention over every tile of the slide.")
    metrics = {f"AUC {name}": r["auc"] for name, r in results.items()}
    metrics.update({"chance AUC": 0.5, "balanced accuracy mambamil": m["balanced_acc"], "F1 mambamil": m["f1"],
                    "tiles": n_tiles, "tiling + features + bags (s)": round(extract_s, 1)})
    rows = [[name, f"{r['auc']:.3f}", f"{r['balanced_acc']:.3f}", f"{r['f1']:.3f}", f"{r['loss']:.3f}"]
            for name, r in results.items()]
    table = Table("Held-out bags (evaluation tiles only)", ["model", "AUC", "balanced acc", "macro F1", "loss"], rows)
    return ReportSection("Whole-slide MIL with MambaMIL (ssmkit mil)", text, metrics,
                         images=[tiles_png, heat], tables=[table])
