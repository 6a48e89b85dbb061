"""`ssmkit mil`: whole-slide multiple-instance learning with MambaMIL and its baselines.

    ssmkit mil extract   slide folder (or the embedded slide) -> CLAM bags (h5_files/, pt_files/)
    ssmkit mil train     k-fold training with the shared runner, one run folder per fold (fold_<k>/)
    ssmkit mil eval      every fold's weights on its val set; per-fold and mean +- std table
    ssmkit mil heatmap   a fold's per-tile scores (attention) drawn over a slide thumbnail (PNG)

Data: a CLAM feature folder (`--data-dir`, with `slides.csv` or `--csv`: case_id, slide_id, label, or
survival_months + censorship for `--task survival`). Every bag is opened (not loaded) before training,
so a missing, unreadable or mis-shaped bag is reported by name at once. Splits are read from
`--split-dir` (`splits_{k}.csv`) or generated, grouped by patient; a patient in two parts of a split
is refused unless `--allow-leakage` (then it is a loud warning). Without `--data-dir` each fold's run
uses synthetic CLAM bags with a planted signal, generated deterministically into its folder.
Metrics: AUC (binary, or macro one-vs-rest), balanced accuracy and macro F1 for classification;
Harrell's c-index for survival.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ssmkit.apps.application import Application, Command, RunContext, RunSpec, build_registered, eval_config, load_run
from ssmkit.apps.config import (ConfigError, DeviceOptions, EvalOptions, ModelOptions, RunOptions, SeedOptions,
                                TrainOptions, WeightsOptions, compose, option, replace)
from ssmkit.apps.report import ReportSection, Table
from ssmkit.apps.run_folder import RunFolder
from ssmkit.apps.runner import RunResult, Runner, evaluate_run
from ssmkit.errors import DataError
from ssmkit.medical import data as bags
from ssmkit.medical import wsi
from ssmkit.medical.metrics import classification_metrics
from ssmkit.medical.plots import draw_heatmap, draw_tiles
from ssmkit.medical.survival import concordance_index, nll_survival_loss, risk_score, survival_bins

__all__ = ["MilData", "Folds", "MilTrain", "MilExtract", "MilHeatmap", "MilApp", "application", "extract", "heatmap",
           "fold_summary"]


@dataclass
class MilData:
    """The feature bags and what they predict."""

    title = "data"
    data_dir: str = option("", "CLAM feature folder (h5_files/, pt_files/); empty: synthetic planted-signal bags, "
                               "written into the run folder")
    csv: str = option("", "slide table (empty: <data-dir>/slides.csv)")
    task: str = option("classification", "what the bags predict", ("classification", "survival"))
    in_dim: int = option(0, "expected feature width of the bags (0: whatever width they share)")
    n_bins: int = option(4, "survival time bins (quartiles of the uncensored times)")
    synthetic_cases: int = option(64, "patients of the generated synthetic data (without --data-dir)")
    synthetic_dim: int = option(32, "feature width of the generated synthetic data")

    def check(self) -> None:
        if self.in_dim < 0 or self.n_bins < 2 or self.synthetic_cases < 1 or self.synthetic_dim < 1:
            raise ConfigError("need in_dim >= 0, n_bins >= 2, synthetic_cases >= 1 and synthetic_dim >= 1")


@dataclass
class Folds:
    """Which splits of the patients to train and evaluate on."""

    title = "folds"
    split_dir: str = option("", "folder of splits_{k}.csv (empty: generate patient-grouped splits)")
    split_mode: str = option("kfold", "generated splits: disjoint patient folds, or CLAM's Monte Carlo draws",
                             ("kfold", "montecarlo"))
    k: int = option(5, "number of folds / splits")
    fold: int = option(-1, "the fold to train or evaluate (-1: all)")
    allow_leakage: bool = option(False, "accept splits with a patient in two parts (warn instead of refusing)")

    def check(self) -> None:
        if self.k < 1 or self.fold >= self.k or self.fold < -1:
            raise ConfigError(f"need k >= 1 and -1 <= fold < k, got k={self.k}, fold={self.fold}")
        if self.k < 2 and not self.split_dir and self.split_mode == "kfold":
            raise ConfigError("generated k-fold splits need --k 2 or more (or --split-dir / --split-mode montecarlo)")


@dataclass
class SurvivalLoss:
    """The survival objective."""

    title = "loss"
    alpha_surv: float = option(0.0, "weight of the uncensored term in the survival NLL (MambaMIL: 0)")

    def check(self) -> None:
        if not 0 <= self.alpha_surv <= 1:
            raise ConfigError(f"alpha_surv must be in [0, 1], got {self.alpha_surv}")


@dataclass
class ExtractOptions:
    """Slides -> tiles -> features -> CLAM bags."""

    title = "extract"
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

    def check(self) -> None:
        if self.patch_size < 8 or self.image_size < 8 or self.batch_size < 1 or self.target_mpp <= 0:
            raise ConfigError("need patch_size >= 8, image_size >= 8, batch_size >= 1 and target_mpp > 0")
        if not 0 <= self.min_tissue <= 1:
            raise ConfigError(f"min_tissue must be in [0, 1], got {self.min_tissue}")


@dataclass
class HeatmapOptions:
    """The slide to draw a fold's per-tile scores over."""

    title = "heatmap"
    slide: str = option("", "slide file (empty: the embedded slide)")
    bag_dir: str = option("", "CLAM folder with the slide's bag h5_files/<slide stem>.h5 (empty: the run's data)")
    fold: int = option(0, "the fold whose model draws the scores")
    output: str = option("", "PNG path (empty: <out-dir>/heatmap_<slide>.png)")


MilTrain = compose("MilTrain", RunOptions, SeedOptions, MilData, Folds, ModelOptions, SurvivalLoss, TrainOptions,
                   EvalOptions, DeviceOptions, defaults=dict(
                       model="mambamil", epochs=10.0, batch_size=1, lr=2e-4, warmup_steps=0, weight_decay=1e-5,
                       log_every=50, eval_batch_size=1),
                   doc="`ssmkit mil train`: bags, folds, model and training (one bag per step).")
MilExtract = compose("MilExtract", ExtractOptions, doc="`ssmkit mil extract`: slides to CLAM feature bags.")
MilHeatmap = compose("MilHeatmap", RunOptions, WeightsOptions, HeatmapOptions,
                     doc="`ssmkit mil heatmap`: a trained fold's per-tile scores over a slide.")


# ----------------------------------------------------------------------------------------------
# data


def _data_root(cfg) -> Path:
    """--data-dir, or the synthetic bags of the run folder."""
    if cfg.data_dir:
        root = Path(cfg.data_dir)
        if not root.is_dir():
            raise DataError(f"--data-dir {root} does not exist")
        return root
    return RunFolder.of(cfg, "mil") / "synthetic"


def _split(cfg, cases: list, fold: int) -> dict[str, list[str]]:
    if cfg.split_dir:
        split = bags.read_splits(Path(cfg.split_dir) / f"splits_{fold}.csv")
    else:
        split = bags.make_splits(cases, cfg.k, cfg.split_mode, seed=cfg.seed)[fold]
    bags.check_leakage(split, cases, strict=not cfg.allow_leakage, where=f"split {fold}")
    return split


def _fold_dir(cfg, fold: int) -> Path:
    return RunFolder.of(cfg, "mil") / f"fold_{fold}"


def _folds(cfg) -> list[int]:
    return list(range(cfg.k)) if cfg.fold < 0 else [cfg.fold]


def _fold_config(cfg, fold: int):
    """The configuration of one fold's run: its own folder, and c-index selection for survival."""
    best = cfg.best_metric or ("c_index" if cfg.task == "survival" else "loss")
    return replace(cfg, fold=fold, out_dir=str(_fold_dir(cfg, fold)), best_metric=best)


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
    train_config = MilTrain
    data_groups = (MilData, Folds)
    metrics = {"loss": "min", "auc": "max", "balanced_acc": "max", "f1": "max", "c_index": "max"}
    meta_must_match = ("labels", "in_dim", "n_outputs")

    def prepare(self, cfg) -> None:
        root = _data_root(cfg)
        if not cfg.data_dir and not (root / "slides.csv").is_file():
            bags.make_synthetic_bags(root, n_cases=cfg.synthetic_cases, dim=cfg.synthetic_dim, seed=cfg.seed)

    def setup(self, cfg) -> RunSpec:
        root = _data_root(cfg)
        csv_path = Path(cfg.csv) if cfg.csv else root / "slides.csv"
        cases = bags.read_cases(csv_path, cfg.task)
        labels, edges = {}, None
        if cfg.task == "classification":
            labels = {name: i for i, name in enumerate(sorted({c.label for c in cases}))}
            if len(labels) < 2:
                raise DataError(f"{csv_path}: classification needs at least two labels, found {sorted(labels)}")
        else:
            edges = survival_bins([c.time for c in cases], [c.censorship for c in cases], cfg.n_bins)
        fold = max(cfg.fold, 0)
        split = _split(cfg, cases, fold)
        parts = []
        for part in ("train", "val"):
            wanted = set(split[part])
            chosen = [c for c in cases if wanted & set(c.slide_ids)]
            if not chosen:
                raise DataError(f"split {fold} has no {part} slides found in {csv_path}")
            parts.append(bags.BagDataset(root, chosen, cfg.task, labels, edges, in_dim=cfg.in_dim))
        if parts[0].in_dim != parts[1].in_dim:
            raise DataError(f"{root}: the train bags have feature width {parts[0].in_dim}, the val bags "
                            f"{parts[1].in_dim}")
        meta = {"in_dim": parts[0].in_dim, "n_outputs": len(labels) if labels else cfg.n_bins, "labels": labels,
                "edges": None if edges is None else [float(e) for e in edges]}
        return RunSpec(parts[0], parts[1], meta, f"the {len(parts[1])} val patients of split {fold} of {root}")

    def build_model(self, ctx: RunContext) -> torch.nn.Module:
        return build_registered(ctx.cfg, in_dim=ctx.meta["in_dim"], n_classes=ctx.meta["n_outputs"])

    def collate(self, samples: list) -> list:
        return samples  # bags differ in length: each is run on its own

    @staticmethod
    def _bag_loss(logits: torch.Tensor, bag: dict, cfg) -> torch.Tensor:
        if cfg.task == "survival":
            return nll_survival_loss(logits, bag["bin"].view(1), bag["censorship"].view(1), cfg.alpha_surv)
        return F.cross_entropy(logits.float(), bag["label"].view(1))

    def train_loss(self, model, batch: list, ctx: RunContext) -> torch.Tensor:
        return torch.stack([self._bag_loss(model(b["features"], b["coords"])["logits"], b, ctx.cfg)
                            for b in batch]).mean()

    def eval_step(self, model, batch: list, ctx: RunContext) -> dict[str, torch.Tensor]:
        logits = [model(b["features"], b["coords"])["logits"].float() for b in batch]
        out = {"loss": torch.stack([self._bag_loss(x, b, ctx.cfg) for x, b in zip(logits, batch)])}
        if ctx.cfg.task == "survival":
            out["risk"] = torch.cat([risk_score(x) for x in logits])
            out["time"] = torch.stack([b["time"] for b in batch])
            out["event"] = torch.stack([1 - b["censorship"] for b in batch])
        else:
            out["prob"] = torch.cat([torch.softmax(x, -1) for x in logits])
            out["label"] = torch.stack([b["label"] for b in batch])
        return out

    def compute_metrics(self, outputs: dict[str, torch.Tensor], ctx: RunContext) -> dict[str, float]:
        metrics = {"loss": outputs["loss"].double().mean().item()}
        if "risk" in outputs:
            metrics["c_index"] = concordance_index(outputs["time"], outputs["event"], outputs["risk"])
            return metrics
        return {**metrics, **classification_metrics(outputs["prob"].numpy(), outputs["label"].numpy())}

    def commands(self) -> list[Command]:
        return [
            Command("extract", "tile slides at a target µm/px and encode the tiles with a timm backbone into "
                               "CLAM bags", MilExtract, extract),
            Command("train", "k-fold training (one run folder per fold) and a per-fold metrics table", MilTrain,
                    self.train_folds),
            Command("eval", "evaluate every fold's weights on its val set; per-fold and mean ± std table",
                    eval_config(self), self.eval_folds),
            Command("heatmap", "draw a trained fold's per-tile scores over a slide thumbnail (PNG)", MilHeatmap,
                    heatmap),
        ]

    def train_folds(self, cfg) -> dict[int, RunResult]:
        """Train each selected fold with the shared runner; prints and writes the fold summary."""
        runs = {f: Runner(self, _fold_config(cfg, f)).train() for f in _folds(cfg)}
        self._write_summary(cfg, {f: r.metrics for f, r in runs.items()}, "train_summary")
        return runs

    def eval_folds(self, cfg) -> dict[int, dict[str, float]]:
        """Evaluate each trained fold of the run folder (or --fold) on its val set."""
        folder = RunFolder.of(cfg, self.name)
        folds = [cfg.fold] if cfg.fold >= 0 else sorted(int(p.name[5:]) for p in folder.path.glob("fold_*"))
        if not folds:
            raise DataError(f"{folder} holds no fold_<k> runs; train them with `ssmkit mil train --out-dir {folder}`")
        per_fold = {f: evaluate_run(self, replace(cfg, out_dir=str(folder / f"fold_{f}"))).metrics for f in folds}
        self._write_summary(cfg, per_fold, "eval_summary")
        return per_fold

    def _write_summary(self, cfg, per_fold: dict, stem: str) -> None:
        table = fold_summary(per_fold)
        folder = RunFolder.of(cfg, self.name)
        folder.write_json(f"{stem}.json", {str(k): v for k, v in per_fold.items()})
        lines = [" | ".join(map(str, table.columns)), *(" | ".join(map(str, r)) for r in table.rows)]
        print(f"mil ({folder}), {len(per_fold)} fold(s):\n  " + "\n  ".join(lines), flush=True)

    def demo(self, out_dir: Path, smoke: bool) -> ReportSection:
        return run_demo(self, Path(out_dir) / self.name, smoke)


application = MilApp()


# ----------------------------------------------------------------------------------------------
# extract and heatmap


def _slides(cfg) -> list[Path]:
    if not cfg.slide_dir:
        return [wsi.EMBEDDED_SLIDE]
    folder = Path(cfg.slide_dir)
    if not folder.is_dir():
        raise DataError(f"--slide-dir {folder} does not exist")
    found = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in wsi.SLIDE_SUFFIXES}
    if cfg.csv:
        wanted = bags.read_slide_ids(cfg.csv)
        missing = [s for s in wanted if s not in found]
        if missing:
            raise DataError(f"{len(missing)} slide(s) listed in {cfg.csv} are not in {folder}: {', '.join(missing[:5])}")
        return [found[s] for s in wanted]
    if not found:
        raise DataError(f"{folder} holds no slides ({', '.join(wsi.SLIDE_SUFFIXES)})")
    return list(found.values())


def extract(cfg) -> dict[str, int]:
    """Write a CLAM bag per slide; returns slide id -> number of tiles. The slides and the backbone are
    checked before any slide is tiled."""
    slides = _slides(cfg)
    for path in slides:
        wsi.open_slide(path)
    encoder = wsi.FeatureExtractor(cfg.backbone, cfg.weights, cfg.random_init, cfg.image_size, cfg.seed)
    counts = {}
    for path in slides:
        h5, n = wsi.extract_slide(path, cfg.out, encoder, cfg.patch_size, cfg.target_mpp, cfg.min_tissue,
                                  cfg.batch_size, cfg.slide_mpp)
        counts[path.stem] = n
        print(f"mil extract: {path.name}: {n} tiles of {cfg.patch_size} px at {cfg.target_mpp} µm/px -> {h5}",
              flush=True)
    return counts


def heatmap(cfg) -> Path:
    """Score the slide's bag with a trained fold's model and draw the scores over the slide's thumbnail."""
    folder = RunFolder.of(cfg, "mil")
    run = load_run(application, replace(cfg, out_dir=str(folder / f"fold_{cfg.fold}")))
    stem = Path(cfg.slide).stem if cfg.slide else wsi.EMBEDDED_SLIDE.stem
    return draw_scores(run.model, run.cfg.model, cfg.slide, cfg.bag_dir or str(_data_root(run.cfg)),
                       Path(cfg.output) if cfg.output else folder / f"heatmap_{stem}.png")


def draw_scores(model, name: str, slide: str, bag_dir: str, output: Path) -> Path:
    """The per-tile scores of `model` on the bag of `slide` (in `bag_dir`) drawn over the slide."""
    slide_path = Path(slide) if slide else wsi.EMBEDDED_SLIDE
    bag = Path(bag_dir) / "h5_files" / f"{slide_path.stem}.h5"
    opened = wsi.open_slide(slide_path)
    features, coords = bags.read_bag(bag)
    size0 = int(bags.read_bag_attrs(bag).get("patch_size", 0))
    if coords is None or size0 <= 0:
        raise DataError(f"{bag} has no coords with a patch_size attribute; a heatmap needs them")
    with torch.no_grad():
        scores = model.eval()(features, coords)["scores"]
    if scores is None:
        raise ConfigError(f"{name} gives no per-instance scores to draw; use mambamil, abmil or meanmil")
    draw_heatmap(wsi.thumbnail(opened), opened.dimensions, coords.numpy(), size0, scores.float().numpy(), output,
                 f"{name} scores over {slide_path.name}")
    print(f"mil heatmap: {len(coords)} tiles of {slide_path.name} -> {output}", flush=True)
    return output


# ----------------------------------------------------------------------------------------------
# demo on the embedded slide


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
    start = time.perf_counter()
    ecfg = MilExtract(out=str(out / "features"), backbone="resnet10t", random_init=True,
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
    bags.make_demo_bags(data_dir, features, coords, key, train_tiles, n_train=12 if smoke else 96,
                        n_eval=8 if smoke else 32, bag_size=8 if smoke else 12, seed=0)
    extract_s = time.perf_counter() - start

    width = 16 if smoke else 64
    base = dict(data_dir=str(data_dir), split_dir=str(data_dir / "splits"), k=1, fold=0,
                epochs=1.0 if smoke else 2.0, lr=1e-3, overwrite=True, log_every=10 ** 6, seed=0)
    runs = {"mambamil": ("mambamil", f"d_model={width},dropout=0.0,init=mamba"),
            "mambamil (reference init)": ("mambamil", f"d_model={width},dropout=0.0,init=reference"),
            "abmil": ("abmil", f"d_model={width},dropout=0.0"), "meanmil": ("meanmil", f"d_model={width},dropout=0.0")}
    results, models = {}, {}
    for label, (model, kwargs) in runs.items():
        cfg = MilTrain(out_dir=str(out / label.replace(" (reference init)", "_reference_init")), model=model,
                       model_kwargs=kwargs, **base)
        cfg.validate()
        run = app.train_folds(cfg)[0]
        results[label], models[label] = run.metrics, run.model.cpu()
    m = results["mambamil"]

    heat = draw_scores(models["mambamil"], "mambamil", "", ecfg.out, out / "heatmap.png")
    tiles_png = draw_tiles(wsi.thumbnail(slide), slide.dimensions, coords, tiling.size0, key, train_tiles,
                           out / "tiles.png", "tissue tiles: purple = densest haematoxylin quartile; solid = "
                                              "training tiles, dotted = eval tiles")
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
        f"MambaMIL (2 SR-Mamba layers, rate 5, width {width}, {n_params:,} parameters), once with "
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
