"""`ssmkit video`: next-frame prediction on moving digits with a ConvS5 predictor.

The data are Moving-MNIST-style sequences (`ssmkit.vision.moving_digits.MovingDigits`: digits bouncing
in a square frame), drawn deterministically from scikit-learn's bundled digits (or Fashion-MNIST when
--fashion-dir holds its IDX files). The model (`ssmkit.vision.convs5.ConvS5Predictor`) is trained with
teacher forcing: at every frame t it predicts frame t+1 (binary cross-entropy on the pixels, or MSE).
Evaluation reports the next-frame MSE and SSIM of the model and of the copy-last-frame baseline
(predict frame t+1 = frame t), and their ratio (below 1: the model beats the baseline).

`ssmkit video generate` conditions a trained run on the first --context frames of eval sequences (one
parallel pass), then rolls out --n-future frames one at a time with the ConvS5 step (O(1) per frame),
and writes a PNG strip and an animated GIF of context | predicted vs true frames.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ssmkit.apps.application import Application, Command, RunContext, RunSpec, build_registered, load_run
from ssmkit.apps.config import (ConfigError, DeviceOptions, EvalOptions, ModelOptions, RunOptions, SeedOptions,
                                TrainOptions, WeightsOptions, compose, option, replace)
from ssmkit.apps.report import ReportSection, Table
from ssmkit.apps.runner import Runner, train_and_eval
from ssmkit.vision.metrics import frame_ssim, rollout_metrics
from ssmkit.vision.moving_digits import MovingDigits, load_digit_images
from ssmkit.vision.plots import save_gif, save_strip

__all__ = ["VideoData", "VideoTrain", "VideoGenerate", "VideoApp", "application", "generate"]

_TRAIN, _EVAL = 0, 1


@dataclass
class VideoData:
    """The moving-digits sequences."""

    title = "data"
    frame_size: int = option(32, "frame height and width in pixels (64: the Moving-MNIST benchmark size)")
    seq_len: int = option(12, "frames per sequence")
    n_digits: int = option(2, "digits per sequence")
    digit_size: int = option(14, "digit size in pixels (upsampled from sklearn's 8x8; Moving-MNIST uses 28)")
    speed_max: float = option(3.0, "largest digit speed in pixels per frame (smallest: 1)")
    fashion_dir: str = option("", "folder with Fashion-MNIST IDX files to use instead of sklearn's digits")
    train_size: int = option(4096, "training sequences")
    eval_size: int = option(128, "held-out sequences to evaluate on")

    def check(self) -> None:
        for name in ("frame_size", "n_digits", "digit_size", "train_size", "eval_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2 (a frame and the next), got {self.seq_len}")
        if self.digit_size > self.frame_size:
            raise ConfigError(f"digit_size ({self.digit_size}) cannot exceed frame_size ({self.frame_size})")
        if self.speed_max < 1:
            raise ConfigError(f"speed_max must be at least 1, got {self.speed_max}")


@dataclass
class PixelLoss:
    """The training loss on the pixels."""

    title = "loss"
    loss: str = option("bce", "training loss on the pixels", ("bce", "mse"))


@dataclass
class RolloutOptions:
    """What to roll out."""

    title = "rollout"
    context: int = option(6, "true frames to condition on")
    n_future: int = option(6, "frames to generate after the context")
    n_samples: int = option(4, "eval sequences to roll out (rows of the strip)")
    output: str = option("", "folder for the strip, GIF and metrics (empty: <out-dir>/generate)")

    def check(self) -> None:
        if self.context < 1 or self.n_future < 1 or self.n_samples < 1:
            raise ConfigError("context, n_future and n_samples must be at least 1")


VideoTrain = compose("VideoTrain", RunOptions, SeedOptions, VideoData, ModelOptions, PixelLoss, TrainOptions,
                     EvalOptions, DeviceOptions, defaults=dict(
                         model="convs5_moving_digits_tiny", steps=150, batch_size=16, lr=3e-3, warmup_steps=10,
                         weight_decay=0.01, eval_every=50, eval_batch_size=32, log_every=25),
                     doc="`ssmkit video train`: moving digits, the ConvS5 predictor and training.")
VideoGenerate = compose("VideoGenerate", RunOptions, WeightsOptions, RolloutOptions,
                        doc="`ssmkit video generate`: a trained run and what to roll out.")


def _datasets(cfg, seq_len: int | None = None) -> tuple[MovingDigits, MovingDigits]:
    images = load_digit_images(cfg.digit_size, "auto" if cfg.fashion_dir else "sklearn", cfg.fashion_dir)
    kw = dict(seq_len=seq_len or cfg.seq_len, frame_size=cfg.frame_size, n_digits=cfg.n_digits,
              digit_size=cfg.digit_size, seed=cfg.seed, speed_max=cfg.speed_max, images=images)
    return MovingDigits(cfg.train_size, split=_TRAIN, **kw), MovingDigits(cfg.eval_size, split=_EVAL, **kw)


class VideoApp(Application):
    """Train and evaluate a ConvS5 next-frame predictor; metrics against the copy-last-frame baseline."""

    name = "video"
    help = "next-frame prediction on moving digits with ConvS5 (train, eval, generate rollouts)"
    train_config = VideoTrain
    data_groups = (VideoData,)
    metrics = {"mse": "min", "ssim": "max", "baseline_mse": "min", "baseline_ssim": "max", "mse_ratio": "min",
               "loss": "min"}

    def setup(self, cfg) -> RunSpec:
        train, evals = _datasets(cfg)
        return RunSpec(train, evals, {}, f"{cfg.eval_size} held-out moving-digit sequences of {cfg.seq_len} frames")

    def build_model(self, ctx: RunContext):
        model = build_registered(ctx.cfg)
        if ctx.cfg.frame_size % 2 ** model.config.downsample:
            raise ConfigError(f"frame_size ({ctx.cfg.frame_size}) must be divisible by 2**downsample of "
                              f"{ctx.cfg.model} (downsample {model.config.downsample})")
        return model

    def train_loss(self, model, frames, ctx: RunContext) -> torch.Tensor:
        logits = model(frames[:, :-1], logits=True).float()
        target = frames[:, 1:].float()
        if ctx.cfg.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.mse_loss(torch.sigmoid(logits), target)

    def eval_step(self, model, frames, ctx: RunContext) -> dict[str, torch.Tensor]:
        logits = model(frames[:, :-1], logits=True).float()
        target, last = frames[:, 1:].float(), frames[:, :-1].float()
        pred = torch.sigmoid(logits)
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2, 3, 4))
        return {"mse": (pred - target).pow(2).mean((1, 2, 3, 4)), "ssim": frame_ssim(pred, target).mean(1),
                "baseline_mse": (last - target).pow(2).mean((1, 2, 3, 4)),
                "baseline_ssim": frame_ssim(last, target).mean(1), "loss": loss}

    def compute_metrics(self, outputs, ctx: RunContext):
        m = {k: v.double().mean().item() for k, v in outputs.items()}
        m["mse_ratio"] = m["mse"] / max(m["baseline_mse"], 1e-12)
        return {k: m[k] for k in self.metrics if k in m}

    def commands(self) -> list[Command]:
        return [*train_and_eval(self),
                Command("generate", "condition on --context frames, roll out --n-future with O(1) ConvS5 steps; "
                                    "writes a PNG strip, a GIF and rollout metrics", VideoGenerate, generate)]

    def demo(self, out_dir: Path, smoke: bool) -> ReportSection:
        sizes = dict(train_size=64, eval_size=16, steps=6, batch_size=8, model_kwargs="d_model=8,ssm_size=4,n_layers=1",
                     seq_len=6, frame_size=16, digit_size=8, warmup_steps=1, eval_every=3, log_every=3) if smoke else {}
        cfg = VideoTrain(out_dir=str(out_dir / self.name), overwrite=True, **sizes)
        cfg.validate()
        runner = Runner(self, cfg)
        run = runner.train()
        context = max(1, cfg.seq_len // 2)
        gcfg = VideoGenerate(out_dir=cfg.out_dir, context=context, n_future=cfg.seq_len - context,
                             n_samples=4 if not smoke else 2)
        gcfg.validate()
        model = run.model.cpu()
        gen = rollout(gcfg, model, cfg, Path(cfg.out_dir) / "generate")
        m = run.metrics
        n_params = sum(p.numel() for p in model.parameters())
        mc = model.config
        text = (
            f"A ConvS5 next-frame predictor (`ConvS5Predictor`: strided-conv frame encoder to a "
            f"{cfg.frame_size // 2 ** mc.downsample}x{cfg.frame_size // 2 ** mc.downsample}x{mc.d_model} "
            f"feature map, {mc.n_layers} ConvS5 blocks with state size P={mc.ssm_size}, transposed-conv decoder; "
            f"{n_params:,} parameters) trained with teacher forcing on moving digits: {cfg.n_digits} scikit-learn "
            f"digits upsampled to {cfg.digit_size} px bouncing in a {cfg.frame_size}x{cfg.frame_size} frame "
            f"(the Moving-MNIST construction), {cfg.seq_len} frames per sequence.\n\n"
            f"Trained for {run.step} AdamW steps of {cfg.batch_size} sequences on {runner.device.type} (seed "
            f"{cfg.seed}); next-frame metrics on {cfg.eval_size} held-out sequences (digits never seen in "
            f"training), against copying the last frame. The strip shows {gcfg.context} context frames, then "
            f"{gcfg.n_future} frames generated one at a time with the ConvS5 step (O(1) per frame, each "
            f"prediction fed back): top row of each pair predicted, bottom row true. Run folder: `{run.out_dir}`."
        )
        metrics = {"next-frame MSE (model)": m["mse"], "next-frame MSE (copy last frame)": m["baseline_mse"],
                   "MSE ratio model / baseline": m["mse_ratio"], "SSIM (model)": m["ssim"],
                   "SSIM (copy last frame)": m["baseline_ssim"],
                   f"rollout MSE over {gcfg.n_future} frames (model)": gen["rollout_mse"],
                   f"rollout MSE over {gcfg.n_future} frames (copy last context frame)": gen["baseline_rollout_mse"],
                   "train steps": run.step, "training time (s)": round(run.wall_s, 1)}
        runner.say(f"video: next-frame mse {m['mse']:.4f} vs copy-last {m['baseline_mse']:.4f} "
                   f"(ratio {m['mse_ratio']:.3f}), ssim {m['ssim']:.3f} vs {m['baseline_ssim']:.3f}")
        rows = [[t + 1, f"{a:.4f}", f"{b:.4f}", f"{c:.3f}", f"{d:.3f}"] for t, (a, b, c, d) in enumerate(zip(
            gen["mse_per_frame"], gen["baseline_mse_per_frame"], gen["ssim_per_frame"], gen["baseline_ssim_per_frame"]))]
        table = Table("Rollout by horizon (frames after the context)",
                      ["horizon", "MSE model", "MSE copy-last", "SSIM model", "SSIM copy-last"], rows)
        return ReportSection("Next-frame prediction with ConvS5 (ssmkit video)", text, metrics,
                             images=[*run.plots, Path(gen["png"])], tables=[table])


application = VideoApp()


# ----------------------------------------------------------------------------------------------
# generation


def rollout(cfg, model, data_cfg, folder: Path) -> dict:
    """Roll out cfg.n_samples eval sequences of the data `data_cfg` describes; writes rollout.png,
    rollout.gif and rollout.json into `folder` and returns the metrics with the paths."""
    if cfg.n_samples > data_cfg.eval_size:
        raise ConfigError(f"n_samples ({cfg.n_samples}) cannot exceed the run's eval_size ({data_cfg.eval_size})")
    _, eval_set = _datasets(replace(data_cfg, seq_len=cfg.context + cfg.n_future))
    frames = torch.stack([eval_set[i] for i in range(cfg.n_samples)])
    context, true = frames[:, :cfg.context], frames[:, cfg.context:]
    with torch.no_grad():
        pred = model.eval().rollout(context, cfg.n_future).float()
    metrics = rollout_metrics(pred, true, context[:, -1])
    png = save_strip(folder / "rollout.png", context, pred, true)
    gif = save_gif(folder / "rollout.gif", context, pred, true)
    result = {**metrics, "context": cfg.context, "n_future": cfg.n_future, "n_samples": cfg.n_samples,
              "png": str(png), "gif": str(gif)}
    (folder / "rollout.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"video generate: {cfg.n_samples} rollouts of {cfg.n_future} frames after {cfg.context}: mse "
          f"{metrics['rollout_mse']:.4f} (copy-last {metrics['baseline_rollout_mse']:.4f}), ssim "
          f"{metrics['rollout_ssim']:.3f} (copy-last {metrics['baseline_rollout_ssim']:.3f}); wrote {png} and {gif}",
          flush=True)
    return result


def generate(cfg) -> dict:
    """`ssmkit video generate`: rollouts of the run in --out-dir on its own data."""
    run = load_run(application, cfg)
    return rollout(cfg, run.model, run.cfg, Path(cfg.output) if cfg.output else run.folder / "generate")
