"""Fallback selective-scan kernels built on `tl.associative_scan` (the "assoc" implementation).

Used by ssmkit.kernels.selective_scan when a channel block of the sequential kernels would straddle
two B/C groups (channels per group not a multiple of 32), and selectable with
`kernel_config(impl="assoc")` for comparison. One program holds a (BLOCK_D, N, T) tile and scans it
along T with the combine (a0, b0) o (a1, b1) = (a0 a1, a1 b0 + b1); the state entering each chunk of T
steps is saved for backward, which recomputes the chunk and runs the adjoint as a reverse scan.
Correct everywhere, but the scans cost ~15 warp shuffles per (channel, state, step), so it is several
times slower than the sequential kernels on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmkit.kernels._common import _channel_block, _combine, _dt, _grad_row, _softplus_grad

@triton.jit
def _rev_scan(a, b, REV_FLIP: tl.constexpr):
    """Suffix scan along axis 2: out_i = b_i + a_i * out_{i+1}."""
    if REV_FLIP:
        a = tl.flip(a, 2)
        b = tl.flip(b, 2)
        _, g = tl.associative_scan((a, b), axis=2, combine_fn=_combine)
        g = tl.flip(g, 2)
    else:
        _, g = tl.associative_scan((a, b), axis=2, combine_fn=_combine, reverse=True)
    return g


# ----------------------------------------------------------------------------------------------------
# forward kernel


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, seq_ptr,
    out_ptr, last_ptr, st_ptr,
    dim, L, N, n_chunks, dpg_B, dpg_C,
    s_ub, s_ud, s_ul,
    s_db, s_dd, s_dl,
    s_zb, s_zd, s_zl,
    s_Ad, s_An,
    s_Bb, s_Bg, s_Bn, s_Bl,
    s_Cb, s_Cg, s_Cn, s_Cl,
    s_qb, s_ql,
    s_hb, s_hd, s_hn,
    BLOCK_D: tl.constexpr, NP: tl.constexpr, T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr,
    B_VAR: tl.constexpr, C_VAR: tl.constexpr, SAVE_STATES: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    LOG2E: tl.constexpr = 1.4426950408889634

    d, dmask, n, nmask, dn_mask, A, bias = _channel_block(A_ptr, bias_ptr, s_Ad, s_An, dim, N, BLOCK_D, NP, HAS_BIAS)
    A2 = A * LOG2E
    offs = tl.arange(0, T)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    d0 = pid_d * BLOCK_D
    if B_VAR:
        B_base = B_ptr + pid_b * s_Bb + (d0 // dpg_B) * s_Bg
    else:
        Bc = tl.load(B_ptr + d[:, None] * s_Bg + n[None, :] * s_Bn, mask=dn_mask, other=0.0).to(tl.float32)
    if C_VAR:
        C_base = C_ptr + pid_b * s_Cb + (d0 // dpg_C) * s_Cg
    else:
        Cc = tl.load(C_ptr + d[:, None] * s_Cg + n[None, :] * s_Cn, mask=dn_mask, other=0.0).to(tl.float32)

    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * s_hb + d[:, None] * s_hd + n[None, :] * s_hn, mask=dn_mask,
                    other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D, NP], dtype=tl.float32)

    u_base = u_ptr + pid_b * s_ub + d[:, None] * s_ud
    dl_base = dl_ptr + pid_b * s_db + d[:, None] * s_dd
    z_base = z_ptr + pid_b * s_zb + d[:, None] * s_zd
    out_base = out_ptr + pid_b * s_ub + d[:, None] * s_ud  # out has u's (contiguous) strides
    st_base = st_ptr + (pid_b * dim + d[:, None]) * (n_chunks * N) + n[None, :]
    first = offs[None, None, :] == 0
    lastpos = offs[None, None, :] == T - 1

    for c in range(n_chunks):
        if SAVE_STATES:
            tl.store(st_base + c * N, h, mask=dn_mask)
        k = c * T + offs
        kmask = k < L
        if REVERSE:
            t = L - 1 - k
        else:
            t = k
        m2 = dmask[:, None] & kmask[None, :]
        uu = tl.load(u_base + t[None, :] * s_ul, mask=m2, other=0.0).to(tl.float32)
        dl = tl.load(dl_base + t[None, :] * s_dl, mask=m2, other=0.0).to(tl.float32)
        dt = _dt(dl, bias[:, None], m2, SOFTPLUS)
        a = tl.exp2(dt[:, None, :] * A2[:, :, None])
        if HAS_SEQ:
            if REVERSE:
                tp = t + 1
            else:
                tp = t - 1
            pmask = kmask & (k >= 1)
            q = tl.load(seq_ptr + pid_b * s_qb + t * s_ql, mask=kmask, other=0)
            qp = tl.load(seq_ptr + pid_b * s_qb + tp * s_ql, mask=pmask, other=0)
            reset = pmask & (q != qp)
            a = tl.where(reset[None, None, :], 0.0, a)
        dtu = dt * uu
        if B_VAR:
            Bt = tl.load(B_base + n[:, None] * s_Bn + t[None, :] * s_Bl,
                         mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            b = dtu[:, None, :] * Bt[None, :, :]
        else:
            b = dtu[:, None, :] * Bc[:, :, None]
        b = tl.where(first, b + a * h[:, :, None], b)
        _, hs = tl.associative_scan((a, b), axis=2, combine_fn=_combine)
        if C_VAR:
            Ct = tl.load(C_base + n[:, None] * s_Cn + t[None, :] * s_Cl,
                         mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            y = tl.sum(hs * Ct[None, :, :], axis=1)
        else:
            y = tl.sum(hs * Cc[:, :, None], axis=1)
        if HAS_D:
            y += Dv[:, None] * uu
        if HAS_Z:
            zz = tl.load(z_base + t[None, :] * s_zl, mask=m2, other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(out_base + t[None, :] * s_ul, y.to(out_ptr.dtype.element_ty), mask=m2)
        h = tl.sum(tl.where(lastpos, hs, 0.0), axis=2)

    tl.store(last_ptr + (pid_b * dim + d[:, None]) * N + n[None, :], h, mask=dn_mask)


# ----------------------------------------------------------------------------------------------------
# backward kernel


@triton.jit
def _scan_bwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, st_ptr,
    dout_ptr, dlast_ptr,
    du_ptr, ddl_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    dim, L, N, n_chunks, dpg_B, dpg_C, n_dblocks,
    s_ub, s_ud, s_ul,
    s_db, s_dd, s_dl,
    s_zb, s_zd, s_zl,
    s_Ad, s_An,
    s_Bb, s_Bg, s_Bn, s_Bl,
    s_Cb, s_Cg, s_Cn, s_Cl,
    s_qb, s_ql,
    s_ob, s_od, s_ol,
    s_gBb, s_gBg, s_gBn, s_gBl,
    s_gCb, s_gCg, s_gCn, s_gCl,
    BLOCK_D: tl.constexpr, NP: tl.constexpr, T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr,
    B_VAR: tl.constexpr, C_VAR: tl.constexpr, ATOMIC: tl.constexpr, STORE_DH0: tl.constexpr,
    REV_FLIP: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    LOG2E: tl.constexpr = 1.4426950408889634

    d, dmask, n, nmask, dn_mask, A, bias = _channel_block(A_ptr, bias_ptr, s_Ad, s_An, dim, N, BLOCK_D, NP, HAS_BIAS)
    A2 = A * LOG2E
    offs = tl.arange(0, T)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    d0 = pid_d * BLOCK_D
    if B_VAR:
        B_base = B_ptr + pid_b * s_Bb + (d0 // dpg_B) * s_Bg
        gB_base = _grad_row(dB_ptr, pid_b, pid_d, d0, dpg_B, s_gBb, s_gBg, ATOMIC)
    else:
        Bc = tl.load(B_ptr + d[:, None] * s_Bg + n[None, :] * s_Bn, mask=dn_mask, other=0.0).to(tl.float32)
        dB_acc = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
    if C_VAR:
        C_base = C_ptr + pid_b * s_Cb + (d0 // dpg_C) * s_Cg
        gC_base = _grad_row(dC_ptr, pid_b, pid_d, d0, dpg_C, s_gCb, s_gCg, ATOMIC)
    else:
        Cc = tl.load(C_ptr + d[:, None] * s_Cg + n[None, :] * s_Cn, mask=dn_mask, other=0.0).to(tl.float32)
        dC_acc = tl.zeros([BLOCK_D, NP], dtype=tl.float32)

    if HAS_DLAST:
        w = tl.load(dlast_ptr + (pid_b * dim + d[:, None]) * N + n[None, :], mask=dn_mask, other=0.0)
    else:
        w = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
    dA_acc = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)

    u_base = u_ptr + pid_b * s_ub + d[:, None] * s_ud
    dl_base = dl_ptr + pid_b * s_db + d[:, None] * s_dd
    z_base = z_ptr + pid_b * s_zb + d[:, None] * s_zd
    do_base = dout_ptr + pid_b * s_ob + d[:, None] * s_od
    # du, ddelta, dz are allocated contiguous like u
    du_base = du_ptr + (pid_b * dim + d[:, None]) * L
    ddl_base = ddl_ptr + (pid_b * dim + d[:, None]) * L
    dz_base = dz_ptr + (pid_b * dim + d[:, None]) * L
    st_base = st_ptr + (pid_b * dim + d[:, None]) * (n_chunks * N) + n[None, :]
    first = offs[None, None, :] == 0
    lastpos = offs[None, None, :] == T - 1

    for ci in range(n_chunks):
        c = n_chunks - 1 - ci
        k = c * T + offs
        kmask = k < L
        k1mask = (k + 1) < L
        if REVERSE:
            t = L - 1 - k
            t1 = t - 1
        else:
            t = k
            t1 = t + 1
        m2 = dmask[:, None] & kmask[None, :]
        m21 = dmask[:, None] & k1mask[None, :]
        h_in = tl.load(st_base + c * N, mask=dn_mask, other=0.0)
        uu = tl.load(u_base + t[None, :] * s_ul, mask=m2, other=0.0).to(tl.float32)
        dl = tl.load(dl_base + t[None, :] * s_dl, mask=m2, other=0.0).to(tl.float32)
        dt = _dt(dl, bias[:, None], m2, SOFTPLUS)
        dl1 = tl.load(dl_base + t1[None, :] * s_dl, mask=m21, other=0.0).to(tl.float32)
        dt1 = _dt(dl1, bias[:, None], m21, SOFTPLUS)
        a = tl.exp2(dt[:, None, :] * A2[:, :, None])
        a1 = tl.exp2(dt1[:, None, :] * A2[:, :, None])  # decay of the next position in scan order
        if HAS_SEQ:
            if REVERSE:
                tp = t + 1
            else:
                tp = t - 1
            pmask = kmask & (k >= 1)
            q = tl.load(seq_ptr + pid_b * s_qb + t * s_ql, mask=kmask, other=0)
            qp = tl.load(seq_ptr + pid_b * s_qb + tp * s_ql, mask=pmask, other=0)
            qn = tl.load(seq_ptr + pid_b * s_qb + t1 * s_ql, mask=k1mask, other=0)
            a = tl.where((pmask & (q != qp))[None, None, :], 0.0, a)
            a1 = tl.where((k1mask & (q != qn))[None, None, :], 0.0, a1)
        dtu = dt * uu
        if B_VAR:
            Bt = tl.load(B_base + n[:, None] * s_Bn + t[None, :] * s_Bl,
                         mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            Bx = Bt[None, :, :]
        else:
            Bx = Bc[:, :, None]
        b = dtu[:, None, :] * Bx
        _, hs = tl.associative_scan((a, tl.where(first, b + a * h_in[:, :, None], b)), axis=2,
                                    combine_fn=_combine)
        if C_VAR:
            Ct = tl.load(C_base + n[:, None] * s_Cn + t[None, :] * s_Cl,
                         mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            Cx = Ct[None, :, :]
        else:
            Cx = Cc[:, :, None]
        dy = tl.load(do_base + t[None, :] * s_ol, mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            y = tl.sum(hs * Cx, axis=1)
            if HAS_D:
                y += Dv[:, None] * uu
            zz = tl.load(z_base + t[None, :] * s_zl, mask=m2, other=0.0).to(tl.float32)
            sz = tl.sigmoid(zz)
            dz = dy * y * sz * (1.0 + zz * (1.0 - sz))
            tl.store(dz_base + t[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m2)
            dy = dy * zz * sz
        # adjoint g_t = C_t dy_t + a_{t+1} g_{t+1}; the later chunks enter at the last position
        cg = dy[:, None, :] * Cx
        cg = tl.where(lastpos, cg + w[:, :, None], cg)
        g = _rev_scan(a1, cg, REV_FLIP)
        w = tl.sum(tl.where(first, a * g, 0.0), axis=2)  # a_t g_t at the chunk's first position

        ah = hs - b  # a_t h_{t-1}
        gah = g * ah
        gB = tl.sum(g * Bx, axis=1)  # (BLOCK_D, T): sum_n g B
        ddt = tl.sum(gah * A[:, :, None], axis=1) + uu * gB
        du = dt * gB
        if HAS_D:
            du += dy * Dv[:, None]
            dD_acc += tl.sum(dy * uu, axis=1)
        dA_acc += tl.sum(gah * dt[:, None, :], axis=2)
        if SOFTPLUS:
            ddt = ddt * _softplus_grad(dl + bias[:, None])
        ddt = tl.where(m2, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_base + t[None, :], du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddl_base + t[None, :], ddt.to(ddl_ptr.dtype.element_ty), mask=m2)

        gdB = g * dtu[:, None, :]
        gdC = dy[:, None, :] * hs
        if B_VAR:
            pB = tl.sum(gdB, axis=0)
            ptrs = gB_base + n[:, None] * s_gBn + t[None, :] * s_gBl
            bm = nmask[:, None] & kmask[None, :]
            if ATOMIC:
                tl.atomic_add(ptrs, pB, mask=bm, sem="relaxed")
            else:
                tl.store(ptrs, pB, mask=bm)
        else:
            dB_acc += tl.sum(gdB, axis=2)
        if C_VAR:
            pC = tl.sum(gdC, axis=0)
            ptrs = gC_base + n[:, None] * s_gCn + t[None, :] * s_gCl
            cm = nmask[:, None] & kmask[None, :]
            if ATOMIC:
                tl.atomic_add(ptrs, pC, mask=cm, sem="relaxed")
            else:
                tl.store(ptrs, pC, mask=cm)
        else:
            dC_acc += tl.sum(gdC, axis=2)

    dn_off = (pid_b * dim + d[:, None]) * N + n[None, :]
    tl.store(dA_ptr + dn_off, dA_acc, mask=dn_mask)
    if STORE_DH0:
        tl.store(dh0_ptr + dn_off, w, mask=dn_mask)
    if not B_VAR:
        tl.store(dB_ptr + dn_off, dB_acc, mask=dn_mask)
    if not C_VAR:
        tl.store(dC_ptr + dn_off, dC_acc, mask=dn_mask)
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + d, dD_acc, mask=dmask)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * dim + d, dbias_acc, mask=dmask)


# ----------------------------------------------------------------------------------------------------
# launchers


def _bc_strides(X: torch.Tensor):
    """(s_batch, s_group, s_n, s_l) for (batch, G, N, L); time-invariant (dim, N) -> (0, s_dim, s_n, 0)."""
    if X.dim() == 2:
        return 0, X.stride(0), X.stride(1), 0
    return X.stride(0), X.stride(1), X.stride(2), X.stride(3)


def _groups(X: torch.Tensor, dim: int) -> int:
    return X.shape[1] if X.dim() == 4 else dim


def assoc_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, reverse, T, bd, nw):
    """Forward; B, C (batch, G, N, L) or (dim, N); bd must divide dim/G for 4-D B/C. Returns
    (out, last_state, states entering each chunk of T steps)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    NP = triton.next_power_of_2(N)
    n_chunks = triton.cdiv(L, T)
    out = torch.empty((batch, dim, L), dtype=u.dtype, device=u.device)
    last = torch.empty((batch, dim, N), dtype=torch.float32, device=u.device)
    states = torch.empty((batch, dim, n_chunks, N), dtype=torch.float32, device=u.device)
    if u.stride() != out.stride():
        u = u.contiguous()
    dummy = u
    zz = z if z is not None else dummy
    q = seq_idx if seq_idx is not None else dummy
    h0 = initial_state if initial_state is not None else dummy
    grid = (triton.cdiv(dim, bd), batch)
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else dummy, zz, delta_bias if delta_bias is not None else dummy,
        h0, q, out, last, states,
        dim, L, N, n_chunks, dim // _groups(B, dim), dim // _groups(C, dim),
        *u.stride(), *delta.stride(), *(zz.stride() if z is not None else (0, 0, 0)),
        *A.stride(), *_bc_strides(B), *_bc_strides(C),
        *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        *(h0.stride() if initial_state is not None else (0, 0, 0)),
        BLOCK_D=bd, NP=NP, T=T,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        HAS_H0=initial_state is not None, HAS_SEQ=seq_idx is not None, REVERSE=bool(reverse),
        B_VAR=B.dim() == 4, C_VAR=C.dim() == 4, SAVE_STATES=True,
        num_warps=nw,
    )
    return out, last, states


def assoc_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, seq_idx, states, delta_softplus, reverse, T,
              need_dh0, bd, nw, rev_flip, atomic):
    """Backward of assoc_fwd; returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0) (None where absent)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    NP = triton.next_power_of_2(N)
    n_chunks = states.shape[2]
    n_dblocks = triton.cdiv(dim, bd)
    dev = u.device
    f32 = torch.float32
    du = torch.empty((batch, dim, L), dtype=u.dtype, device=dev)
    ddelta = torch.empty((batch, dim, L), dtype=delta.dtype, device=dev)
    dz = torch.empty((batch, dim, L), dtype=z.dtype, device=dev) if z is not None else du
    dA_p = torch.empty((batch, dim, N), dtype=f32, device=dev)
    dh0 = torch.empty((batch, dim, N), dtype=f32, device=dev) if need_dh0 else dA_p
    dD_p = torch.empty((batch, dim), dtype=f32, device=dev) if D is not None else dA_p
    dbias_p = torch.empty((batch, dim), dtype=f32, device=dev) if delta_bias is not None else dA_p

    def grad_buf(X):
        if X.dim() == 2:
            return torch.empty((batch, dim, N), dtype=f32, device=dev)
        if atomic:
            return torch.zeros((batch, X.shape[1], N, L), dtype=f32, device=dev)
        return torch.empty((batch, n_dblocks, N, L), dtype=f32, device=dev)

    gB, gC = grad_buf(B), grad_buf(C)

    def gstr(G):
        return G.stride() if G.dim() == 4 else (0, 0, 0, 0)

    dummy = u
    zz = z if z is not None else dummy
    grid = (n_dblocks, batch)
    _scan_bwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else dummy, zz, delta_bias if delta_bias is not None else dummy,
        seq_idx if seq_idx is not None else dummy, states,
        dout, dlast if dlast is not None else dummy,
        du, ddelta, dz, dA_p, gB, gC, dD_p, dbias_p, dh0,
        dim, L, N, n_chunks, dim // _groups(B, dim), dim // _groups(C, dim), n_dblocks,
        *u.stride(), *delta.stride(), *(zz.stride() if z is not None else (0, 0, 0)),
        *A.stride(), *_bc_strides(B), *_bc_strides(C),
        *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        *dout.stride(), *gstr(gB), *gstr(gC),
        BLOCK_D=bd, NP=NP, T=T,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        HAS_DLAST=dlast is not None, HAS_SEQ=seq_idx is not None, REVERSE=bool(reverse),
        B_VAR=B.dim() == 4, C_VAR=C.dim() == 4, ATOMIC=atomic, STORE_DH0=need_dh0,
        REV_FLIP=rev_flip,
        num_warps=nw,
    )

    def finish(X, G):
        if X.dim() == 2:
            return G.sum(0).to(X.dtype)
        if atomic:
            return G.to(X.dtype)
        Gx = X.shape[1]
        return G.view(batch, Gx, n_dblocks // Gx, N, L).sum(2).to(X.dtype)

    dB = finish(B, gB)
    dC = finish(C, gC)
    dA = dA_p.sum(0).to(A.dtype)
    dD = dD_p.sum(0).to(D.dtype) if D is not None else None
    dbias = dbias_p.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, (dz if z is not None else None), dbias, (dh0 if need_dh0 else None)


