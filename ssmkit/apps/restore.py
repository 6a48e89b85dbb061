"""`ssmkit restore`: train and apply MaIR image restorers (super-resolution and denoising).

Data: BasicSR's paired LQ/GT folders (`--gt-dir`, `--lq-dir`, `--filename-tmpl`), GT-only folders
degraded on the fly (`--gt-dir` alone), or by default the photographs bundled in scikit-image and
scikit-learn (`ssmkit.vision.restoration.embedded_images`, three held out). The model decides the scale
(`--model mair_micro_sr_x3`, `mair_light_sr_x4`, ...); the degradation is MATLAB bicubic by that
scale for `--task sr`, Gaussian noise of `--sigma` (0-255 units) for `--task denoise` (a size-keeping
model such as mair_micro_denoise), or any `--degradation` spec ("blur2+bicubic2", "jpeg30"...).

Training goes through the shared runner (L1 or Charbonnier loss; AdamW with weight decay 0 and the
runner's warm-up + cosine schedule in place of the papers' Adam + MultiStepLR, scaled down to a CPU
run). Evaluation reports PSNR / SSIM of the model and of the baseline (MATLAB bicubic upsampling of the
LQ for SR, the noisy input for denoising), on Y or RGB with a border crop as configured; the metric
names say which (`--y-channel`, `--crop-border`, -1 = the scale, as SR papers do).

`ssmkit restore test` scores a run's weights image by image on its eval data (or other data given)
and writes the outputs; `ssmkit restore run` restores one image or a folder of any size, tiled (`--tile`).
Both also run official MaIR weights without a run (`--official-weights` with the matching `--model`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from ssmkit.apps.application import Application, Command, RunContext, RunSpec, build_registered, load_run
from ssmkit.apps.config import (ConfigError, DeviceOptions, EvalOptions, ModelOptions, RunOptions, SeedOptions,
                                TrainOptions, WeightsOptions, compose, option, parse_kwargs)
from ssmkit.apps.report import ReportSection
from ssmkit.apps.run_folder import RunFolder
from ssmkit.apps.runner import Runner, train_and_eval
from ssmkit.errors import DataError
from ssmkit.vision.mair import MAIR_CONFIGS
from ssmkit.vision.metrics import metric_name, psnr, ssim
from ssmkit.vision.plots import save_comparison
from ssmkit.vision.restoration import (BicubicDown, DegradedDataset, GaussianNoise, PairedFolderDataset,
                                       charbonnier_loss, embedded_images, imresize, list_images, load_gt_folder,
                                       parse_degradation, read_image, save_png, scale_of, tiled_forward)

__all__ = ["RestoreData", "RestoreTrain", "RestoreTest", "RestoreRun", "RestoreApp", "application", "test", "run"]


@dataclass
class RestoreData:
    """The task, the images and how they are degraded."""

    title = "data"
    task: str = option("sr", "super-resolution by the model's scale (MATLAB bicubic LQ) or Gaussian denoising",
                       ("sr", "denoise"))
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

    def check(self) -> None:
        if self.task == "denoise" and self.sigma <= 0:
            raise ConfigError(f"sigma must be positive, got {self.sigma}")
        if self.degradation:
            try:
                parse_degradation(self.degradation)
            except ValueError as e:
                raise ConfigError(f"--degradation: {e}") from None
        if self.lq_dir and not self.gt_dir or self.eval_lq_dir and not self.eval_gt_dir:
            raise ConfigError("an LQ folder needs its GT folder (--gt-dir / --eval-gt-dir)")


@dataclass
class Protocol:
    """How PSNR and SSIM are measured (BasicSR's conventions)."""

    title = "metrics"
    y_channel: bool = option(True, "PSNR/SSIM on the Y channel (SR papers) instead of RGB")
    crop_border: int = option(-1, "pixels cropped from each edge before PSNR/SSIM (-1: the scale for SR, 0 else)")


@dataclass
class Tiling:
    """Tiled inference for large images."""

    title = "tiling"
    tile: int = option(0, "tiled inference in evaluation / test / run: LQ tile size (0: whole images)")
    tile_overlap: int = option(16, "overlap of neighbouring tiles in LQ pixels")

    def check(self) -> None:
        if self.tile < 0 or self.tile_overlap < 0 or (self.tile and self.tile_overlap >= self.tile):
            raise ConfigError(f"need tile >= 0 and 0 <= tile_overlap < tile, got {self.tile} / {self.tile_overlap}")


@dataclass
class RestoreModel(ModelOptions):
    """The MaIR configuration (it decides the scale) and optional official weights."""

    official_weights: str = option("", "official MaIR checkpoint (.pth) to start from, or to test / run without a "
                                       "trained run (local path)")


@dataclass
class RestoreLoss:
    """The training loss."""

    title = "loss"
    loss: str = option("l1", "training loss (MaIR: L1 for SR, Charbonnier for denoising)", ("l1", "charbonnier"))


@dataclass
class Output:
    """Where the restored images go."""

    title = "output"
    output: str = option("", "output folder (empty: <out-dir>/test for test, <out-dir>/restored for run)")


@dataclass
class Input:
    """The images to restore."""

    title = "input"
    input: str = option("", "an LQ image file or a folder of them")

    def check(self) -> None:
        if not self.input:
            raise ConfigError("--input is required: an image file or a folder")


RestoreTrain = compose("RestoreTrain", RunOptions, SeedOptions, RestoreData, Protocol, Tiling, RestoreModel,
                       RestoreLoss, TrainOptions, EvalOptions, DeviceOptions, defaults=dict(
                           model="mair_micro_sr_x2", steps=150, batch_size=8, lr=2e-3, beta2=0.99, weight_decay=0.0,
                           warmup_steps=20, eval_every=0, eval_batch_size=1, log_every=25),
                       doc="`ssmkit restore train`: the task and data, the metrics protocol, MaIR and training.")
RestoreTest = compose("RestoreTest", RunOptions, WeightsOptions, RestoreData, Protocol, Tiling, RestoreModel, Output,
                      SeedOptions,
                      defaults=dict(model="mair_micro_sr_x2"),
                      doc="`ssmkit restore test`: a run's (or official) weights, image by image.")
RestoreRun = compose("RestoreRun", RunOptions, WeightsOptions, Tiling, RestoreModel, Input, Output,
                     defaults=dict(model="mair_micro_sr_x2"),
                     doc="`ssmkit restore run`: restore images of any size.")


def model_scale(cfg) -> int:
    """The upscale of the configured MaIR (its registered config, or --model-kwargs upscale)."""
    if cfg.model not in MAIR_CONFIGS:
        raise ConfigError(f"--model {cfg.model!r} is not a MaIR configuration; choose from {', '.join(MAIR_CONFIGS)}")
    return int(parse_kwargs(cfg.model_kwargs, "model_kwargs").get("upscale", MAIR_CONFIGS[cfg.model]["upscale"]))


def build_degradation(cfg):
    """The on-the-fly degradation: --degradation, else the task's at the model's scale (checked to agree)."""
    scale = model_scale(cfg)
    if cfg.degradation:
        degradation = parse_degradation(cfg.degradation)
    elif cfg.task == "sr":
        if scale == 1:
            raise ConfigError(f"--task sr needs an upscaling model; {cfg.model} keeps the size (use --task denoise "
                              f"or a mair_*_sr_x<scale> model)")
        degradation = BicubicDown(scale)
    else:
        if scale != 1:
            raise ConfigError(f"--task denoise needs a model that keeps the size; {cfg.model} upscales x{scale} "
                              f"(use mair_micro_denoise or mair_denoise)")
        degradation = GaussianNoise(cfg.sigma)
    if scale_of(degradation) != scale:
        raise ConfigError(f"--degradation {cfg.degradation} makes x{scale_of(degradation)} LQ images, but {cfg.model} "
                          f"upscales x{scale}")
    return degradation


def border(cfg) -> int:
    return cfg.crop_border if cfg.crop_border >= 0 else (model_scale(cfg) if cfg.task == "sr" else 0)


def _eval_dataset(cfg) -> tuple[Dataset, str]:
    """The eval images of `cfg` and what they are, in words."""
    degradation, scale = build_degradation(cfg), model_scale(cfg)
    if cfg.eval_gt_dir and cfg.eval_lq_dir:
        return (PairedFolderDataset(cfg.eval_gt_dir, cfg.eval_lq_dir, scale, filename_tmpl=cfg.filename_tmpl),
                f"the pairs of {cfg.eval_gt_dir} and {cfg.eval_lq_dir}")
    if cfg.eval_gt_dir:
        images, names = load_gt_folder(cfg.eval_gt_dir)
        return DegradedDataset(images, names, degradation, seed=cfg.seed), f"the images of {cfg.eval_gt_dir}"
    _, held = embedded_images()
    return (DegradedDataset(list(held.values()), list(held), degradation, seed=cfg.seed, eval_crop=cfg.eval_crop),
            f"the {len(held)} embedded held-out photographs")


def _baseline(lq: torch.Tensor, scale: int) -> torch.Tensor:
    """What the model must beat: MATLAB bicubic upsampling of the LQ (SR), or the LQ itself."""
    return imresize(lq, float(scale)) if scale > 1 else lq


class RestoreApp(Application):
    """Train and evaluate MaIR restorers; PSNR/SSIM against the bicubic or noisy-input baseline."""

    name = "restore"
    help = "image restoration (SR, denoising) with MaIR: train, eval, test over a folder, run on images"
    train_config = RestoreTrain
    data_groups = (RestoreData, Protocol, Tiling)
    metrics = {"psnr": "max", "ssim": "max", "baseline_psnr": "max", "baseline_ssim": "max", "psnr_gain": "max",
               "l1": "min"}

    def setup(self, cfg) -> RunSpec:
        degradation, scale = build_degradation(cfg), model_scale(cfg)
        if cfg.gt_patch < scale or cfg.gt_patch % scale:
            raise ConfigError(f"gt_patch ({cfg.gt_patch}) must be a positive multiple of the scale ({scale})")
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
        evals, described = _eval_dataset(cfg)
        for data, folder in ((train, cfg.gt_dir), (evals, cfg.eval_gt_dir)):
            if data[0]["gt"].shape[0] != 3:
                raise DataError(f"{folder} holds grayscale images; ssmkit restore trains RGB models (convert them)")
        return RunSpec(train, evals, {"scale": scale}, described)

    def build_model(self, ctx: RunContext) -> nn.Module:
        return build_registered(ctx.cfg, official_weights=ctx.cfg.official_weights)

    def collate(self, samples: list) -> dict:
        shapes = {tuple(s["gt"].shape) for s in samples}
        if len(shapes) > 1:
            raise DataError(f"images of sizes {sorted(shapes)} cannot share a batch; use --eval-batch-size 1")
        return default_collate(samples)

    def train_loss(self, model, batch, ctx: RunContext) -> torch.Tensor:
        out = model(batch["lq"]).float()
        if ctx.cfg.loss == "charbonnier":
            return charbonnier_loss(out, batch["gt"].float())
        return F.l1_loss(out, batch["gt"].float())

    def eval_step(self, model, batch, ctx: RunContext) -> dict[str, torch.Tensor]:
        cfg, scale = ctx.cfg, ctx.meta["scale"]
        lq, gt = batch["lq"].float(), batch["gt"].float()
        out = tiled_forward(model, lq, scale, cfg.tile, cfg.tile_overlap).float()
        base = _baseline(lq, scale)
        kw = dict(crop_border=border(cfg), y_channel=cfg.y_channel)
        p, bp = psnr(out, gt, **kw), psnr(base, gt, **kw)
        return {"psnr": p, "ssim": ssim(out, gt, **kw), "baseline_psnr": bp, "baseline_ssim": ssim(base, gt, **kw),
                "psnr_gain": p - bp, "l1": (out - gt).abs().mean((1, 2, 3))}

    def commands(self) -> list[Command]:
        return [*train_and_eval(self),
                Command("test", "score weights image by image on the run's eval data (or --eval-gt-dir ...): "
                                "per-image PSNR/SSIM table, outputs written", RestoreTest, test),
                Command("run", "restore an image or a folder of any size with tiled inference", RestoreRun, run)]

    def demo(self, out_dir: Path, smoke: bool) -> ReportSection:
        sizes = (dict(steps=4, batch_size=2, gt_patch=16, train_size=16, model_kwargs="embed_dim=8,depths=(1,)",
                      eval_crop=24, warmup_steps=1, eval_every=0, log_every=2) if smoke else {})
        cfg = RestoreTrain(out_dir=str(out_dir / self.name), overwrite=True, **sizes)
        cfg.validate()
        runner = Runner(self, cfg)
        result = runner.train()
        model = result.model.cpu()
        eval_set, _ = _eval_dataset(cfg)
        item = eval_set[0]
        scale = result.meta["scale"]
        with torch.no_grad():
            out = model(item["lq"][None])[0]
        bicubic = _baseline(item["lq"][None], scale)[0]
        png = save_comparison(Path(cfg.out_dir) / "comparison.png", item["lq"], bicubic, out, item["gt"],
                              scale, border(cfg), cfg.y_channel)
        m = result.metrics
        pname = metric_name("psnr", border(cfg), cfg.y_channel)
        sname = metric_name("ssim", border(cfg), cfg.y_channel)
        n_params = sum(p.numel() for p in model.parameters())
        mc = model.config
        runner.say(f"restore: {pname} {m['psnr']:.2f} dB vs bicubic {m['baseline_psnr']:.2f} dB "
                   f"(gain {m['psnr_gain']:+.2f} dB)")
        text = (
            f"A small MaIR (`{cfg.model}`: embed dim {mc.embed_dim}, residual groups {mc.depths}, d_state "
            f"{mc.d_state}, NSS stripe {mc.scan_len}, pixel-shuffle upsampler; {n_params:,} parameters; the "
            f"published light model has 1.36M) trained for x{scale} super-resolution for {result.step} steps of "
            f"{cfg.batch_size} random {cfg.gt_patch}px GT patches with L1 loss, on {runner.device.type}, starting from "
            f"bilinear upsampling (ssmkit's interp_init; official MaIR starts from random weights). Training images: "
            f"the photographs bundled in scikit-image and scikit-learn; LQ made on the fly by MATLAB-style bicubic "
            f"downsampling (with antialiasing). Evaluation: centre {cfg.eval_crop}px crops of the three held-out "
            f"images ({', '.join(eval_set.names)}), against MATLAB bicubic upsampling of the same LQ. Metrics are "
            f"on the 8-bit-rounded {'Y channel (BT.601)' if cfg.y_channel else 'RGB channels'} with a "
            f"{border(cfg)}px border crop (BasicSR's protocol); these are smoke numbers, not paper benchmarks. "
            f"The picture shows a centre crop of LQ (nearest), bicubic, MaIR and GT for {eval_set.names[0]}, "
            f"titled with the PSNR of the whole evaluated image. Run folder: `{result.out_dir}`.")
        metrics = {f"{pname} MaIR": m["psnr"], f"{pname} bicubic": m["baseline_psnr"],
                   "PSNR gain over bicubic (dB)": m["psnr_gain"], f"{sname} MaIR": m["ssim"],
                   f"{sname} bicubic": m["baseline_ssim"], "parameters": n_params, "train steps": result.step,
                   "training time (s)": round(result.wall_s, 1)}
        return ReportSection(f"Image super-resolution x{scale} with MaIR (ssmkit restore)", text, metrics,
                             images=[png, *result.plots])


application = RestoreApp()


# ----------------------------------------------------------------------------------------------
# test / run


def _model(cfg) -> tuple[nn.Module, object, RunFolder]:
    """(model, the configuration it was trained with, the folder outputs go to): official weights alone
    (--official-weights without a run), or the run in --out-dir."""
    folder = RunFolder.of(cfg, application.name)
    if cfg.official_weights and not cfg.weights and not folder.config_file.is_file():
        return application.build_model(RunContext(cfg, {})).eval(), cfg, folder
    loaded = load_run(application, cfg)
    return loaded.model, loaded.cfg, loaded.folder


@torch.no_grad()
def _restore(model: nn.Module, lq: torch.Tensor, scale: int, tile: int, overlap: int) -> torch.Tensor:
    """model on one LQ image (C, h, w), tiled when `tile` > 0; returns (C, h*scale, w*scale) in [0, 1]."""
    return tiled_forward(model, lq[None], scale, tile, overlap)[0].clamp(0, 1)


def test(cfg) -> dict:
    """PSNR/SSIM of the model and the baseline for every eval image of the run's data (or the data options
    given); prints a table, writes the restored images and results.json; returns the results."""
    model, run_cfg, folder = _model(cfg)
    data, described = _eval_dataset(run_cfg)
    scale, kw = model_scale(run_cfg), dict(crop_border=border(run_cfg), y_channel=run_cfg.y_channel)
    out_folder = Path(cfg.output) if cfg.output else folder / "test"
    rows = []
    for i in range(len(data)):
        item = data[i]
        out = _restore(model, item["lq"], scale, run_cfg.tile, run_cfg.tile_overlap)
        base = _baseline(item["lq"][None], scale)[0]
        rows.append({"name": item["name"], "psnr": psnr(out, item["gt"], **kw).item(),
                     "ssim": ssim(out, item["gt"], **kw).item(), "baseline_psnr": psnr(base, item["gt"], **kw).item(),
                     "baseline_ssim": ssim(base, item["gt"], **kw).item()})
        save_png(out, out_folder / f"{item['name']}.png")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("psnr", "ssim", "baseline_psnr", "baseline_ssim")}
    pname, sname = metric_name("psnr", kw["crop_border"], kw["y_channel"]), metric_name("ssim", kw["crop_border"],
                                                                                        kw["y_channel"])
    base_name = "bicubic" if scale > 1 else "input"
    print(f"restore test on {described}")
    print(f"{'image':<24} {pname:>18} {sname:>18} {pname + ' ' + base_name:>26} {sname + ' ' + base_name:>26}")
    for r in [*rows, {"name": "mean", **mean}]:
        print(f"{r['name']:<24} {r['psnr']:>18.3f} {r['ssim']:>18.4f} {r['baseline_psnr']:>26.3f} "
              f"{r['baseline_ssim']:>26.4f}")
    result = {"metric": {"psnr": pname, "ssim": sname}, "baseline": base_name, "data": described, "images": rows,
              "mean": mean}
    out_folder.mkdir(parents=True, exist_ok=True)
    (out_folder / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"restore test: {len(rows)} images, wrote {out_folder}", flush=True)
    return result


def run(cfg) -> list[Path]:
    """Restore --input (a file or every image of a folder) into the output folder; returns the paths."""
    model, _, folder = _model(cfg)
    source = Path(cfg.input)
    if not source.exists():
        raise DataError(f"input {source} does not exist")
    files = list_images(source) if source.is_dir() else [source]
    out_folder = Path(cfg.output) if cfg.output else folder / "restored"
    paths = []
    for f in files:
        lq = read_image(f, model.config.in_chans)
        out = _restore(model, lq, model.upscale, cfg.tile, cfg.tile_overlap)
        paths.append(save_png(out, out_folder / f"{f.stem}.png"))
        print(f"restore run: {f} ({lq.shape[-2]}x{lq.shape[-1]}) -> {paths[-1]} ({out.shape[-2]}x{out.shape[-1]})",
              flush=True)
    return paths
