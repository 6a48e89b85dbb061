"""A true 2-D selective scan (Mamba2D-style) and the first-order linear scan it is built on.

For the top-left origin ("tl"), with dt = softplus(delta + delta_bias) (or delta + delta_bias),
Ā = exp(dt·A) and B̄x = dt·B·u at each cell (per channel d and state n):

    row pass     g[i, j] = Ā[i, j] · g[i, j-1] + B̄x[i, j]          (g[i, -1] = 0)
    column pass  h[i, j] = Ā[i, j] · h[i-1, j] + g[i, j]           (h[-1, j] = 0)
    output       y[i, j] = Σ_n C[i, j, n] · h[i, j, n]  (+ D·u[i, j], added once)

so h[i, j] sums B̄x over the whole rectangle above-left of (i, j), each term decayed along the path
"right along its own row, then down column j", at cost linear in H·W. "tr", "bl", "br" put the
origin in the other corners (rows and/or columns scanned backwards); several directions are summed,
so all four make every cell see the whole image.

Both passes run on `ssmkit.core.scan.linear_scan` (h_t = a_t·h_{t-1} + b_t along one dim).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmkit.core.mamba import add_ssm_parameters
from ssmkit.core.scan import _pick_backend, linear_scan
from ssmkit.util import compute_dtype, shape_error

__all__ = ["selective_scan_2d", "Mamba2D", "DIRECTIONS", "BACKENDS_2D"]

DIRECTIONS = ("tl", "tr", "bl", "br")
BACKENDS_2D = ("ref", "chunked", "cpu", "triton")


# ----------------------------------------------------------------------------------------------
# 2-D selective scan


def _check_2d_args(u, delta, A, B, C, D, delta_bias, directions, backend):
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D),
                    ("delta_bias", delta_bias)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"selective_scan_2d: {name} must be a real floating-point tensor, got {t.dtype}")
    if u.dim() != 4 or 0 in u.shape:
        raise shape_error("selective_scan_2d", "u", u, "(batch, dim, H, W), all non-empty")
    batch, dim, H, W = u.shape
    if delta.shape != u.shape:
        raise shape_error("selective_scan_2d", "delta", delta, f"{tuple(u.shape)}, the shape of u")
    if A.dim() != 2 or A.shape[0] != dim:
        raise shape_error("selective_scan_2d", "A", A, f"(dim, d_state) = ({dim}, N)")
    N = A.shape[1]
    out = []
    for name, X in (("B", B), ("C", C)):
        X = X.unsqueeze(1) if X.dim() == 4 else X
        if X.dim() != 5 or (X.shape[0], X.shape[2], X.shape[3], X.shape[4]) != (batch, N, H, W) \
                or dim % X.shape[1] != 0:
            raise shape_error("selective_scan_2d", name, X, f"(batch, groups, d_state, H, W) = ({batch}, G, {N}, "
                              f"{H}, {W}) with G dividing dim={dim}, or (batch, d_state, H, W)")
        out.append(X)
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (dim,):
            raise shape_error("selective_scan_2d", name, v, f"(dim,) = ({dim},)")
    directions = (directions,) if isinstance(directions, str) else tuple(directions)
    if not directions or any(d not in DIRECTIONS for d in directions):
        raise ValueError(f"selective_scan_2d: directions {directions!r} must be a non-empty sequence "
                         f"of {DIRECTIONS}")
    if backend not in (None,) + BACKENDS_2D:
        raise ValueError(f"selective_scan_2d: unknown backend {backend!r}; choose one of {BACKENDS_2D}")
    return out[0], out[1], directions


def _per_channel(X, dim):
    """(batch, G, N, H, W) -> (batch, dim, N, H, W) view-broadcast per channel (channel d in group d // (dim/G))."""
    b, G, N, H, W = X.shape
    return X[:, :, None].expand(b, G, dim // G, N, H, W).reshape(b, dim, N, H, W)


def selective_scan_2d(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, *,
                      directions=("tl",), backend=None):
    """2-D selective scan over (batch, dim, H, W); see the module docstring for the recurrence.

    A: (dim, d_state) real (e.g. -exp(A_log)). B, C: (batch, groups, d_state, H, W) with groups
    dividing dim, or (batch, d_state, H, W). D, delta_bias: (dim,). directions: any of "tl", "tr",
    "bl", "br" (origins; outputs summed, D·u added once). Returns y (batch, dim, H, W), dtype of u;
    computed in fp32 (fp64 for fp64 u).
    backend "ref": a double loop over cells (the oracle; H·W Python steps).
    backend "chunked": two `linear_scan`s per direction, rows then columns, parallel over the grid. It
    materialises Ā and the states g, h as (batch, dim, d_state, H, W) — d_state times the input size,
    plus the same again saved for backward.
    backend "cpu" (the CPU default where a C compiler is found): `ssmkit.kernels.cpu`, both passes fused
    cell by cell with one row of states per channel; "triton" (the CUDA default; fp32 compute):
    `ssmkit.kernels.scan2d`, both passes fused row by row. Neither stores the states whole (memory
    O(·d_state·W·√H), recomputation in backward).
    """
    B, C, directions = _check_2d_args(u, delta, A, B, C, D, delta_bias, directions, backend)
    cd = compute_dtype(u)
    dim = u.shape[1]
    dt = delta.to(cd)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cd)[:, None, None]
    if delta_softplus:
        dt = F.softplus(dt)
    backend = _pick_backend(backend, u.device, u.dtype)
    if backend == "triton":
        from ssmkit.kernels.scan2d import scan2d_triton

        y = sum(scan2d_triton(dt.float(), u.float(), A.float(), B.float(), C.float(), right_to_left=d[1] == "r",
                              bottom_up=d[0] == "b") for d in directions).to(cd)
    elif backend == "cpu":
        from ssmkit.kernels.cpu import scan2d_cpu

        u_, A_, B_, C_ = u.to(cd), A.to(cd), B.to(cd), C.to(cd)
        y = sum(scan2d_cpu(dt, u_, A_, B_, C_, right_to_left=d[1] == "r", bottom_up=d[0] == "b") for d in directions)
    else:
        a = torch.exp(dt[:, :, None] * A.to(cd)[None, :, :, None, None])  # (batch, dim, N, H, W)
        x = (dt * u.to(cd))[:, :, None] * _per_channel(B.to(cd), dim)
        scan = _scan2d_ref if backend == "ref" else _scan2d_chunked
        y = sum(scan(a, x, right_to_left=d[1] == "r", bottom_up=d[0] == "b") for d in directions)
        y = (y * _per_channel(C.to(cd), dim)).sum(2)
    if D is not None:
        y = y + D.to(cd)[:, None, None] * u.to(cd)
    return y.to(u.dtype)


def _scan2d_chunked(a, x, right_to_left, bottom_up):
    g = linear_scan(a, x, dim=-1, reverse=right_to_left)
    return linear_scan(a, g, dim=-2, reverse=bottom_up)


def _scan2d_ref(a, x, right_to_left, bottom_up):
    """The recurrence cell by cell, in the direction's order; returns h (batch, dim, N, H, W)."""
    H, W = x.shape[-2:]
    rows = range(H - 1, -1, -1) if bottom_up else range(H)
    cols = range(W - 1, -1, -1) if right_to_left else range(W)
    zero = torch.zeros_like(x[..., 0, 0])
    h = [[None] * W for _ in range(H)]
    above = [zero] * W
    for i in rows:
        g = zero
        for j in cols:
            g = a[..., i, j] * g + x[..., i, j]
            above[j] = h[i][j] = a[..., i, j] * above[j] + g
    return torch.stack([torch.stack(row, -1) for row in h], -2)


# ----------------------------------------------------------------------------------------------
# mixer


class Mamba2D(nn.Module):
    """Mamba mixer over an image: (batch, H, W, d_model), or (batch, H·W, d_model) with hw=(H, W).

    Mamba's projections and initialisation (in_proj, x_proj, dt_proj, A_log, D, out_proj; the SSM
    parameters from `add_ssm_parameters`) with a depthwise d_conv×d_conv 2-D conv ("same" padding, d_conv odd)
    in place of the causal 1-D conv, and `selective_scan_2d` over `directions` in place of the 1-D
    scan; y·silu(z) then out_proj. Non-causal with the default four directions.
    """

    def __init__(self, d_model, d_state=16, d_conv=3, expand=2, dt_rank="auto", directions=DIRECTIONS,
                 dt_min=0.001, dt_max=0.1, dt_init="random", dt_scale=1.0, dt_init_floor=1e-4,
                 conv_bias=True, bias=False, backend=None, device=None, dtype=None):
        super().__init__()
        if d_conv % 2 != 1:
            raise ValueError(f"Mamba2D: d_conv must be odd for 'same' padding, got {d_conv}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.directions = tuple(directions)
        self.backend = backend
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        add_ssm_parameters(self, ("x_proj", "dt_proj", "A_log", "D"), self.d_inner, d_state, self.dt_rank,
                           dt_min=dt_min, dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale,
                           dt_init_floor=dt_init_floor, factory=factory)
        self.conv2d = nn.Conv2d(self.d_inner, self.d_inner, d_conv, padding=d_conv // 2,
                                groups=self.d_inner, bias=conv_bias, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, x, hw=None):
        if x.dim() == 3 and hw is not None and hw[0] * hw[1] == x.shape[1] and x.shape[-1] == self.d_model:
            return self.forward(x.reshape(x.shape[0], *hw, self.d_model)).flatten(1, 2)
        if x.dim() != 4 or x.shape[-1] != self.d_model or hw is not None:
            raise ValueError(f"Mamba2D expects (batch, H, W, {self.d_model}), or (batch, H*W, {self.d_model}) "
                             f"with hw=(H, W); got {tuple(x.shape)} with hw={hw}")
        xs, z = self.in_proj(x).permute(0, 3, 1, 2).chunk(2, dim=1)  # (batch, d_inner, H, W) each
        xs = F.silu(self.conv2d(xs))
        dt, b, c = self.x_proj(xs.permute(0, 2, 3, 1)).split([self.dt_rank, self.d_state, self.d_state], -1)
        delta = (dt @ self.dt_proj.weight.t()).permute(0, 3, 1, 2)
        y = selective_scan_2d(xs, delta, -torch.exp(self.A_log.float()), b.permute(0, 3, 1, 2),
                              c.permute(0, 3, 1, 2), D=self.D.float(), delta_bias=self.dt_proj.bias.float(),
                              delta_softplus=True, directions=self.directions, backend=self.backend)
        y = y * F.silu(z)
        return self.out_proj(y.permute(0, 2, 3, 1))
