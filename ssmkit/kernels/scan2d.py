"""Triton kernel of the 2-D selective scan (`ssmkit.core.scan2d.selective_scan_2d`, backend "triton").

One program per (batch, channel) holds one image row of states, a (W, d_state) tile, and walks down
the rows of one direction: the row pass is an associative scan along the tile's W axis, the column
pass is one fused multiply-add with the row above (kept in registers), and y = C·h is reduced over
d_state before anything is written. The (batch, dim, d_state, H, W) state tensor is never stored:
the forward saves only the state entering every K-th row (K ≈ √H), and the backward recomputes each
band of K rows into a per-program scratch of K + 1 rows, then runs the adjoint recurrences bottom-up:

    λh[i, j] = C[i, j]·dy[i, j] + Ā[i+1, j]·λh[i+1, j]          (column pass, carried in registers)
    λg[i, j] = λh[i, j] + Ā[i, j+1]·λg[i, j+1]                   (row pass, reverse associative scan)
    dĀ[i, j] = λh[i, j]·h[i-1, j] + λg[i, j]·g[i, j-1],   d(B̄x)[i, j] = λg[i, j]

Memory is O(batch·dim·d_state·W·(K + H/K)), i.e. O(·W·√H) instead of O(·W·H). dB and dC are summed over
the channels of a group with atomic adds (not bitwise reproducible run to run). The kernel takes dt
after softplus/bias and returns Σ_n C·h of one direction; `core.scan2d` adds D·u and sums directions,
and autograd handles the softplus and bias.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ssmkit.kernels._common import _combine

__all__ = ["scan2d_triton"]


@triton.jit
def _index(i, n, BACKWARDS: tl.constexpr):
    """Image row or column of scan position i along an axis of length n (scanned backwards: n - 1 - i)."""
    if BACKWARDS:
        return n - 1 - i
    else:
        return i


@triton.jit
def _load_row(dt_ptr, u_ptr, B_ptr, A, row, cols, n, pm, mask2, sB_n, sB_h, sB_w, W):
    """dt, u and B of one image row in scan order, and Ā = exp(dt·A) (1 in the padding)."""
    dtv = tl.load(dt_ptr + row * W + cols, mask=pm, other=0.0)
    uv = tl.load(u_ptr + row * W + cols, mask=pm, other=0.0)
    Bv = tl.load(B_ptr + n[None, :] * sB_n + row * sB_h + cols[:, None] * sB_w, mask=mask2, other=0.0)
    a = tl.where(mask2, tl.exp(dtv[:, None] * A[None, :]), 1.0)
    return dtv, uv, Bv, a


@triton.jit
def _next_row_state(h, a, dtv, uv, Bv):
    """The states of the next row from the row above: row pass (scan along W), then the column step."""
    _, g = tl.associative_scan((a, (dtv * uv)[:, None] * Bv), axis=0, combine_fn=_combine)
    return a * h + g


@triton.jit
def _scan2d_fwd_kernel(dt_ptr, u_ptr, A_ptr, B_ptr, C_ptr, y_ptr, st_ptr,
                       H, W, N, dim, cpg_B, cpg_C, K,
                       sB_b, sB_g, sB_n, sB_h, sB_w, sC_b, sC_g, sC_n, sC_h, sC_w,
                       BW: tl.constexpr, NP: tl.constexpr, RTL: tl.constexpr, BU: tl.constexpr):
    d = tl.program_id(0)
    b = tl.program_id(1)
    p = tl.arange(0, BW)
    n = tl.arange(0, NP)
    pm = p < W
    mask2 = pm[:, None] & (n < N)[None, :]
    cols = _index(p, W, RTL)
    plane = (b * dim + d) * H * W
    A = tl.load(A_ptr + d * N + n, mask=n < N, other=0.0)
    B_base = B_ptr + b * sB_b + (d // cpg_B) * sB_g
    C_base = C_ptr + b * sC_b + (d // cpg_C) * sC_g
    st_base = st_ptr + (b * dim + d).to(tl.int64) * tl.cdiv(H, K) * BW * NP
    tile = p[:, None] * NP + n[None, :]
    h = tl.zeros((BW, NP), dtype=tl.float32)
    for r in range(H):
        if r % K == 0:
            tl.store(st_base + (r // K) * BW * NP + tile, h)
        row = _index(r, H, BU)
        dtv, uv, Bv, a = _load_row(dt_ptr + plane, u_ptr + plane, B_base, A, row, cols, n, pm, mask2,
                                   sB_n, sB_h, sB_w, W)
        h = _next_row_state(h, a, dtv, uv, Bv)
        Cv = tl.load(C_base + n[None, :] * sC_n + row * sC_h + cols[:, None] * sC_w, mask=mask2, other=0.0)
        tl.store(y_ptr + plane + row * W + cols, tl.sum(h * Cv, axis=1), mask=pm)


@triton.jit
def _scan2d_bwd_kernel(dt_ptr, u_ptr, A_ptr, B_ptr, C_ptr, dy_ptr, st_ptr, scr_ptr,
                       ddt_ptr, du_ptr, dA_ptr, dB_ptr, dC_ptr,
                       H, W, N, dim, cpg_B, cpg_C, K,
                       sB_b, sB_g, sB_n, sB_h, sB_w, sC_b, sC_g, sC_n, sC_h, sC_w,
                       BW: tl.constexpr, NP: tl.constexpr, RTL: tl.constexpr, BU: tl.constexpr):
    d = tl.program_id(0)
    b = tl.program_id(1)
    p = tl.arange(0, BW)
    n = tl.arange(0, NP)
    pm = p < W
    nm = n < N
    mask2 = pm[:, None] & nm[None, :]
    cols = _index(p, W, RTL)
    # the previous and next positions along the scan, for the shifted terms g[i, j-1] and Ā[i, j+1]
    prev_m = pm & (p >= 1)
    next_m = (p + 1) < W
    cols_prev = _index(p - 1, W, RTL)
    cols_next = _index(p + 1, W, RTL)
    mask_prev = prev_m[:, None] & nm[None, :]
    plane = (b * dim + d) * H * W
    A = tl.load(A_ptr + d * N + n, mask=nm, other=0.0)
    gB, gC = d // cpg_B, d // cpg_C
    B_base = B_ptr + b * sB_b + gB * sB_g
    C_base = C_ptr + b * sC_b + gC * sC_g
    # dB, dC are contiguous (batch, groups, N, H, W) fp32
    dB_base = dB_ptr + ((b * (dim // cpg_B) + gB) * N).to(tl.int64) * H * W
    dC_base = dC_ptr + ((b * (dim // cpg_C) + gC) * N).to(tl.int64) * H * W
    st_base = st_ptr + (b * dim + d).to(tl.int64) * tl.cdiv(H, K) * BW * NP
    scr = scr_ptr + (b * dim + d).to(tl.int64) * (K + 1) * BW * NP
    tile = p[:, None] * NP + n[None, :]
    tile_prev = (p[:, None] - 1) * NP + n[None, :]
    lam_below = tl.zeros((BW, NP), dtype=tl.float32)  # Ā[i+1]·λh[i+1], carried up the rows
    dA = tl.zeros((NP,), dtype=tl.float32)
    for cc in range(tl.cdiv(H, K)):
        c = tl.cdiv(H, K) - 1 - cc
        r0 = c * K
        # recompute the band's states into scratch slots 1..K (slot 0: the state entering the band)
        h = tl.load(st_base + c * BW * NP + tile)
        tl.store(scr + tile, h)
        for k in range(K):
            r = r0 + k
            if r < H:
                row = _index(r, H, BU)
                dtv, uv, Bv, a = _load_row(dt_ptr + plane, u_ptr + plane, B_base, A, row, cols, n, pm, mask2,
                                           sB_n, sB_h, sB_w, W)
                h = _next_row_state(h, a, dtv, uv, Bv)
                tl.store(scr + (k + 1) * BW * NP + tile, h)
        tl.debug_barrier()
        for kk in range(K):
            k = K - 1 - kk
            r = r0 + k
            if r < H:
                row = _index(r, H, BU)
                dtv, uv, Bv, a = _load_row(dt_ptr + plane, u_ptr + plane, B_base, A, row, cols, n, pm, mask2,
                                           sB_n, sB_h, sB_w, W)
                h = tl.load(scr + (k + 1) * BW * NP + tile)
                h_up = tl.load(scr + k * BW * NP + tile)
                Cv = tl.load(C_base + n[None, :] * sC_n + row * sC_h + cols[:, None] * sC_w, mask=mask2, other=0.0)
                dyv = tl.load(dy_ptr + plane + row * W + cols, mask=pm, other=0.0)
                lam_h = tl.where(mask2, Cv * dyv[:, None] + lam_below, 0.0)
                dt_next = tl.load(dt_ptr + plane + row * W + cols_next, mask=next_m, other=0.0)
                a_next = tl.where(next_m[:, None] & nm[None, :], tl.exp(dt_next[:, None] * A[None, :]), 0.0)
                _, lam_g = tl.associative_scan((a_next, lam_h), axis=0, combine_fn=_combine, reverse=True)
                # g[i, j-1] = h[i, j-1] - Ā[i, j-1]·h[i-1, j-1]
                dt_prev = tl.load(dt_ptr + plane + row * W + cols_prev, mask=prev_m, other=0.0)
                h_left = tl.load(scr + (k + 1) * BW * NP + tile_prev, mask=mask_prev, other=0.0)
                h_up_left = tl.load(scr + k * BW * NP + tile_prev, mask=mask_prev, other=0.0)
                g_left = h_left - tl.exp(dt_prev[:, None] * A[None, :]) * h_up_left
                da = tl.where(mask2, (lam_h * h_up + lam_g * g_left) * a, 0.0)  # dL/d(dt·A) through Ā
                ddt = tl.sum(lam_g * uv[:, None] * Bv + da * A[None, :], axis=1)
                du = tl.sum(lam_g * dtv[:, None] * Bv, axis=1)
                tl.store(ddt_ptr + plane + row * W + cols, ddt, mask=pm)
                tl.store(du_ptr + plane + row * W + cols, du, mask=pm)
                dA += tl.sum(da * dtv[:, None], axis=0)
                off = n[None, :] * H * W + row * W + cols[:, None]
                tl.atomic_add(dB_base + off, lam_g * (dtv * uv)[:, None], mask=mask2)
                tl.atomic_add(dC_base + off, h * dyv[:, None], mask=mask2)
                lam_below = a * lam_h
        tl.debug_barrier()
    tl.store(dA_ptr + (b * dim + d) * NP + n, dA)


def _launch_args(dt, B, C, K):
    batch, dim, H, W = dt.shape
    N = B.shape[2]
    return dict(H=H, W=W, N=N, dim=dim, cpg_B=dim // B.shape[1], cpg_C=dim // C.shape[1], K=K,
                sB_b=B.stride(0), sB_g=B.stride(1), sB_n=B.stride(2), sB_h=B.stride(3), sB_w=B.stride(4),
                sC_b=C.stride(0), sC_g=C.stride(1), sC_n=C.stride(2), sC_h=C.stride(3), sC_w=C.stride(4),
                BW=max(triton.next_power_of_2(W), 2), NP=max(triton.next_power_of_2(N), 2))


class _Scan2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt, u, A, B, C, right_to_left, bottom_up):
        batch, dim, H, W = dt.shape
        K = max(1, math.isqrt(H - 1) + 1)  # ceil(sqrt(H)): K + H/K rows of states at most
        args = _launch_args(dt, B, C, K)
        y = torch.empty_like(dt)
        states = dt.new_empty(batch, dim, math.ceil(H / K), args["BW"], args["NP"])
        _scan2d_fwd_kernel[(dim, batch)](dt, u, A, B, C, y, states, **args, RTL=right_to_left, BU=bottom_up)
        ctx.save_for_backward(dt, u, A, B, C, states)
        ctx.cfg = (K, right_to_left, bottom_up)
        return y

    @staticmethod
    def backward(ctx, dy):
        dt, u, A, B, C, states = ctx.saved_tensors
        K, right_to_left, bottom_up = ctx.cfg
        batch, dim, H, W = dt.shape
        args = _launch_args(dt, B, C, K)
        scratch = dt.new_empty(batch, dim, K + 1, args["BW"], args["NP"])
        ddt, du = torch.empty_like(dt), torch.empty_like(u)
        dA = dt.new_empty(batch, dim, args["NP"])
        dB, dC = torch.zeros_like(B, memory_format=torch.contiguous_format), torch.zeros_like(C, memory_format=torch.contiguous_format)
        _scan2d_bwd_kernel[(dim, batch)](dt, u, A, B, C, dy.contiguous(), states, scratch, ddt, du, dA, dB, dC,
                                         **args, RTL=right_to_left, BU=bottom_up)
        return ddt, du, dA.sum(0)[:, :A.shape[1]], dB, dC, None, None


def scan2d_triton(dt, u, A, B, C, right_to_left: bool, bottom_up: bool) -> torch.Tensor:
    """Σ_n C·h of one direction of the 2-D scan (the recurrence of `core.scan2d`), differentiable.
    dt, u: (batch, dim, H, W) fp32, dt already through bias and softplus. A: (dim, d_state) fp32.
    B, C: (batch, groups, d_state, H, W) fp32. Returns (batch, dim, H, W) fp32."""
    return _Scan2d.apply(dt.contiguous(), u.contiguous(), A.contiguous(), B, C, bool(right_to_left),
                         bool(bottom_up))
