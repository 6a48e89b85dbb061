"""Figures of slide-level models: per-tile scores over a slide thumbnail, and tiles outlined by kind (PNG)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["draw_heatmap", "draw_tiles"]


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


def draw_tiles(thumb: np.ndarray, slide_size: tuple[int, int], coords: np.ndarray, size0: int, key: np.ndarray,
               solid: np.ndarray, path: Path, title: str = "") -> Path:
    """PNG of `thumb` with each tile outlined: purple where `key`, green elsewhere; solid where `solid`,
    dotted elsewhere."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    sx = thumb.shape[1] / slide_size[0]
    fig = Figure(figsize=(6, 6 * thumb.shape[0] / thumb.shape[1] + 0.4), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.imshow(thumb)
    for (x, y), k, s in zip(coords, key, solid):
        ax.add_patch(Rectangle((x * sx, y * sx), size0 * sx, size0 * sx, fill=False, lw=0.9, ls="-" if s else ":",
                               color="tab:purple" if k else "tab:green"))
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
