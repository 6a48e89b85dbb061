"""`ssmkit video`: next-frame prediction on moving digits with a ConvS5 predictor.

The data are Moving-MNIST-style sequences (`ssmkit.vision.moving_digits.MovingDigits`: digits bouncing
in a square frame), drawn deterministically from scikit-learn's bundled digits (or Fashion-MNIST when
--fashion-dir holds its IDX files). The model (`ssmkit.vision.convs5.ConvS5Predictor`) is trained with
teacher forcing: at every frame t it predicts frame t+1 (binary cross-entropy on the pixels, or MSE).
Evaluation reports the next-frame MSE and SSIM of the model and of the copy-last-frame baseline
(predict frame t+1 = frame t), and their ratio (below 1: the model beats the baseline).

`ssmkit video generate` conditions on the first --context frames of eval sequences (one parallel
pass), then rolls out --n-future frames one at a time with the ConvS5 step (O(1) per frame), and
writes a PNG strip and an animated GIF of context | predicted vs true frames.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ssmkit.apps.config import ConfigError, TrainConfig, option
from ssmkit.apps.report import ReportSection, Table
from ssmkit.apps.runner import Application, Command, Runner, load_weights
from ssmkit.vision.convs5 import ConvS5Config, ConvS5Predictor, frame_ssim
from ssmkit.vision.moving_digits import MovingDigits, load_digit_images

__all__ = ["VideoConfig", "GenerateConfig", "VideoApp", "application", "rollout_metrics", "save_strip", "save_gif"]

_TRAIN, _EVAL = 0, 1


@dataclass
class VideoConfig(TrainConfig):
    """Moving digits: data, ConvS5 model size and (redeclared) training defaults (a ~1 minute CPU run)."""

    frame_size: int = option(32, "frame height and width in pixels (64: the Moving-MNIST benchmark size)")
    seq_len: int = option(12, "frames per sequence")
    n_digits: int = option(2, "digits per sequence")
    digit_size: int = option(14, "digit size in pixels (upsampled from sklearn's 8x8; Moving-MNIST uses 28)")
    speed_max: float = option(3.0, "largest digit speed in pixels per frame (smallest: 1)")
    fashion_dir: str = option("", "folder with Fashion-MNIST IDX files to use instead of sklearn's digits")
    train_size: int = option(4096, "training sequences")
    eval_size: int = option(128, "held-out sequences to evaluate on")
    d_model: int = option(32, "channels of the latent feature map")
    ssm_size: int = option(32, "ConvS5 state channels P per layer")
    n_layers: int = option(2, "ConvS5 blocks")
    downsample: int = option(2, "stride-2 convs of the frame encoder (latent = frame / 2**downsample)")
    loss: str = option("bce", "training loss on the pixels", ("bce", "mse"))
    steps: int = option(150, "optimizer steps to train for")
    batch_size: int = option(16, "samples per optimizer step, summed over all processes and accumulation steps")
    lr: float = option(3e-3, "peak learning rate of AdamW")
    warmup_steps: int = option(10, "steps of linear learning-rate warm-up from 0")
    weight_decay: float = option(0.01, "AdamW weight decay (never on norms, biases, A_log, D)")
    eval_every: int = option(50, "evaluate every N steps (0: only at the end)")
    eval_batch_size: int = option(32, "samples per eval forward pass and process (0: the training micro-batch)")
    log_every: int = option(25, "print and log the training metrics every N steps")

    def validate(self) -> None:
        super().validate()
        for name in ("frame_size", "n_digits", "digit_size", "train_size", "eval_size", "d_model", "ssm_size",
                     "n_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2 (a frame and the next), got {self.seq_len}")
        if self.digit_size > self.frame_size:
            raise ConfigError(f"digit_size ({self.digit_size}) cannot exceed frame_size ({self.frame_size})")
        if self.downsample < 0 or self.frame_size % 2 ** self.downsample:
            raise ConfigError(f"frame_size ({self.frame_size}) must be divisible by 2**downsample "
                              f"(downsample {self.downsample})")
        if self.speed_max < 1:
            raise ConfigError(f"speed_max must be at least 1, got {self.speed_max}")


@dataclass
class GenerateConfig(VideoConfig):
    """`ssmkit video generate`: model weights plus what to roll out."""

    weights: str = option("", "weights to load (empty: out_dir/best.safetensors, else out_dir/model.safetensors)")
    context: int = option(6, "true frames to condition on")
    n_future: int = option(6, "frames to generate after the context")
    n_samples: int = option(4, "eval sequences to roll out (rows of the strip)")
    output: str = option("", "folder for the strip, GIF and metrics (empty: out_dir/generate)")

    def validate(self) -> None:
        super().validate()
        if self.context < 1 or self.n_future < 1 or self.n_samples < 1:
            raise ConfigError("context, n_future and n_samples must be at least 1")
        if self.n_samples > self.eval_size:
            raise ConfigError(f"n_samples ({self.n_samples}) cannot exceed eval_size ({self.eval_size})")


def _model_config(cfg: VideoConfig) -> ConvS5Config:
    return ConvS5Config(in_channels=1, d_model=cfg.d_model, ssm_size=cfg.ssm_size, n_layers=cfg.n_layers,
                        downsample=cfg.downsample)


def _datasets(cfg: VideoConfig, seq_len: int | None = None) -> tuple[MovingDigits, MovingDigits]:
    images = load_digit_images(cfg.digit_size, "auto" if cfg.fashion_dir else "sklearn", cfg.fashion_dir)
    kw = dict(seq_len=seq_len or cfg.seq_len, frame_size=cfg.frame_size, n_digits=cfg.n_digits,
              digit_size=cfg.digit_size, seed=cfg.seed, speed_max=cfg.speed_max, images=images)
    return MovingDigits(cfg.train_size, split=_TRAIN, **kw), MovingDigits(cfg.eval_size, split=_EVAL, **kw)


class VideoApp(Application):
    """Train and evaluate a ConvS5 next-frame predictor; metrics against the copy-last-frame baseline."""

    name = "video"
    help = "next-frame prediction on moving digits with ConvS5 (train, eval, generate rollouts)"
    config = VideoConfig
    metrics = {"mse": "min", "ssim": "max", "baseline_mse": "min", "baseline_ssim": "max", "mse_ratio": "min",
               "loss": "min"}

    def build_model(self, cfg: VideoConfig) -> ConvS5Predictor:
        self._loss_kind = cfg.loss  # the runner builds the model once per run, before any train_loss
        return ConvS5Predictor(_model_config(cfg))

    def build_datasets(self, cfg: VideoConfig) -> tuple[Dataset, Dataset]:
        return _datasets(cfg)

    def _loss(self, logits, target, kind):
        if kind == "bce":
            return F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return F.mse_loss(torch.sigmoid(logits.float()), target.float())

    def train_loss(self, model, frames) -> torch.Tensor:
        logits = model(frames[:, :-1], logits=True)
        return self._loss(logits, frames[:, 1:], getattr(self, "_loss_kind", "bce"))

    def eval_step(self, model, frames) -> dict[str, torch.Tensor]:
        logits = model(frames[:, :-1], logits=True).float()
        target, last = frames[:, 1:].float(), frames[:, :-1].float()
        pred = torch.sigmoid(logits)
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2, 3, 4))
        return {"mse": (pred - target).pow(2).mean((1, 2, 3, 4)), "ssim": frame_ssim(pred, target).mean(1),
                "baseline_mse": (last - target).pow(2).mean((1, 2, 3, 4)),
                "baseline_ssim": frame_ssim(last, target).mean(1), "loss": loss}

    def compute_metrics(self, outputs):
        m = {k: v.double().mean().item() for k, v in outputs.items()}
        m["mse_ratio"] = m["mse"] / max(m["baseline_mse"], 1e-12)
        return {k: m[k] for k in self.metrics if k in m}

    def commands(self) -> list[Command]:
        return [*super().commands(),
                Command("generate", "condition on --context frames, roll out --n-future with O(1) ConvS5 steps; "
                                    "writes a PNG strip, a GIF and rollout metrics", GenerateConfig, generate)]

    def demo(self, out_dir: Path, smoke: bool) -> ReportSection:
        sizes = dict(train_size=64, eval_size=16, steps=6, batch_size=8, d_model=8, ssm_size=4, n_layers=1,
                     seq_len=6, frame_size=16, digit_size=8, warmup_steps=1, eval_every=3, log_every=3) if smoke else {}
        cfg = VideoConfig(out_dir=str(out_dir / self.name), overwrite=True, **sizes)
        cfg.validate()
        runner = Runner(self, cfg)
        run = runner.train()
        gcfg = GenerateConfig(**{**dataclasses.asdict(cfg), "overwrite": False},
                              context=max(1, cfg.seq_len // 2), n_future=cfg.seq_len - max(1, cfg.seq_len // 2),
                              n_samples=4 if not smoke else 2, output=str(Path(cfg.out_dir) / "generate"))
        gen = generate(gcfg, model=runner.model.cpu().eval())
        m = run.metrics
        n_params = sum(p.numel() for p in runner.model.parameters())
        text = (
            f"A ConvS5 next-frame predictor (`ConvS5Predictor`: strided-conv frame encoder to a "
            f"{cfg.frame_size // 2 ** cfg.downsample}x{cfg.frame_size // 2 ** cfg.downsample}x{cfg.d_model} "
            f"feature map, {cfg.n_layers} ConvS5 blocks with state size P={cfg.ssm_size}, transposed-conv decoder; "
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


def rollout_metrics(pred: torch.Tensor, true: torch.Tensor, last_context: torch.Tensor) -> dict[str, list[float] | float]:
    """Per-horizon MSE/SSIM of a rollout pred (batch, T, C, H, W) vs true, and of repeating last_context
    (batch, C, H, W) for every future frame."""
    base = last_context[:, None].expand_as(true)
    out = {}
    for name, p in (("", pred), ("baseline_", base)):
        mse = (p - true).pow(2).mean((0, 2, 3, 4))
        ssim = frame_ssim(p, true).mean(0)
        out[f"{name}mse_per_frame"] = mse.tolist()
        out[f"{name}ssim_per_frame"] = ssim.tolist()
        out[f"{name}rollout_mse"] = mse.mean().item()
        out[f"{name}rollout_ssim"] = ssim.mean().item()
    return out


def save_strip(path: Path, context: torch.Tensor, pred: torch.Tensor, true: torch.Tensor) -> Path:
    """PNG grid: for each sample two rows, context frames then predicted (upper) / true (lower) frames."""
    from matplotlib.figure import Figure

    n, k, T = context.shape[0], context.shape[1], pred.shape[1]
    fig = Figure(figsize=(0.8 * (k + T) + 0.6, 0.85 * 2 * n + 0.4), dpi=100, layout="constrained")
    axes = fig.subplots(2 * n, k + T, squeeze=False)
    for i in range(n):
        for r in range(2):
            for j in range(k + T):
                ax = axes[2 * i + r, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j < k:
                    img = context[i, j, 0] if r == 0 else None
                else:
                    img = (pred if r == 0 else true)[i, j - k, 0]
                if img is None:
                    ax.axis("off")
                    continue
                ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1)
                for side in ax.spines.values():
                    side.set_color("tab:orange" if j >= k and r == 0 else "0.6")
                if i == 0 and r == 0:
                    ax.set_title(f"t={j + 1}" if j < k else f"+{j - k + 1}", fontsize=7)
            axes[2 * i + r, 0].set_ylabel("" if r else f"#{i}", fontsize=7)
    fig.suptitle("context | predicted (orange) over true", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def save_gif(path: Path, context: torch.Tensor, pred: torch.Tensor, true: torch.Tensor, scale: int = 3) -> Path:
    """Animated GIF: each frame shows the samples side by side, predicted (top) over true (bottom);
    during the context both rows show the true frame."""
    from PIL import Image

    frames = []
    for t in range(context.shape[1] + pred.shape[1]):
        if t < context.shape[1]:
            top = bottom = context[:, t, 0]
        else:
            top, bottom = pred[:, t - context.shape[1], 0], true[:, t - context.shape[1], 0]
        pad = torch.ones(top.shape[0], top.shape[1], 1) * 0.5
        row = lambda x: torch.cat([torch.cat([f, p], 1) for f, p in zip(x, pad)], 1)  # noqa: E731
        grid = torch.cat([row(top), torch.full((1, row(top).shape[1]), 0.5), row(bottom)], 0)
        img = (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        frames.append(Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST))
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=250, loop=0)
    return path


def generate(cfg: GenerateConfig, model: ConvS5Predictor | None = None) -> dict:
    """Roll out n_samples eval sequences; writes rollout.png, rollout.gif and rollout.json into the
    output folder and returns the metrics with the paths."""
    cfg.validate()
    if model is None:
        model = ConvS5Predictor(_model_config(cfg))
        out = Path(cfg.out_dir or "runs/video")
        path = Path(cfg.weights) if cfg.weights else (
            out / "best.safetensors" if (out / "best.safetensors").exists() else out / "model.safetensors")
        load_weights(model, path)
    model = model.eval()
    _, eval_set = _datasets(cfg, seq_len=cfg.context + cfg.n_future)
    frames = torch.stack([eval_set[i] for i in range(cfg.n_samples)])
    context, true = frames[:, :cfg.context], frames[:, cfg.context:]
    with torch.no_grad():
        pred = model.rollout(context, cfg.n_future).float()
    metrics = rollout_metrics(pred, true, context[:, -1])
    folder = Path(cfg.output) if cfg.output else Path(cfg.out_dir or "runs/video") / "generate"
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
