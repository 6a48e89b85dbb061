"""`ssmkit restore`: train and apply MaIR image restorers (super-resolution and denoising).

Data: BasicSR's paired LQ/GT folders (`--gt-dir`, `--lq-dir`, `--filename-tmpl`), GT-only folders
degraded on the fly (`--gt-dir` alone), or by default the photographs bundled in scikit-image and
scikit-learn (`ssmkit.vision.restoration.embedded_images`, three held out). The degradation is MATLAB
bicubic x`--scale` for `--task sr`, Gaussian noise of `--sigma` (0-255 units) for `--task denoise`,
or any `--degradation` spec ("blur2+bicubic2", "jpeg30"...).

Training goes through the shared runner (L1 or Charbonnier loss; AdamW with weight decay 0 and the
runner's warm-up + cosine schedule in place of the papers' Adam + MultiStepLR, scaled down to a CPU
run). Evaluation reports PSNR / SSIM of the model and of the baseline (MATLAB bicubic upsampling of the
LQ for SR, the noisy input for denoising), on Y or RGB with a border crop as configured; the metric
names say which (`--y-channel`, `--crop-border`, -1 = the scale, as SR papers do).

`ssmkit restore test` evaluates weights over a folder (per-image and mean table, outputs written);
`ssmkit restore run` restores one image or a folder of any size, tiled (`--tile`, `--tile-overlap`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from ssmkit.apps.config import ConfigError, TrainConfig, option
from ssmkit.apps.report import ReportSection
from ssmkit.apps.runner import Application, Command, RunError, Runner, load_weights
from ssmkit.registry import create_model, list_models
from ssmkit.vision.data import DataError
from ssmkit.vision.mair import MaIR, MaIRConfig, load_official_mair
from ssmkit.vision.metrics import metric_name, psnr, ssim
from ssmkit.vision.restoration import (DegradedDataset, GaussianNoise, PairedFolderDataset, BicubicDown,
                                       embedded_images, imresize, list_images, load_gt_folder, parse_degradation,
                                       read_image, scale_of, tiled_forward)

__all__ = ["RestoreConfig", "TestConfig", "RunConfig", "RestoreApp", "application", "build_degradation",
           "restore_images", "test", "run", "save_comparison"]


@dataclass
class RestoreConfig(TrainConfig):
    """MaIR restoration: task, data, model and (redeclared) training defaults (a ~1 minute CPU run)."""

    task: str = option("sr", "super-resolution (MATLAB bicubic LQ) or Gaussian denoising", ("sr", "denoise"))
    scale: int = option(2, "SR factor (--task sr)")
    sigma: float = option(25.0, "noise standard deviation in 0-255 units (--task denoise; MaIR uses 15/25/50)")
    degradation: str = option("", "custom on-the-fly degradation instead of the task's, e.g. 'blur2+bicubic2', "
                                  "'jpeg30' (steps bicubic<s>, noise<sigma>, blur<sigma>, motion<len>, jpeg<q>)")
    gt_dir: str = option("", "training GT folder (empty: the embedded scikit-image/scikit-learn photographs)")
    lq_dir: str = option("", "training LQ folder paired with --gt-dir (empty: degrade --gt-dir on the fly)")
    eval_gt_dir: str = option("", "evaluation GT folder (empty: the embedded held-out photographs)")
    eval_lq_dir: str = option("", "evaluation LQ folder paired with --eval-gt-dir (empty: degrade on the fly)")
    filename_tmpl: str = option("{}", "LQ file name from the GT name, BasicSR's filename_tmpl (DIV2K: '{}x2')")
    gt_patch: int = option(32, "GT training patch size (a multiple of the scale; MaIR: 128 at x2)")
    train_size: int = option(2000, "random training patches per epoch")
    eval_crop: int = option(128, "centre crop of the embedded held-out images for evaluation (0: whole images)")
    model: str = option("", "registered MaIR config (e.g. mair_light_sr_x2; empty: the small model below)")
    embed_dim: int = option(24, "channels of the small model")
    depths: str = option("2", "blocks per residual group of the small model, comma-separated")
    d_state: int = option(2, "SSM state size of the small model")
    ssm_ratio: float = option(1.5, "SSM expansion of the small model")
    mlp_ratio: float = option(2.0, "MLP expansion of the small model")
    scan_len: int = option(8, "NSS stripe width of the small model")
    drop_path: float = option(0.0, "stochastic depth rate")
    interp_init: bool = option(True, "small model only: start as bilinear upsampling (SR) / the identity "
                                     "(denoising) and learn the correction (an ssmkit extension; official "
                                     "MaIR starts from random weights)")
    official_weights: str = option("", "official MaIR checkpoint (.pth) to start from (local path)")
    loss: str = option("l1", "training loss (MaIR: L1 for SR, Charbonnier for denoising)", ("l1", "charbonnier"))
    y_channel: bool = option(True, "PSNR/SSIM on the Y channel (SR papers) instead of RGB")
    crop_border: int = option(-1, "pixels cropped from each edge before PSNR/SSIM (-1: the scale for SR, 0 else)")
    tile: int = option(0, "tiled inference in evaluation / test / run: LQ tile size (0: whole images)")
    tile_overlap: int = option(16, "overlap of neighbouring tiles in LQ pixels")
    steps: int = option(150, "optimizer steps to train for")
    batch_size: int = option(8, "samples per optimizer step, summed over all processes and accumulation steps")
    lr: float = option(2e-3, "peak learning rate (MaIR: 2e-4 for 500k steps; higher for short runs)")
    beta2: float = option(0.99, "AdamW beta2 (MaIR's Adam: 0.99)")
    weight_decay: float = option(0.0, "AdamW weight decay (MaIR: 0)")
    warmup_steps: int = option(20, "steps of linear learning-rate warm-up from 0")
    eval_every: int = option(0, "evaluate every N steps (0: only at the end)")
    eval_batch_size: int = option(1, "images per eval forward pass (whole images of different sizes: 1)")
    log_every: int = option(25, "print and log the training metrics every N steps")

    def validate(self) -> None:
        super().validate()
        if self.task == "sr" and self.scale < 1:
            raise ConfigError(f"scale must be at least 1, got {self.scale}")
        if self.task == "denoise" and self.sigma <= 0:
            raise ConfigError(f"sigma must be positive, got {self.sigma}")
        if self.degradation:
            try:
                parse_degradation(self.degradation)
            except ValueError as e:
                raise ConfigError(f"--degradation: {e}") from None
        if self.model and self.model not in list_models("mair_*"):
            raise ConfigError(f"--model {self.model!r} is not a MaIR config; choose from "
                              f"{', '.join(list_models('mair_*'))}")
        if self.lq_dir and not self.gt_dir or self.eval_lq_dir and not self.eval_gt_dir:
            raise ConfigError("an LQ folder needs its GT folder (--gt-dir / --eval-gt-dir)")
        try:
            depths = [int(d) for d in self.depths.split(",")]
        except ValueError:
            raise ConfigError(f"--depths must be comma-separated integers, got {self.depths!r}") from None
        if not depths or min(depths) < 1 or self.embed_dim < 1 or self.d_state < 1 or self.scan_len < 2:
            raise ConfigError("the small model needs depths >= 1, embed_dim >= 1, d_state >= 1 and scan_len >= 2")
        scale = self.lq_scale
        if self.gt_patch < scale or self.gt_patch % scale:
            raise ConfigError(f"gt_patch ({self.gt_patch}) must be a positive multiple of the scale ({scale})")
        if self.tile < 0 or self.tile_overlap < 0 or (self.tile and self.tile_overlap >= self.tile):
            raise ConfigError(f"need tile >= 0 and 0 <= tile_overlap < tile, got {self.tile} / {self.tile_overlap}")

    @property
    def lq_scale(self) -> int:
        """The LQ -> GT size factor of the configured degradation."""
        return scale_of(build_degradation(self))

    @property
    def border(self) -> int:
        return self.crop_border if self.crop_border >= 0 else (self.lq_scale if self.task == "sr" else 0)


@dataclass
class TestConfig(RestoreConfig):
    """`ssmkit restore test`: weights, then the evaluation data options select the test folder."""

    weights: str = option("", "weights (empty: out_dir/best.safetensors, else out_dir/model.safetensors)")
    output: str = option("", "folder for the restored images and results.json (empty: out_dir/test)")


@dataclass
class RunConfig(RestoreConfig):
    """`ssmkit restore run`: restore LQ images of any size."""

    weights: str = option("", "weights (empty: out_dir/best.safetensors, else out_dir/model.safetensors)")
    input: str = option("", "an LQ image file or a folder of them")
    output: str = option("", "output folder (empty: out_dir/restored)")

    def validate(self) -> None:
        super().validate()
        if not self.input:
            raise ConfigError("--input is required: an image file or a folder")


def build_degradation(cfg: RestoreConfig):
    """The on-the-fly degradation of a config: --degradation, else the task's."""
    if cfg.degradation:
        return parse_degradation(cfg.degradation)
    return BicubicDown(cfg.scale) if cfg.task == "sr" else GaussianNoise(cfg.sigma)


def build_restorer(cfg: RestoreConfig) -> MaIR:
    """The configured MaIR (a registered config or the small one), optionally with official weights."""
    scale = cfg.lq_scale
    if cfg.model:
        model = create_model(cfg.model, drop_path_rate=cfg.drop_path)
        if model.upscale != scale:
            raise ConfigError(f"--model {cfg.model} upscales x{model.upscale} but the data is x{scale}")
    else:
        model = MaIR(MaIRConfig(
            upscale=scale, embed_dim=cfg.embed_dim, depths=tuple(int(d) for d in cfg.depths.split(",")),
            d_state=cfg.d_state, ssm_ratio=cfg.ssm_ratio, mlp_ratio=cfg.mlp_ratio, scan_len=cfg.scan_len,
            upsampler="pixelshuffledirect" if scale > 1 else "", drop_path_rate=cfg.drop_path,
            interp_init=cfg.interp_init))
    if cfg.official_weights:
        try:
            load_official_mair(model, cfg.official_weights)
        except ValueError as e:
            raise RunError(str(e)) from None
    return model


def _datasets(cfg: RestoreConfig) -> tuple[Dataset, Dataset]:
    degradation, scale = build_degradation(cfg), cfg.lq_scale
    try:
        if cfg.gt_dir and cfg.lq_dir:
            train = PairedFolderDataset(cfg.gt_dir, cfg.lq_dir, scale, cfg.gt_patch, train=True,
                                        filename_tmpl=cfg.filename_tmpl, samples=cfg.train_size, seed=cfg.seed)
        else:
            if cfg.gt_dir:
                images, names = load_gt_folder(cfg.gt_dir)
            else:
                embedded, _ = embedded_images()
                names, images = list(embedded), list(embedded.values())
            train = DegradedDataset(images, names, degradation, cfg.gt_patch, train=True, samples=cfg.train_size,
                                    seed=cfg.seed)
        evals = _eval_dataset(cfg)
    except DataError as e:
        raise RunError(str(e)) from None
    for data, folder in ((train, cfg.gt_dir), (evals, cfg.eval_gt_dir)):
        if data[0]["gt"].shape[0] != 3:
            raise RunError(f"{folder} holds grayscale images; ssmkit restore trains RGB models (convert them)")
    return train, evals


def _eval_dataset(cfg: RestoreConfig) -> Dataset:
    degradation, scale = build_degradation(cfg), cfg.lq_scale
    if cfg.eval_gt_dir and cfg.eval_lq_dir:
        return PairedFolderDataset(cfg.eval_gt_dir, cfg.eval_lq_dir, scale, filename_tmpl=cfg.filename_tmpl)
    if cfg.eval_gt_dir:
        images, names = load_gt_folder(cfg.eval_gt_dir)
        return DegradedDataset(images, names, degradation, seed=cfg.seed)
    _, held = embedded_images()
    return DegradedDataset(list(held.values()), list(held), degradation, seed=cfg.seed, eval_crop=cfg.eval_crop)


def _baseline(lq: torch.Tensor, scale: int) -> torch.Tensor:
    """What the model must beat: MATLAB bicubic upsampling of the LQ (SR), or the LQ itself."""
    return imresize(lq, float(scale)) if scale > 1 else lq


def _charbonnier(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    return torch.sqrt((x - y) ** 2 + eps ** 2).mean()


class RestoreApp(Application):
    """Train and evaluate MaIR restorers; PSNR/SSIM against the bicubic or noisy-input baseline."""

    name = "restore"
    help = "image restoration (SR, denoising) with MaIR: train, eval, test over a folder, run on images"
    config = RestoreConfig
    metrics = {"psnr": "max", "ssim": "max", "baseline_psnr": "max", "baseline_ssim": "max", "psnr_gain": "max",
               "l1": "min"}

    def build_model(self, cfg: RestoreConfig) -> MaIR:
        # the runner builds the model once per run, before any train_loss / eval_step
        self._cfg = cfg
        return build_restorer(cfg)

    def build_datasets(self, cfg: RestoreConfig) -> tuple[Dataset, Dataset]:
        return _datasets(cfg)

    def collate(self, samples: list) -> dict:
        shapes = {tuple(s["gt"].shape) for s in samples}
        if len(shapes) > 1:
            raise RunError(f"images of sizes {sorted(shapes)} cannot share a batch; use --eval-batch-size 1")
        return default_collate(samples)

    def train_loss(self, model, batch) -> torch.Tensor:
        out = model(batch["lq"]).float()
        if self._cfg.loss == "charbonnier":
            return _charbonnier(out, batch["gt"].float())
        return F.l1_loss(out, batch["gt"].float())

    def eval_step(self, model, batch) -> dict[str, torch.Tensor]:
        cfg = self._cfg
        lq, gt = batch["lq"].float(), batch["gt"].float()
        out = tiled_forward(model, lq, cfg.lq_scale, cfg.tile, cfg.tile_overlap).float()
        base = _baseline(lq, cfg.lq_scale)
        kw = dict(crop_border=cfg.border, y_channel=cfg.y_channel)
        p, bp = psnr(out, gt, **kw), psnr(base, gt, **kw)
        return {"psnr": p, "ssim": ssim(out, gt, **kw), "baseline_psnr": bp, "baseline_ssim": ssim(base, gt, **kw),
                "psnr_gain": p - bp, "l1": (out - gt).abs().mean((1, 2, 3))}

    def commands(self) -> list[Command]:
        return [*super().commands(),
                Command("test", "evaluate weights over the eval folder: per-image PSNR/SSIM table, outputs written",
                        TestConfig, test),
                Command("run", "restore an image or a folder of any size with tiled inference", RunConfig, run)]

    def demo(self, out_dir: Path, smoke: bool) -> ReportSection:
        sizes = (dict(steps=4, batch_size=2, gt_patch=16, train_size=16, embed_dim=8, depths="1", d_state=2,
                      eval_crop=24, warmup_steps=1, eval_every=0, log_every=2) if smoke else {})
        cfg = RestoreConfig(out_dir=str(out_dir / self.name), overwrite=True, **sizes)
        cfg.validate()
        runner = Runner(self, cfg)
        result = runner.train()
        model = runner.model.cpu().eval()
        eval_set = _eval_dataset(cfg)
        item = eval_set[0]
        with torch.no_grad():
            out = model(item["lq"][None])[0]
        bicubic = _baseline(item["lq"][None], cfg.lq_scale)[0]
        png = save_comparison(Path(cfg.out_dir) / "comparison.png", item["lq"], bicubic, out, item["gt"],
                              cfg.lq_scale, cfg.border, cfg.y_channel)
        m = result.metrics
        pname = metric_name("psnr", cfg.border, cfg.y_channel)
        sname = metric_name("ssim", cfg.border, cfg.y_channel)
        n_params = sum(p.numel() for p in model.parameters())
        runner.say(f"restore: {pname} {m['psnr']:.2f} dB vs bicubic {m['baseline_psnr']:.2f} dB "
                   f"(gain {m['psnr_gain']:+.2f} dB)")
        text = (
            f"A small MaIR (embed dim {cfg.embed_dim}, residual groups {cfg.depths}, d_state {cfg.d_state}, NSS "
            f"stripe {cfg.scan_len}, pixel-shuffle upsampler; {n_params:,} parameters; the published light model "
            f"has 1.36M) trained for x{cfg.scale} super-resolution for {result.step} steps of {cfg.batch_size} "
            f"random {cfg.gt_patch}px GT patches with L1 loss, on {runner.device.type}, starting from bilinear "
            f"upsampling (ssmkit's interp_init; official MaIR starts from random weights). Training images: the "
            f"photographs bundled in scikit-image and scikit-learn; LQ made on the fly by MATLAB-style bicubic "
            f"downsampling (with antialiasing). Evaluation: centre {cfg.eval_crop}px crops of the three held-out "
            f"images ({', '.join(eval_set.names)}), against MATLAB bicubic upsampling of the same LQ. Metrics are "
            f"on the 8-bit-rounded {'Y channel (BT.601)' if cfg.y_channel else 'RGB channels'} with a "
            f"{cfg.border}px border crop (BasicSR's protocol); these are smoke numbers, not paper benchmarks. "
            f"The picture shows a centre crop of LQ (nearest), bicubic, MaIR and GT for {eval_set.names[0]}, "
            f"titled with the PSNR of the whole evaluated image. Run folder: "
            f"`{result.out_dir}`.")
        metrics = {f"{pname} MaIR": m["psnr"], f"{pname} bicubic": m["baseline_psnr"],
                   "PSNR gain over bicubic (dB)": m["psnr_gain"], f"{sname} MaIR": m["ssim"],
                   f"{sname} bicubic": m["baseline_ssim"], "parameters": n_params, "train steps": result.step,
                   "training time (s)": round(result.wall_s, 1)}
        return ReportSection(f"Image super-resolution x{cfg.scale} with MaIR (ssmkit restore)", text, metrics,
                             images=[png, *result.plots])


application = RestoreApp()


# ----------------------------------------------------------------------------------------------
# test / run


def _load(cfg, model: nn.Module | None) -> nn.Module:
    """The given model, else the configured one with --weights / the run's weights; with
    --official-weights and no --weights the official checkpoint alone is used."""
    if model is not None:
        return model.eval()
    model = build_restorer(cfg)
    if cfg.official_weights and not cfg.weights:
        return model.eval()
    out = Path(cfg.out_dir or "runs/restore")
    path = Path(cfg.weights) if cfg.weights else (
        out / "best.safetensors" if (out / "best.safetensors").exists() else out / "model.safetensors")
    load_weights(model, path)
    return model.eval()


def _save_png(img: torch.Tensor, path: Path) -> Path:
    from PIL import Image

    array = (img.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)
    return path


@torch.no_grad()
def restore_images(model: nn.Module, lq: torch.Tensor, scale: int, tile: int, overlap: int) -> torch.Tensor:
    """model on one LQ image (C, h, w), tiled when `tile` > 0; returns (C, h*scale, w*scale) in [0, 1]."""
    return tiled_forward(model, lq[None], scale, tile, overlap)[0].clamp(0, 1)


def test(cfg: TestConfig, model: nn.Module | None = None) -> dict:
    """PSNR/SSIM of the model and the baseline for every eval image; prints a table, writes the
    restored images and results.json into the output folder; returns the results."""
    cfg.validate()
    model = _load(cfg, model)
    try:
        data = _eval_dataset(cfg)
    except DataError as e:
        raise RunError(str(e)) from None
    scale, kw = cfg.lq_scale, dict(crop_border=cfg.border, y_channel=cfg.y_channel)
    folder = Path(cfg.output) if cfg.output else Path(cfg.out_dir or "runs/restore") / "test"
    rows = []
    for i in range(len(data)):
        item = data[i]
        out = restore_images(model, item["lq"], scale, cfg.tile, cfg.tile_overlap)
        base = _baseline(item["lq"][None], scale)[0]
        rows.append({"name": item["name"], "psnr": psnr(out, item["gt"], **kw).item(),
                     "ssim": ssim(out, item["gt"], **kw).item(), "baseline_psnr": psnr(base, item["gt"], **kw).item(),
                     "baseline_ssim": ssim(base, item["gt"], **kw).item()})
        _save_png(out, folder / f"{item['name']}.png")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("psnr", "ssim", "baseline_psnr", "baseline_ssim")}
    pname, sname = metric_name("psnr", cfg.border, cfg.y_channel), metric_name("ssim", cfg.border, cfg.y_channel)
    base_name = "bicubic" if scale > 1 else "input"
    print(f"{'image':<24} {pname:>18} {sname:>18} {pname + ' ' + base_name:>26} {sname + ' ' + base_name:>26}")
    for r in [*rows, {"name": "mean", **mean}]:
        print(f"{r['name']:<24} {r['psnr']:>18.3f} {r['ssim']:>18.4f} {r['baseline_psnr']:>26.3f} "
              f"{r['baseline_ssim']:>26.4f}")
    result = {"metric": {"psnr": pname, "ssim": sname}, "baseline": base_name, "images": rows, "mean": mean}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"restore test: {len(rows)} images, wrote {folder}", flush=True)
    return result


def run(cfg: RunConfig, model: nn.Module | None = None) -> list[Path]:
    """Restore --input (a file or every image of a folder) into the output folder; returns the paths."""
    cfg.validate()
    model = _load(cfg, model)
    source = Path(cfg.input)
    try:
        if not source.exists():
            raise DataError(f"input {source} does not exist")
        files = list_images(source) if source.is_dir() else [source]
        folder = Path(cfg.output) if cfg.output else Path(cfg.out_dir or "runs/restore") / "restored"
        paths = []
        channels = model.config.in_chans
        for f in files:
            lq = read_image(f, channels)
            out = restore_images(model, lq, model.upscale, cfg.tile, cfg.tile_overlap)
            paths.append(_save_png(out, folder / f"{f.stem}.png"))
            print(f"restore run: {f} ({lq.shape[-2]}x{lq.shape[-1]}) -> {paths[-1]} "
                  f"({out.shape[-2]}x{out.shape[-1]})", flush=True)
    except DataError as e:
        raise RunError(str(e)) from None
    return paths


def save_comparison(path: Path, lq: torch.Tensor, bicubic: torch.Tensor, out: torch.Tensor, gt: torch.Tensor,
                    scale: int, border: int, y_channel: bool, crop: int = 96) -> Path:
    """PNG of the same centre crop of LQ (nearest upsampling), bicubic, model output and GT, with PSNRs."""
    from matplotlib.figure import Figure

    h, w = gt.shape[-2:]
    c = min(crop, h, w)
    top, left = (h - c) // 2, (w - c) // 2
    nearest = lq.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    panels = [("LQ (nearest)", nearest), ("bicubic", bicubic), ("MaIR", out), ("GT", gt)]
    fig = Figure(figsize=(10, 2.9), dpi=100, layout="constrained")
    axes = fig.subplots(1, 4)
    for ax, (label, img) in zip(axes, panels):
        if label != "GT":
            value = psnr(img[None].float(), gt[None].float(), crop_border=border, y_channel=y_channel).item()
            label = f"{label}\n{metric_name('psnr', border, y_channel)} {value:.2f} dB"
        view = img[:, top:top + c, left:left + c].float().clamp(0, 1).permute(1, 2, 0).numpy()
        ax.imshow(view[..., 0] if view.shape[2] == 1 else view, cmap="gray" if view.shape[2] == 1 else None,
                  interpolation="nearest")
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
