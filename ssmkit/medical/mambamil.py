"""MambaMIL (Yang et al., MICCAI 2024) and its 2-D variant: bag classifiers over whole-slide patch features.

A bag is one slide (or one patient: all its slides' features concatenated), `features` of shape
(N, in_dim) or (1, N, in_dim), optionally with the patches' level-0 `coords` (N, 2) as (x, y). Every
MIL model in `ssmkit.medical` returns the same dict:

    logits     (1, n_classes)  class logits, or survival-bin logits (see `ssmkit.medical.survival`)
    scores     (N,) or None    per-instance weights for heatmaps (attention, or instance logits)
    embedding  (1, d)          the pooled bag vector

Parameter names follow the reference (`_fc1`, `layers.{i}.0/1`, `norm`, `attention.{0,2}`, `classifier`;
the mixers use mamba_ssm's names), so a checkpoint of the reference code (`s_<fold>_checkpoint.pt`) loads
unchanged: `ssmkit.load_official("mambamil", path, in_dim=..., n_classes=...)` or with a model.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ssmkit.core.hydra import Hydra
from ssmkit.core.mamba import Mamba, StridedOrder
from ssmkit.core.mamba2 import Mamba2
from ssmkit.core.scan2d import Mamba2D
from ssmkit.registry import register_official

__all__ = ["check_bag", "attention_mlp", "attention_pool", "MambaMIL", "MambaMIL2D", "grid_positions",
           "convert_official_mambamil", "reference_init"]

MIXERS = ("sr", "bi", "uni", "mamba2", "hydra")
INITS = ("reference", "mamba")


def check_bag(features: torch.Tensor, in_dim: int, model: str) -> torch.Tensor:
    """The bag as (1, N, in_dim); a clear ValueError for a wrong rank, an empty bag or a width mismatch."""
    if features.dim() == 2:
        features = features.unsqueeze(0)
    if features.dim() != 3 or features.shape[0] != 1:
        raise ValueError(f"{model} expects one bag of features, shaped (N, {in_dim}) or (1, N, {in_dim}); "
                         f"got {tuple(features.shape)}")
    if features.shape[1] == 0:
        raise ValueError(f"{model} got an empty bag (0 instances); a slide with no tissue tiles cannot be classified")
    if features.shape[2] != in_dim:
        raise ValueError(
            f"feature width {features.shape[2]} does not match the model's in_dim {in_dim} ({model}); build the "
            f"model with in_dim={features.shape[2]} or extract features with the backbone it expects "
            "(1024: CLAM's truncated ResNet-50 or UNI, 512: PLIP or CONCH)")
    return features


def reference_init(model: nn.Module) -> None:
    """The reference MambaMIL initialisation: xavier-normal weights and zero bias on every nn.Linear.

    It reaches inside the Mamba mixers too, so `dt_proj.bias` becomes 0 instead of Mamba's inverse
    softplus of dt in [1e-3, 1e-1]: every channel starts with step delta = softplus(0) ~ 0.69, a short
    memory, rather than Mamba's spread of time scales. Conv, A_log and D keep Mamba's init.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def attention_mlp(dim: int, hidden: int = 128) -> nn.Sequential:
    """The non-gated ABMIL attention scorer w2 . tanh(W1 h) (the reference's `attention`)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def attention_pool(h: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax the raw instance `scores` (1, N) over the bag and pool h (1, N, d) -> ((1, d), weights (N,))."""
    a = torch.softmax(scores, dim=-1)
    return a @ h.squeeze(0), a.squeeze(0)


def _projection(in_dim: int, d_model: int, dropout: float) -> nn.Sequential:
    """The reference `_fc1`: Linear -> GELU (-> Dropout when p > 0)."""
    layers = [nn.Linear(in_dim, d_model), nn.GELU()]
    return nn.Sequential(*layers, nn.Dropout(dropout)) if dropout > 0 else nn.Sequential(*layers)


class _PooledMIL(nn.Module):
    """Shared tail of MambaMIL and MambaMIL2D: final LayerNorm, attention pooling, linear head.

    Attribute names `norm`, `attention`, `classifier` are the reference's."""

    def _finish_init(self, d_model: int, n_classes: int, init: str) -> None:
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.norm = nn.LayerNorm(d_model)
        self.attention = attention_mlp(d_model)
        self.classifier = nn.Linear(d_model, n_classes)
        if init == "reference":
            reference_init(self)

    def _pool(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.norm(h)
        bag, weights = attention_pool(h, self.attention(h).squeeze(-1))
        return {"logits": self.classifier(bag), "scores": weights, "embedding": bag}


class MambaMIL(_PooledMIL):
    """MambaMIL: projection, `n_layers` pre-norm residual SR-Mamba blocks, LayerNorm, attention pool, head.

    Each block is h <- h + Mamba(LayerNorm(h)) with a second branch over the sequence reordered with
    stride `rate` (`StridedOrder`: the bag zero-padded to a multiple of R and read every R-th instance),
    the two branch outputs summed (no halving) before out_proj. `mixer` "bi" uses a flipped second
    branch (BiMamba), "uni" a plain Mamba; "mamba2" a causal Mamba-2 (SSD) mixer and "hydra" Hydra's
    bidirectional SSD mixer (`headdim` channels per head; `d_conv` None keeps each mixer's own width: 4,
    Hydra's 7). The order of the instances matters (they are scanned in the order given; ssmkit's tiler
    writes row-major). `rate` defaults to 5, the value of every released
    training script (the reference constructor's default is 10).

    `init="reference"` (default) re-initialises every Linear as the reference does (`reference_init`,
    which zeroes the dt bias); `init="mamba"` keeps Mamba's own initialisation. Memory and time are
    linear in the bag length (the scan is linear; no N x N attention).
    """

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, d_model: int = 512, n_layers: int = 2,
                 mixer: str = "sr", rate: int = 5, d_state: int = 16, d_conv: int | None = None,
                 expand: float = 2, headdim: int = 64, dropout: float = 0.0, init: str = "reference",
                 backend: str | None = None):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        self.in_dim, self.n_classes = in_dim, n_classes
        self._fc1 = _projection(in_dim, d_model, dropout)

        shared = dict(d_state=d_state, expand=expand, backend=backend)
        if d_conv is not None:  # else the mixer's own width (Mamba, Mamba2: 4; Hydra: 7)
            shared["d_conv"] = d_conv

        def make_mixer() -> nn.Module:
            if mixer == "hydra":
                return Hydra(d_model, headdim=headdim, **shared)
            if mixer == "mamba2":
                return Mamba2(d_model, headdim=headdim, **shared)
            order = {"sr": StridedOrder(rate), "bi": "flip", "uni": None}[mixer]
            return Mamba(d_model, branch_order=order, divide_out=False, **shared)

        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(d_model), make_mixer()) for _ in range(n_layers))
        self._finish_init(d_model, n_classes, init)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self._fc1(check_bag(features, self.in_dim, type(self).__name__))
        for layer in self.layers:
            h = h + layer(h)
        return self._pool(h)


def grid_positions(coords: torch.Tensor, step: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Grid cells (row, col) of patches with level-0 top-left `coords` (N, 2) as (x, y), and the grid size.

    `step` is the level-0 patch stride; 0 infers it as the greatest common divisor of the coordinate
    offsets (exact for a regular tiling). Two patches on one cell, or a grid over 64x sparser than the
    bag, raise ValueError."""
    if coords is None or coords.dim() != 2 or coords.shape[1] != 2:
        raise ValueError("the 2-D model needs the patches' level-0 coords of shape (N, 2) as (x, y); got "
                         f"{None if coords is None else tuple(coords.shape)} (CLAM .h5 bags carry them)")
    xy = coords.detach().cpu().long().numpy()
    if (xy < 0).any():
        raise ValueError("the 2-D model needs level-0 patch coords, and this bag has none (a .pt bag without its "
                         ".h5 coords?)")
    xy = xy - xy.min(0)
    if step <= 0:
        step = int(np.gcd.reduce(xy.reshape(-1))) or 1
    if (xy % step).any():
        raise ValueError(f"patch coordinates are not on a grid of stride {step}")
    cells = torch.from_numpy(xy // step)
    cols, rows = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
    n = cells.shape[0]
    if rows * cols > 64 * n + 4096:
        raise ValueError(f"a {rows}x{cols} grid for {n} patches (stride {step}) is too sparse for the 2-D scan")
    flat = cells[:, 1] * cols + cells[:, 0]
    if flat.unique().numel() != n:
        raise ValueError(f"several patches share one grid cell at stride {step}; coords must be a regular tiling")
    return torch.stack([cells[:, 1], cells[:, 0]], 1).to(coords.device), (rows, cols)


class MambaMIL2D(_PooledMIL):
    """MambaMIL over the slide grid: instances placed at their patch positions and mixed by `Mamba2D`.

    The bag's level-0 coords give each instance a cell of an (H, W) grid (`grid_positions`); empty cells
    are zeros. Each block is h <- h + Mamba2D(LayerNorm(h)) on the grid (the 2-D selective scan over
    `directions`, all four corners by default); the occupied cells are then pooled by attention as in
    MambaMIL. Invariant to the order of the instances, sensitive to their layout.
    """

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, d_model: int = 512, n_layers: int = 2,
                 d_state: int = 16, d_conv: int = 3, expand: float = 2, dropout: float = 0.0,
                 directions: tuple[str, ...] = ("tl", "tr", "bl", "br"), patch_step: int = 0,
                 init: str = "reference", backend: str | None = None):
        super().__init__()
        self.in_dim, self.n_classes, self.d_model, self.patch_step = in_dim, n_classes, d_model, patch_step
        self._fc1 = _projection(in_dim, d_model, dropout)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d_model),
                          Mamba2D(d_model, d_state=d_state, d_conv=d_conv, expand=expand, directions=directions,
                                  backend=backend))
            for _ in range(n_layers))
        self._finish_init(d_model, n_classes, init)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self._fc1(check_bag(features, self.in_dim, type(self).__name__))
        if coords is not None and coords.dim() == 3:
            coords = coords.squeeze(0)
        if coords is not None and coords.shape[0] != h.shape[1]:
            raise ValueError(f"MambaMIL2D: {h.shape[1]} instances but {coords.shape[0]} coords")
        cells, (rows, cols) = grid_positions(coords, self.patch_step)
        flat = cells[:, 0] * cols + cells[:, 1]
        grid = h.new_zeros(1, rows * cols, self.d_model).index_copy(1, flat, h)
        for layer in self.layers:
            grid = grid + layer[1](layer[0](grid).view(1, rows, cols, self.d_model)).view(1, rows * cols, -1)
        return self._pool(grid.index_select(1, flat))



def convert_official_mambamil(state_dict: dict[str, torch.Tensor], config=None) -> dict[str, torch.Tensor]:
    """The reference MambaMIL code's state dict (DataParallel's `module.` prefix already dropped by the
    reader) in ssmkit's names: the parameter names are the reference's, so the keys carry over as they are."""
    return dict(state_dict)


register_official("mambamil", (MambaMIL, MambaMIL2D), convert_official_mambamil, config_of=lambda model: None)
