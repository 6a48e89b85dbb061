"""`ssmkit classify`: image classification with Vision Mamba (Vim), ViG or any timm classifier.

    ssmkit classify train                                   # vim_tiny (CPU-sized) on the embedded digits
    ssmkit classify train --data fashion-mnist --steps 2000 # Debian's dataset-fashion-mnist
    ssmkit classify train --data path/to/folder             # class per subfolder (or train/ + val/)
    ssmkit classify eval                                    # the run's best weights on the test split
    ssmkit classify predict --images a.png,b.png            # top-k classes with probabilities

Models come from the ssmkit registry (`vim_tiny`, `vig_tiny`, ...) or, for other names, from timm; the
size options (`--img-size --patch-size --embed-dim --depth --drop-path-rate`) are passed to the
constructor with `num_classes` and `in_chans` taken from the data; `--model-kwargs` adds more
(e.g. `num_heads=4` for a DeiT). `eval` and `predict` read the run's saved config.toml and class list
(`classes.json`), so the model and data options need not be repeated; options typed on their command line
that differ from the defaults still win.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmkit.apps.config import ConfigError, TrainConfig, option, read_toml
from ssmkit.apps.report import ReportSection, Table
from ssmkit.apps.runner import Application, Command, Runner, RunError, atomic_write, eval_config, load_weights

__all__ = ["ClassifyConfig", "PredictConfig", "ClassifyApp", "application", "build_classifier", "mix_batch",
           "parse_model_kwargs"]

def _vdata():
    """ssmkit.vision.data, imported on first use: importing ssmkit.vision registers its models with timm,
    which `ssmkit --help` should not pay for."""
    from ssmkit.vision import data

    return data


# options that describe the model and its data (read back from a run's config.toml by eval/predict)
_RUN_FIELDS = ("model", "img_size", "patch_size", "embed_dim", "depth", "drop_path_rate", "model_kwargs", "data",
               "test_fraction", "on_bad_image", "seed")


@dataclass
class ClassifyConfig(TrainConfig):
    """Image classification: model, data, regularisation and (redeclared) training defaults."""

    model: str = option("vim_tiny", "ssmkit model name (vim_tiny, vig_tiny, ...) or a timm model name")
    img_size: int = option(16, "model input size: images are resized to img_size x img_size")
    patch_size: int = option(4, "patch size of the model's patch embedding")
    embed_dim: int = option(64, "model width (CPU-sized default; Vim-Ti uses 192)")
    depth: int = option(2, "number of blocks (CPU-sized default; Vim-Ti uses 24)")
    drop_path_rate: float = option(0.0, "stochastic depth rate")
    model_kwargs: str = option("", "extra constructor arguments, comma-separated key=value (e.g. num_heads=4)")
    data: str = option("digits", "digits (embedded, sklearn), fashion-mnist (Debian package), or a folder: "
                                 "class subfolders, train/+val/ subfolders, or MNIST-format IDX files")
    test_fraction: float = option(0.2, "held-out share of each class when the data has no test split")
    eval_size: int = option(0, "evaluate on a fixed class-balanced subset of about this many test images "
                               "(0: the whole test split; for slow models on large test sets)")
    on_bad_image: str = option("error", "an unreadable or truncated image file: skip it (with a warning) or fail",
                               ("skip", "error"))
    augment: bool = option(True, "light random-resized-crop augmentation for training")
    hflip: bool = option(False, "random horizontal flips for training (off: wrong for digits)")
    label_smoothing: float = option(0.1, "label smoothing of the training cross-entropy")
    mixup: float = option(0.0, "mixup Beta(alpha, alpha) parameter (0: off)")
    cutmix: float = option(0.0, "cutmix Beta(alpha, alpha) parameter (0: off); with mixup, one of the two per batch")
    steps: int = option(300, "optimizer steps to train for")
    batch_size: int = option(32, "samples per optimizer step, summed over all processes and accumulation steps")
    lr: float = option(2e-3, "peak learning rate of AdamW")
    warmup_steps: int = option(20, "steps of linear learning-rate warm-up from 0")
    eval_every: int = option(100, "evaluate every N steps (0: only at the end)")
    eval_batch_size: int = option(256, "samples per eval forward pass and process (0: the training micro-batch)")
    checkpoint_every: int = option(100, "write a resumable checkpoint every N steps (and at the end)")

    def validate(self) -> None:
        super().validate()
        for name in ("img_size", "patch_size", "embed_dim", "depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.patch_size > self.img_size:
            raise ConfigError(f"patch_size ({self.patch_size}) is larger than img_size ({self.img_size})")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.eval_size < 0:
            raise ConfigError(f"eval_size must not be negative, got {self.eval_size}")
        for name in ("drop_path_rate", "mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        parse_model_kwargs(self.model_kwargs)


@dataclass
class PredictConfig(ClassifyConfig):
    """`classify predict`: the run's options plus the images to classify."""

    images: str = option("", "image files to classify: comma-separated files, folders or glob patterns")
    top_k: int = option(5, "how many classes to print per image")
    weights: str = option("", "weights to use (empty: out_dir/best.safetensors, else out_dir/model.safetensors)")

    def validate(self) -> None:
        super().validate()
        if not self.images.strip():
            raise ConfigError("predict needs --images (files, folders or glob patterns, comma-separated)")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {self.top_k}")


def parse_model_kwargs(text: str) -> dict:
    """`"a=1,b=0.5,c=true,d=name"` -> {"a": 1, "b": 0.5, "c": True, "d": "name"}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"model_kwargs: {item!r} is not key=value")
        value = value.strip()
        if value.lower() in ("true", "false"):
            parsed = value.lower() == "true"
        else:
            try:
                parsed = int(value)
            except ValueError:
                try:
                    parsed = float(value)
                except ValueError:
                    parsed = value
        out[key.strip()] = parsed
    return out


def build_classifier(name: str, num_classes: int, in_chans: int, img_size: int, patch_size: int, embed_dim: int,
                     depth: int, drop_path_rate: float = 0.0, **extra) -> nn.Module:
    """A classifier from the ssmkit registry (`vim_tiny`, or `ssmkit_vim_tiny` as in timm), else from timm."""
    import ssmkit

    kwargs = dict(num_classes=num_classes, in_chans=in_chans, img_size=img_size, patch_size=patch_size,
                  embed_dim=embed_dim, depth=depth, drop_path_rate=drop_path_rate, **extra)
    own = name[len("ssmkit_"):] if name.startswith("ssmkit_") else name
    if own in ssmkit.list_models():
        return ssmkit.create_model(own, **kwargs)
    try:
        import timm
    except Exception as e:  # timm needs a working torchvision
        raise RunError(f"model {name!r} is not an ssmkit model, and timm cannot be imported ({e})") from None
    if not timm.is_model(name):
        raise RunError(f"unknown model {name!r}: not in ssmkit.list_models() ({', '.join(ssmkit.list_models('vi*'))}"
                       f"...) nor in timm.list_models()")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, AssertionError, ValueError, RuntimeError) as e:
        raise RunError(f"timm cannot build {name} with {kwargs}: {e} "
                       "(adjust the size options or --model-kwargs)") from None


def mix_batch(x: torch.Tensor, y: torch.Tensor, mixup: float, cutmix: float):
    """Mixup or CutMix of a batch with its reverse (drawn from torch's global RNG, which the runner seeds
    and checkpoints): returns (mixed x, y, y reversed, weight of y)."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand(()) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    x2, y2 = x.flip(0), y.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
        t, b = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        l, r = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., t:b, l:r] = x2[..., t:b, l:r]
        lam = 1 - (b - t) * (r - l) / (h * w)
    else:
        x = lam * x + (1 - lam) * x2
    return x, y, y2, lam


class ClassifyApp(Application):
    """Train, evaluate and apply an image classifier; metrics are top-1 accuracy, top-5 and NLL."""

    name = "classify"
    help = "image classification with Vision Mamba / ViG (or any timm model) on digits, Fashion-MNIST or folders"
    config = ClassifyConfig
    metrics = {"accuracy": "max", "nll": "min", "top5": "max"}
    # the demo's configuration overrides (tests replace them to use a tiny model)
    demo_overrides: dict = {}
    # the configuration of the current run (train_loss reads label smoothing and mixup from it)
    _train_cfg = ClassifyConfig()

    # -- data and model ----------------------------------------------------------------------------

    def raw_datasets(self, cfg: ClassifyConfig):
        """(train, test) raw datasets (images in [0, 1], before resizing) of `cfg.data`."""
        vdata = _vdata()
        name = cfg.data.strip()
        channels = 1
        if name == "digits":
            train, test = vdata.load_digits_split(cfg.seed, cfg.test_fraction)
        elif name in ("fashion-mnist", "fashion_mnist"):
            train, test = vdata.load_fashion_mnist()
        else:
            root = Path(name).expanduser()
            if not root.is_dir():
                raise RunError(f"--data {name!r}: not 'digits', 'fashion-mnist' or an existing folder")
            if any(root.glob("train-images-idx3-ubyte*")):
                train, test = vdata.load_idx_folder(root)
            else:
                channels = 3
                train, test = vdata.load_image_folder(root, cfg.seed, cfg.test_fraction, channels=channels,
                                                      on_bad_image=cfg.on_bad_image, min_size=cfg.patch_size)
        try:
            for part in (train, test):
                part.check_min_size(cfg.patch_size)
        except vdata.DataError as e:
            raise RunError(f"{e}: lower --patch-size or use larger images") from None
        return train, test

    def transforms(self, cfg: ClassifyConfig, channels: int):
        vdata = _vdata()
        mean, std = (0.5,) * channels, (0.5,) * channels
        train = vdata.ImageTransform(cfg.img_size, mean, std, train=cfg.augment, hflip=cfg.hflip)
        return train, vdata.ImageTransform(cfg.img_size, mean, std, train=False)

    def build_datasets(self, cfg: ClassifyConfig):
        vdata = _vdata()
        try:
            train, test = self.raw_datasets(cfg)
        except vdata.DataError as e:
            raise RunError(str(e)) from None
        t_train, t_eval = self.transforms(cfg, train.channels)
        self._train_cfg, self._classes = cfg, list(train.classes)
        self._shape, self._shape_key = (len(train.classes), train.channels), (cfg.data, cfg.seed)
        test = vdata.stratified_subset(test, cfg.eval_size, cfg.seed)
        return (vdata.ClassificationDataset(train, t_train, cfg.seed),
                vdata.ClassificationDataset(test, t_eval, cfg.seed))

    def data_shape(self, cfg: ClassifyConfig) -> tuple[int, int]:
        """(number of classes, channels) of `cfg.data` without decoding a folder twice when known."""
        shape = getattr(self, "_shape", None)
        if shape is None or getattr(self, "_shape_key", None) != (cfg.data, cfg.seed):
            train, _ = self.raw_datasets(cfg)
            shape = (len(train.classes), train.channels)
        self._shape, self._shape_key = shape, (cfg.data, cfg.seed)
        return shape

    def build_model(self, cfg: ClassifyConfig) -> nn.Module:
        num_classes, channels = self.data_shape(cfg)
        return build_classifier(cfg.model, num_classes, channels, cfg.img_size, cfg.patch_size, cfg.embed_dim,
                                cfg.depth, cfg.drop_path_rate, **parse_model_kwargs(cfg.model_kwargs))

    # -- training and evaluation -------------------------------------------------------------------

    def train_loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        cfg = self._train_cfg
        if cfg.mixup > 0 or cfg.cutmix > 0:
            x, y1, y2, lam = mix_batch(x, y, cfg.mixup, cfg.cutmix)
            logits = model(x).float()
            return (lam * F.cross_entropy(logits, y1, label_smoothing=cfg.label_smoothing)
                    + (1 - lam) * F.cross_entropy(logits, y2, label_smoothing=cfg.label_smoothing))
        return F.cross_entropy(model(x).float(), y, label_smoothing=cfg.label_smoothing)

    def eval_step(self, model, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = model(x).float()
        out = {"accuracy": (logits.argmax(-1) == y).float(), "nll": F.cross_entropy(logits, y, reduction="none")}
        if logits.shape[-1] > 5:
            out["top5"] = (logits.topk(5, dim=-1).indices == y[:, None]).any(-1).float()
        return out

    def _runner(self, cfg) -> Runner:
        self._train_cfg = cfg
        return Runner(self, cfg)

    # -- commands ----------------------------------------------------------------------------------

    def commands(self) -> list[Command]:
        return [
            Command("train", "train an image classifier (resumable; torchrun for several processes)",
                    self.config, self.train),
            Command("eval", "evaluate a run's weights on its test split (reads the run's config.toml)",
                    eval_config(self.config), self.evaluate),
            Command("predict", "print the top-k classes of image files with the run's weights",
                    PredictConfig, self.predict),
        ]

    def train(self, cfg: ClassifyConfig):
        runner = self._runner(cfg)
        result = runner.train()
        if runner.main:
            text = json.dumps({"classes": self._classes, "data": cfg.data}, indent=1) + "\n"
            atomic_write(runner.out_dir / "classes.json", lambda tmp: tmp.write_text(text))
        self.last_runner = runner
        return result

    @staticmethod
    def resolve(cfg):
        """`cfg` with the model and data options of the run in its out_dir (config.toml), except where the
        command line set a value other than the default."""
        saved_path = Path(cfg.out_dir or "runs/classify") / "config.toml"
        if not saved_path.is_file():
            return cfg
        saved = read_toml(saved_path, ClassifyConfig)
        defaults = {f.name: f.default for f in dataclasses.fields(ClassifyConfig)}
        updates = {k: saved[k] for k in _RUN_FIELDS if k in saved and getattr(cfg, k) == defaults[k]}
        return dataclasses.replace(cfg, **updates)

    def evaluate(self, cfg):
        cfg = self.resolve(cfg)
        return self._runner(cfg).evaluate(cfg.weights)

    def predict(self, cfg: PredictConfig) -> list[dict]:
        """Print and return the top-k classes of every image in `cfg.images`."""
        vdata = _vdata()
        cfg = self.resolve(cfg)
        out_dir = Path(cfg.out_dir or "runs/classify")
        classes_path = out_dir / "classes.json"
        if not classes_path.is_file():
            raise RunError(f"{classes_path} does not exist: predict needs a finished `classify train` run "
                           f"in --out-dir {out_dir}")
        classes = json.loads(classes_path.read_text())["classes"]
        channels = 3 if Path(cfg.data).expanduser().is_dir() and not any(
            Path(cfg.data).expanduser().glob("train-images-idx3-ubyte*")) else 1
        self._shape, self._shape_key = (len(classes), channels), (cfg.data, cfg.seed)
        model = self.build_model(cfg)
        if cfg.weights:
            weights = Path(cfg.weights)
        else:
            best = out_dir / "best.safetensors"
            weights = best if best.exists() else out_dir / "model.safetensors"
        load_weights(model, weights)
        model.eval()
        _, transform = self.transforms(cfg, channels)
        files = _expand_images(cfg.images)
        results = []
        k = min(cfg.top_k, len(classes))
        for path in files:
            try:
                x = vdata.load_image_file(path, channels)
            except vdata.DataError as e:
                if cfg.on_bad_image == "error":
                    raise RunError(str(e)) from None
                print(f"{path}: skipped ({e})", flush=True)
                continue
            with torch.no_grad():
                probs = model(transform(x)[None]).float().softmax(-1)[0]
            p, idx = probs.topk(k)
            top = [(classes[i], float(q)) for i, q in zip(idx.tolist(), p.tolist())]
            results.append({"image": str(path), "top": top})
            print(f"{path}: " + ", ".join(f"{c} {q:.3f}" for c, q in top), flush=True)
        return results

    # -- demo --------------------------------------------------------------------------------------

    def demo(self, out_dir: Path, smoke: bool) -> ReportSection:
        sizes = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, steps=8, batch_size=32, warmup_steps=2,
                     eval_every=0, log_every=4) if smoke else dict(steps=250, eval_every=50, log_every=50)
        sizes.update(self.demo_overrides)
        cfg = ClassifyConfig(out_dir=str(out_dir / self.name), overwrite=True, **sizes)
        cfg.validate()
        run = self.train(cfg)
        runner = self.last_runner
        model = runner.model.cpu().eval()
        _, test = self.build_datasets(cfg)
        xs = torch.stack([test[i][0] for i in range(len(test))])
        ys = torch.as_tensor(test.labels)
        with torch.no_grad():
            preds = torch.cat([model(xs[i:i + 256]).argmax(-1) for i in range(0, len(xs), 256)])
        classes = test.classes
        n = len(classes)
        confusion = torch.zeros(n, n, dtype=torch.long)
        confusion.index_put_((ys, preds), torch.ones_like(ys), accumulate=True)
        images = list(run.plots)
        images.append(_plot_confusion(confusion.numpy(), classes, run.out_dir / "plots" / "confusion.png"))
        images.append(_plot_grid(test, preds.numpy(), run.out_dir / "plots" / "predictions.png"))
        acc = run.metrics["accuracy"]
        n_params = sum(p.numel() for p in model.parameters())
        text = (
            f"`{cfg.model}` (embed_dim {cfg.embed_dim}, depth {cfg.depth}, patch {cfg.patch_size}, input "
            f"{cfg.img_size}x{cfg.img_size}, {n_params:,} parameters) classifies scikit-learn's bundled 8x8 "
            f"handwritten digits, upsampled to the model's input size: {len(test)} held-out images "
            f"(a fixed stratified {cfg.test_fraction:.0%} split, seed {cfg.seed}), the rest for training with a "
            f"light random-resized-crop augmentation and label smoothing {cfg.label_smoothing}.\n\n"
            f"Trained for {run.step} AdamW steps of {cfg.batch_size} images on {runner.device.type}. Chance is "
            f"{1 / n:.0%}. Run folder: `{run.out_dir}` (resumable checkpoints, logs, curves, classes.json for "
            f"`ssmkit classify predict`)."
        )
        metrics = {"top-1 accuracy": f"{acc:.2%}", "chance": f"{1 / n:.0%}",
                   "top-5 accuracy": f"{run.metrics.get('top5', float('nan')):.2%}",
                   "eval NLL (nats)": run.metrics["nll"], "train steps": run.step,
                   "training time (s)": round(run.wall_s, 1)}
        per_class = (confusion.diag().float() / confusion.sum(1).clamp(min=1).float()).tolist()
        table = Table("Per-class accuracy on the held-out digits", ["class", "images", "accuracy"],
                      [[c, int(confusion[i].sum()), f"{per_class[i]:.1%}"] for i, c in enumerate(classes)])
        runner.say(f"classify: top-1 accuracy {acc:.4f} (chance {1 / n:.2f})")
        return ReportSection("Image classification with Vision Mamba (ssmkit classify)", text, metrics,
                             images=images, tables=[table])


def _expand_images(spec: str) -> list[Path]:
    vdata = _vdata()
    files: list[Path] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        path = Path(item).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in vdata.IMAGE_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            matches = sorted(glob.glob(os.path.expanduser(item)))
            if not matches:
                raise RunError(f"image {item} does not exist")
            files += [Path(m) for m in matches]
    return files


def _plot_confusion(confusion: np.ndarray, classes: list[str], path: Path) -> Path:
    from matplotlib.figure import Figure

    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(5, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(confusion, cmap="Blues")
    n = len(classes)
    ax.set_xticks(range(n), classes, rotation=90 if max(map(len, classes)) > 2 else 0)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (held-out)")
    if n <= 12:
        top = confusion.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if confusion[i, j] > top / 2 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(path)
    return path


def _plot_grid(test, preds: np.ndarray, path: Path, n: int = 24) -> Path:
    from matplotlib.figure import Figure

    path.parent.mkdir(parents=True, exist_ok=True)
    n = min(n, len(test))
    labels = np.asarray(test.labels)
    wrong = np.flatnonzero(preds != labels)[: n // 3]  # show some mistakes beside a spread of the test set
    spread = [i for i in np.linspace(0, len(test) - 1, n).astype(int) if i not in set(wrong.tolist())]
    idx = np.sort(np.concatenate([spread[: n - len(wrong)], wrong]).astype(int))
    cols = 8
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(cols * 1.1, rows * 1.3), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, idx):
        x, y = test.base.raw(int(i))
        img = x.permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray_r" if img.shape[-1] == 1 else None)
        ok = preds[i] == y
        ax.set_title(f"{test.classes[preds[i]]}" + ("" if ok else f" ({test.classes[y]})"), fontsize=8,
                     color="green" if ok else "red")
    n_wrong = int((preds != labels).sum())
    fig.suptitle(f"held-out predictions: {len(wrong)} of the {n_wrong} mistakes among {len(test)} test images "
                 "(red, true class in brackets) beside an even spread of the rest", fontsize=9)
    fig.savefig(path)
    return path


application = ClassifyApp()
