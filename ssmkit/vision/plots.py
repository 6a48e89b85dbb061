"""Figures of vision runs: the confusion matrix and a grid of held-out predictions of a classifier, the same
crop of LQ, bicubic, restored and GT images of a restorer (PNG), and video rollouts (PNG strip, GIF)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["plot_confusion", "plot_predictions", "save_comparison", "save_strip", "save_gif"]


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path) -> Path:
    """PNG of a (true, predicted) count matrix, annotated with the counts for up to 12 classes."""
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


def plot_predictions(test, preds: np.ndarray, path: Path, n: int = 24) -> Path:
    """PNG of `n` held-out images of a `ClassificationDataset` with their predicted classes: some of the
    mistakes (red, true class in brackets) beside an even spread of the rest."""
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


def save_comparison(path: Path, lq: torch.Tensor, bicubic: torch.Tensor, out: torch.Tensor, gt: torch.Tensor,
                    scale: int, border: int, y_channel: bool, crop: int = 96) -> Path:
    """PNG of the same centre crop of LQ (nearest upsampling), bicubic, model output and GT, with PSNRs."""
    from matplotlib.figure import Figure

    from ssmkit.vision.metrics import metric_name, psnr

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
