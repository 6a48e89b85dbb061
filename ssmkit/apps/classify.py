"""`ssmkit classify`: image classification with Vision Mamba (Vim), ViG or any timm classifier.

    ssmkit classify train                                    # vim_micro on the embedded digits
    ssmkit classify train --data fashion-mnist --img-size 28 # Debian's dataset-fashion-mnist
    ssmkit classify train --data path/to/folder              # a class per subfolder (or train/ + val/)
    ssmkit classify train --model resnet18 --pretrained resnet18.safetensors   # any timm model
    ssmkit classify eval --out-dir runs/classify             # the run's best weights on its test split
    ssmkit classify predict --images a.png,b.png             # top-k classes with probabilities

`--model` is a registered ssmkit classifier (`vim_tiny`, `vig_small`, ... at their published sizes;
`vim_micro` is a small ssmkit variant for CPU) or any timm model, built with its own defaults; the
number of classes and input channels come from the data, `--img-size` is passed to models that take
it, and `--model-kwargs` changes anything else (e.g. depth=2,embed_dim=64). `--pretrained` loads
weights from a local file through timm (a new head when the class count differs).
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmkit.apps.application import Application, Command, RunContext, RunSpec, load_run
from ssmkit.apps.config import (ConfigError, DeviceOptions, EvalOptions, ModelOptions, RunOptions, SeedOptions,
                                TrainOptions, WeightsOptions, compose, option, parse_kwargs)
from ssmkit.apps.report import ReportSection, Table
from ssmkit.apps.runner import Runner, train_and_eval
from ssmkit.errors import DataError

__all__ = ["ClassifyData", "ClassifyModel", "Augmentation", "ClassifyTrain", "ClassifyPredict", "ClassifyApp",
           "application", "build_classifier"]


def _vision():
    """ssmkit.vision, imported on first use: importing it registers its models with timm, which
    `ssmkit --help` should not pay for."""
    import ssmkit.vision.data

    return ssmkit.vision.data


@dataclass
class ClassifyData:
    """The images: which data set, the model's input size, the held-out split."""

    title = "data"
    data: str = option("digits", "digits (embedded, sklearn), fashion-mnist (Debian package), or a folder: "
                                 "class subfolders, train/+val/ subfolders, or MNIST-format IDX files")
    img_size: int = option(16, "model input size: images are resized to img_size x img_size")
    test_fraction: float = option(0.2, "held-out share of each class when the data has no test split")
    eval_size: int = option(0, "evaluate on a fixed class-balanced subset of about this many test images "
                               "(0: the whole test split)")

    def check(self) -> None:
        if self.img_size < 1:
            raise ConfigError(f"img_size must be at least 1, got {self.img_size}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.eval_size < 0:
            raise ConfigError(f"eval_size must not be negative, got {self.eval_size}")


@dataclass
class ImageReading:
    """What to do with image files that cannot be read."""

    title = "image files"
    on_bad_image: str = option("error", "an unreadable or truncated image file: skip it (with a warning) or fail",
                               ("skip", "error"))


@dataclass
class ClassifyModel(ModelOptions):
    """The classifier: a registered ssmkit model or a timm model, and optional starting weights."""

    pretrained: str = option("", "local weights file to start from (.safetensors, .pth, .bin; read by timm): a new "
                                 "head when the class count differs, the first conv adapted to the channels")


@dataclass
class Augmentation:
    """Training-time augmentation and regularisation."""

    title = "augmentation"
    augment: bool = option(True, "light random-resized-crop augmentation for training")
    hflip: bool = option(False, "random horizontal flips for training (off: wrong for digits)")
    label_smoothing: float = option(0.1, "label smoothing of the training cross-entropy")
    mixup: float = option(0.0, "mixup Beta(alpha, alpha) parameter (0: off)")
    cutmix: float = option(0.0, "cutmix Beta(alpha, alpha) parameter (0: off); with mixup, one of the two per batch")

    def check(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError(f"mixup and cutmix must not be negative, got {self.mixup} and {self.cutmix}")


@dataclass
class PredictOptions:
    """The images to classify."""

    title = "predict"
    images: str = option("", "image files to classify: comma-separated files, folders or glob patterns")
    top_k: int = option(5, "how many classes to print per image")

    def check(self) -> None:
        if not self.images.strip():
            raise ConfigError("predict needs --images (files, folders or glob patterns, comma-separated)")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {self.top_k}")


ClassifyTrain = compose("ClassifyTrain", RunOptions, SeedOptions, ClassifyData, ImageReading, ClassifyModel,
                        Augmentation, TrainOptions, EvalOptions, DeviceOptions, defaults=dict(
                            model="vim_micro", steps=300, batch_size=32, lr=2e-3, warmup_steps=20, eval_every=100,
                            eval_batch_size=256, checkpoint_every=100),
                        doc="`ssmkit classify train`: data, model, augmentation and training.")
ClassifyPredict = compose("ClassifyPredict", RunOptions, WeightsOptions, ImageReading, PredictOptions,
                          doc="`ssmkit classify predict`: a trained run and the images to classify.")


def build_classifier(name: str, num_classes: int, in_chans: int, img_size: int, kwargs: dict,
                     pretrained: str = "") -> nn.Module:
    """A classifier through timm: an ssmkit classifier (`vim_tiny`, registered in timm as `ssmkit_vim_tiny`)
    at its published size or any timm model with its own defaults; `img_size` goes to models that take it.
    `pretrained`: a local weights file, loaded by timm (a new head when the class count differs, the first
    convolution adapted to the input channels; official Vim checkpoints are converted)."""
    import timm

    import ssmkit.vision  # noqa: F401  (registers the ssmkit classifiers with timm)

    timm_name = name if timm.is_model(name) else f"ssmkit_{name}"
    if not timm.is_model(timm_name):
        raise ConfigError(f"unknown model {name!r}: neither an ssmkit classifier ({', '.join(timm.list_models('ssmkit_*'))}"
                          f") nor a timm model")
    if pretrained and not Path(pretrained).is_file():
        raise DataError(f"--pretrained {pretrained} does not exist")
    base = dict(num_classes=num_classes, in_chans=in_chans, **kwargs)

    def create(**extra):
        try:
            return timm.create_model(timm_name, img_size=img_size, **base, **extra)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            return timm.create_model(timm_name, **base, **extra)  # CNNs take any input size

    try:
        model = create()
    except (TypeError, AssertionError, ValueError, KeyError) as e:
        raise ConfigError(f"timm cannot build {name} with {kwargs or 'its defaults'}: {e} (adjust --model-kwargs)") from None
    if not pretrained:
        return model
    try:
        return create(pretrained=True, pretrained_cfg_overlay=dict(file=str(pretrained)))
    except Exception as e:  # an unreadable file or weights of another model surface as many error types
        raise DataError(f"--pretrained {pretrained} does not fit {name}: {type(e).__name__}: "
                        f"{(str(e).splitlines() or ['?'])[0][:300]}") from None


class ClassifyApp(Application):
    """Train, evaluate and apply an image classifier; metrics are top-1 accuracy, top-5 and NLL."""

    name = "classify"
    help = "image classification with Vision Mamba / ViG (or any timm model) on digits, Fashion-MNIST or folders"
    train_config = ClassifyTrain
    data_groups = (SeedOptions, ClassifyData, ImageReading)
    metrics = {"accuracy": "max", "nll": "min", "top5": "max"}
    meta_must_match = ("classes", "channels")

    def raw_datasets(self, cfg):
        """(train, test) raw datasets (images in [0, 1], before resizing) of `cfg.data`."""
        vdata = _vision()
        name = cfg.data.strip()
        if name == "digits":
            train, test = vdata.load_digits_split(cfg.seed, cfg.test_fraction)
        elif name in ("fashion-mnist", "fashion_mnist"):
            train, test = vdata.load_fashion_mnist()
        else:
            root = Path(name).expanduser()
            if not root.is_dir():
                raise DataError(f"--data {name!r}: not 'digits', 'fashion-mnist' or an existing folder")
            if any(root.glob("train-images-idx3-ubyte*")):
                train, test = vdata.load_idx_folder(root)
            else:
                train, test = vdata.load_image_folder(root, cfg.seed, cfg.test_fraction, channels=3,
                                                      on_bad_image=cfg.on_bad_image)
        return train, test

    @staticmethod
    def transform(cfg, channels: int, train: bool):
        vdata = _vision()
        mean, std = (0.5,) * channels, (0.5,) * channels
        return vdata.ImageTransform(cfg.img_size, mean, std, train=train and cfg.augment, hflip=train and cfg.hflip)

    def setup(self, cfg) -> RunSpec:
        vdata = _vision()
        train, test = self.raw_datasets(cfg)
        test = vdata.stratified_subset(test, cfg.eval_size, cfg.seed)
        meta = {"classes": list(train.classes), "channels": train.channels}
        return RunSpec(vdata.ClassificationDataset(train, self.transform(cfg, train.channels, True), cfg.seed),
                       vdata.ClassificationDataset(test, self.transform(cfg, train.channels, False), cfg.seed),
                       meta, f"{len(test)} held-out images of {cfg.data}")

    def build_model(self, ctx: RunContext) -> nn.Module:
        cfg = ctx.cfg
        return build_classifier(cfg.model, len(ctx.meta["classes"]), ctx.meta["channels"], cfg.img_size,
                                parse_kwargs(cfg.model_kwargs, "model_kwargs"), cfg.pretrained)

    def train_loss(self, model, batch, ctx: RunContext) -> torch.Tensor:
        from ssmkit.vision.augment import mix_batch

        x, y = batch
        cfg = ctx.cfg
        if cfg.mixup > 0 or cfg.cutmix > 0:
            x, y1, y2, lam = mix_batch(x, y, cfg.mixup, cfg.cutmix)
            logits = model(x).float()
            return (lam * F.cross_entropy(logits, y1, label_smoothing=cfg.label_smoothing)
                    + (1 - lam) * F.cross_entropy(logits, y2, label_smoothing=cfg.label_smoothing))
        return F.cross_entropy(model(x).float(), y, label_smoothing=cfg.label_smoothing)

    def eval_step(self, model, batch, ctx: RunContext) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = model(x).float()
        out = {"accuracy": (logits.argmax(-1) == y).float(), "nll": F.cross_entropy(logits, y, reduction="none")}
        if logits.shape[-1] > 5:
            out["top5"] = (logits.topk(5, dim=-1).indices == y[:, None]).any(-1).float()
        return out

    def commands(self) -> list[Command]:
        return [*train_and_eval(self),
                Command("predict", "print the top-k classes of image files with a run's weights", ClassifyPredict,
                        self.predict)]

    def predict(self, cfg) -> list[dict]:
        """Print and return the top-k classes of every image in `cfg.images`."""
        vdata = _vision()
        run = load_run(self, cfg)
        classes, channels = run.meta["classes"], run.meta["channels"]
        transform = self.transform(run.cfg, channels, train=False)
        results = []
        k = min(cfg.top_k, len(classes))
        for path in _expand_images(cfg.images):
            try:
                x = vdata.load_image_file(path, channels)
            except DataError as e:
                if run.cfg.on_bad_image == "error":
                    raise
                print(f"{path}: skipped ({e})", flush=True)
                continue
            with torch.no_grad():
                probs = run.model(transform(x)[None]).float().softmax(-1)[0]
            p, idx = probs.topk(k)
            top = [(classes[i], float(q)) for i, q in zip(idx.tolist(), p.tolist())]
            results.append({"image": str(path), "top": top})
            print(f"{path}: " + ", ".join(f"{c} {q:.3f}" for c, q in top), flush=True)
        return results

    def demo(self, out_dir: Path, smoke: bool) -> ReportSection:
        from ssmkit.vision.plots import plot_confusion, plot_predictions

        sizes = dict(model_kwargs="embed_dim=16,depth=1", steps=8, batch_size=32, warmup_steps=2, eval_every=0,
                     log_every=4) if smoke else dict(steps=250, eval_every=50, log_every=50)
        cfg = ClassifyTrain(out_dir=str(out_dir / self.name), overwrite=True, **sizes)
        cfg.validate()
        runner = Runner(self, cfg)
        run = runner.train()
        model = run.model.cpu()
        test = self.setup(cfg).eval
        xs = torch.stack([test[i][0] for i in range(len(test))])
        ys = torch.as_tensor(test.labels)
        with torch.no_grad():
            preds = torch.cat([model(xs[i:i + 256]).argmax(-1) for i in range(0, len(xs), 256)])
        classes = test.classes
        n = len(classes)
        confusion = torch.zeros(n, n, dtype=torch.long)
        confusion.index_put_((ys, preds), torch.ones_like(ys), accumulate=True)
        images = list(run.plots)
        images.append(plot_confusion(confusion.numpy(), classes, run.out_dir / "plots" / "confusion.png"))
        images.append(plot_predictions(test, preds.numpy(), run.out_dir / "plots" / "predictions.png"))
        acc = run.metrics["accuracy"]
        n_params = sum(p.numel() for p in model.parameters())
        text = (
            f"`{cfg.model}` (embed_dim {model.embed_dim}, depth {len(model.layers)}, patch {model.patch_size}, "
            f"input {cfg.img_size}x{cfg.img_size}, {n_params:,} parameters) classifies scikit-learn's bundled 8x8 "
            f"handwritten digits, upsampled to the model's input size: {len(test)} held-out images "
            f"(a fixed stratified {cfg.test_fraction:.0%} split, seed {cfg.seed}), the rest for training with a "
            f"light random-resized-crop augmentation and label smoothing {cfg.label_smoothing}.\n\n"
            f"Trained for {run.step} AdamW steps of {cfg.batch_size} images on {runner.device.type}. Chance is "
            f"{1 / n:.0%}. Run folder: `{run.out_dir}` (resumable checkpoints, logs, curves; "
            f"`ssmkit classify predict --out-dir {run.out_dir}` classifies image files with it)."
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
    vdata = _vision()
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
                raise DataError(f"image {item} does not exist")
            files += [Path(m) for m in matches]
    return files


application = ClassifyApp()
