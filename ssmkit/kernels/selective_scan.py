"""Triton kernels for the 1-D selective scan (forward and backward) and its one-step update.

Math (see ssmkit/core/scan.py): dt = softplus?(delta + delta_bias); h_t = exp(dt_t A) h_prev + dt_t B_t u_t;
y_t = C_t . h_t + D u_t; y *= silu(z). `reverse` runs the recurrence from the last position to the first;
`seq_idx` resets the state (decay multiplied by 0) where the packed-sequence id changes.

Design (the "seq" kernels, the default)
---------------------------------------
* One program per (block of BD = 32 * num_warps channels, batch); each thread owns one channel and holds
  its N states in fp32 registers. The length is walked in chunks of T positions: u, delta, z (and dout)
  are loaded as (BD, T) tiles, one 16-byte vector per thread, and the T steps are unrolled so every
  step is plain per-thread arithmetic: N exp2, the state update and y = C.h with no cross-thread
  traffic at all. B and C rows are read per step as contiguous N-vectors (transposed once to
  (batch, G, L, N) fp32, a small tensor); a channel block never straddles two B/C groups.
* Only the states entering each segment of SEG positions are saved for backward: (batch, dim,
  ceil(L/SEG), N) fp32, i.e. O(batch*dim*N*L/SEG) memory, never O(batch*dim*L*N).
* Backward walks the segments last to first. For each segment it re-runs the forward recurrence once to
  store the states entering each chunk to a small per-program scratch buffer (batch, dim, SEG/T, N)
  (L2-resident, independent of L), then walks the chunks backwards: recompute the T states of the chunk
  into registers, then run the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} step by step in reverse.
  dB/dC rows (summed over the block's channels) go to fp32 atomics, or, in deterministic mode, to one
  partial per channel block that torch sums in a fixed order. dA, dD, d(delta_bias) and the gradients of
  time-invariant B/C are per-(batch, channel) partials summed by torch.
* D skip, z gate (silu), delta_bias and softplus are fused; inputs fp32/fp16/bf16, state and
  accumulation fp32, outputs in the input dtype.
* The "assoc" kernels (ssmkit/kernels/_scan_assoc.py, a `tl.associative_scan` over (channels, N, T)
  tiles) handle the case the seq kernels cannot: grouped B/C with a number of channels per group that
  is not a multiple of 32. They are correct but several times slower.
* Each op is a `torch.library.custom_op` (namespace ssmkit) with a fake implementation; the scan has
  `register_autograd`, so torch.compile traces through it without graph breaks.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from ssmkit.kernels import as_time_invariant, deterministic, interpreting
from ssmkit.kernels._common import _channel_block, _grad_row, _dt, _softplus, _softplus_grad
from ssmkit.kernels._scan_assoc import assoc_bwd, assoc_fwd

__all__ = [
    "selective_scan_triton",
    "selective_state_update_triton",
    "kernel_config",
    "plan",
]

IMPL_SEQ, IMPL_ASSOC = 0, 1

# ----------------------------------------------------------------------------------------------------
# configuration

_OVERRIDE: dict = {}


@contextlib.contextmanager
def kernel_config(**kw):
    """Override the launch plan (tests, tuning, benchmarks). Keys: impl ("seq" | "assoc"),
    seg (positions per saved state, seq), fwd_chunk / bwd_chunk (T of the seq kernels, powers of 2),
    num_warps / bwd_num_warps (seq: BD = 32 * num_warps), chunk / block_d / bwd_block_d (assoc),
    rev_flip (assoc: tl.flip instead of a reverse associative scan)."""
    old = dict(_OVERRIDE)
    _OVERRIDE.update({k: v for k, v in kw.items() if v is not None})
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)


def _pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _elem_bytes(*ts) -> int:
    return max(t.element_size() for t in ts if t is not None)


def plan(u, delta, z, A, B, C) -> dict:
    """Launch plan for one scan call (pure function of shapes/dtypes and the overrides)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    NP = triton.next_power_of_2(max(N, 1))
    b_var, c_var = B.dim() == 4, C.dim() == 4
    dpg = dim
    if b_var:
        dpg = min(dpg, dim // B.shape[1])
    if c_var:
        dpg = min(dpg, dim // C.shape[1])
    grouped = b_var or c_var
    o = _OVERRIDE
    impl = o.get("impl")
    # seq: channels per block = 32 * warps, inside one group
    nw = o.get("num_warps", 1)
    bnw = o.get("bwd_num_warps", 1)
    if grouped:
        while nw > 1 and dpg % (32 * nw):
            nw //= 2
        while bnw > 1 and dpg % (32 * bnw):
            bnw //= 2
    else:
        cap = max(1, triton.next_power_of_2(dim) // 32)
        nw, bnw = min(nw, cap), min(bnw, cap)
    seq_ok = (not grouped) or dpg % 32 == 0
    if impl is None:
        # measured on an H100 (bench/scan_gpu.py --tune): with N = 1 the assoc kernels are faster
        impl = "seq" if seq_ok and NP > 1 else "assoc"
    if impl == "seq" and not seq_ok:
        raise ValueError(f"the seq kernels need channels per B/C group divisible by 32 (got {dpg})")
    eb = _elem_bytes(u, delta, z)
    vec = max(1, 16 // eb)  # positions per 16-byte vector
    if impl == "seq":
        T = o.get("fwd_chunk", vec)
        Tb = o.get("bwd_chunk", min(vec, 2) if NP >= 16 else (min(vec, 4) if NP >= 8 else vec))
        seg = o.get("seg", 64 if NP >= 8 else 256)
        seg = max(seg, T, Tb)
        if seg % T or seg % Tb:
            raise ValueError(f"seg={seg} must be a multiple of the chunks {T}, {Tb}")
        # time-parallel parts: enough threads (one per (batch, channel, part)) to fill a large GPU
        target = o.get("threads", 1 << 16)
        want = max(1, target // max(1, batch * dim))
        n_par = o.get("n_par", 1 << (want.bit_length() - 1))
        bwd_n_par = o.get("bwd_n_par", n_par)
        return dict(impl=IMPL_SEQ, chunk=seg, T=T, Tb=Tb, nw=nw, bnw=bnw, NP=NP, n_par=n_par, bwd_n_par=bwd_n_par,
                    maxnreg=o.get("maxnreg", None if interpreting() else 168), bwd_maxnreg=o.get("bwd_maxnreg"))
    # assoc fallback
    if interpreting():
        T, bd, bbd = 16, 2, 2
    else:
        T = 64 if NP <= 16 else 32
        bd = max(1, 2048 // (NP * T))
        bbd = max(1, 1024 // (NP * T))
    T = o.get("chunk", T)
    T = min(T, max(16, triton.next_power_of_2(L))) if "chunk" not in o else T
    bd = o.get("block_d", bd)
    bbd = o.get("bwd_block_d", bbd)
    if grouped:
        bd, bbd = _pow2_divisor(dpg, bd), _pow2_divisor(dpg, bbd)
    else:
        bd, bbd = min(bd, triton.next_power_of_2(dim)), min(bbd, triton.next_power_of_2(dim))
    return dict(impl=IMPL_ASSOC, chunk=T, bd=bd, nw=4, bbd=bbd, bnw=4, NP=NP,
                rev_flip=bool(o.get("rev_flip", False)))


# ----------------------------------------------------------------------------------------------------
# seq kernels


@triton.jit
def _col(X, sel):
    # column of a (BD, T) tile whose T axis lives in one thread: with a compile-time `sel` and -0.0
    # as the neutral element this folds to a register read
    return tl.sum(tl.where(sel, X, -0.0), axis=1)


@triton.jit
def _keep_tile(seq_ptr, row, p, pm, dmask, L, REVERSE: tl.constexpr):
    """(BD, T) tile: 0.0 where position p starts a new packed sequence in scan order, else 1.0."""
    pb = p[None, :] + tl.zeros_like(dmask.to(tl.int32))[:, None]
    if REVERSE:
        pn = pb + 1
        nm = (pn < L) & pm[None, :]
    else:
        pn = pb - 1
        nm = (pb >= 1) & pm[None, :]
    q = tl.load(seq_ptr + row + pb, mask=pm[None, :], other=0)
    qn = tl.load(seq_ptr + row + pn, mask=nm, other=0)
    return tl.where(nm & (q != qn), 0.0, 1.0)


@triton.jit
def _chunk_tile(c, n_chunks, offs, dmask, L, T: tl.constexpr, REVERSE: tl.constexpr):
    """Chunk c in scan order: its tile index m in memory, positions p and the masks of p and the (BD, T) tile."""
    if REVERSE:
        m = n_chunks - 1 - c
    else:
        m = c
    p = m * T + offs
    pm = p < L
    return m, p, pm, dmask[:, None] & pm[None, :]


@triton.jit
def _chunk_inputs(c, n_chunks, offs, dmask, u_rows, dl_rows, bias, L, T: tl.constexpr, SOFTPLUS: tl.constexpr,
                  REVERSE: tl.constexpr):
    """`_chunk_tile` of chunk c and its fp32 (BD, T) tiles U, DL (delta as given), DT (through bias and
    softplus, 0 outside) and DT*U."""
    m, p, pm, m2 = _chunk_tile(c, n_chunks, offs, dmask, L, T, REVERSE)
    U = tl.load(u_rows + p[None, :], mask=m2, other=0.0).to(tl.float32)
    DL = tl.load(dl_rows + p[None, :], mask=m2, other=0.0).to(tl.float32)
    DT = _dt(DL, bias[:, None], m2, SOFTPLUS)
    return m, p, pm, m2, U, DL, DT, DT * U


@triton.jit
def _seq_fwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, seq_ptr,
    out_ptr, last_ptr, st_ptr, loc_ptr, dec_ptr, ent_ptr,
    dim, L, N, n_seg, dpg_B, dpg_C, part_segs, n_par,
    s_ub, s_ud, s_db, s_dd, s_zb, s_zd,
    s_Ad, s_An,
    s_Bb, s_Bg, s_Bl, s_Bn,
    s_Cb, s_Cg, s_Cl, s_Cn,
    s_qb,
    s_hb, s_hd, s_hn,
    BD: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, K: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr,
    B_VAR: tl.constexpr, C_VAR: tl.constexpr, LOCAL: tl.constexpr, USE_ENT: tl.constexpr,
):
    """One program = (channel block, batch, part). A part is `part_segs` consecutive segments in scan
    order. LOCAL: run the part from a zero state; store its end state (loc) and total decay (dec).
    Otherwise: run it from its entering state (ent, or the initial state), write y, the states entering
    each segment and, for the last part, the last state."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2)
    LOG2E: tl.constexpr = 1.4426950408889634

    d, dmask, n, nmask, dn_mask, A, bias = _channel_block(A_ptr, bias_ptr, s_Ad, s_An, dim, N, BD, NP, HAS_BIAS)
    A2 = A * LOG2E
    offs = tl.arange(0, T)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    d0 = pid_d * BD
    if B_VAR:
        B_row = B_ptr + pid_b * s_Bb + (d0 // dpg_B) * s_Bg
    else:
        Bc = tl.load(B_ptr + d[:, None] * s_Bg + n[None, :] * s_Bn, mask=dn_mask, other=0.0).to(tl.float32)
    if C_VAR:
        C_row = C_ptr + pid_b * s_Cb + (d0 // dpg_C) * s_Cg
    else:
        Cc = tl.load(C_ptr + d[:, None] * s_Cg + n[None, :] * s_Cn, mask=dn_mask, other=0.0).to(tl.float32)
    bdn = ((pid_b * dim + d[:, None]) * N + n[None, :])
    BDN = tl.num_programs(1).to(tl.int64) * dim * N
    if LOCAL:
        h = tl.zeros([BD, NP], dtype=tl.float32)
        sum_dt = tl.zeros([BD], dtype=tl.float32)
        keep_all = tl.full([BD], 1.0, dtype=tl.float32)
    elif USE_ENT:
        h = tl.load(ent_ptr + pid_p * BDN + bdn, mask=dn_mask, other=0.0)
    elif HAS_H0:
        h = tl.load(h0_ptr + pid_b * s_hb + d[:, None] * s_hd + n[None, :] * s_hn, mask=dn_mask,
                    other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BD, NP], dtype=tl.float32)

    u_rows = u_ptr + pid_b * s_ub + d[:, None] * s_ud
    dl_rows = dl_ptr + pid_b * s_db + d[:, None] * s_dd
    z_rows = z_ptr + pid_b * s_zb + d[:, None] * s_zd
    out_rows = out_ptr + (pid_b * dim + d[:, None]) * L
    st_rows = st_ptr + (pid_b * dim + d[:, None]) * (n_seg * N) + n[None, :]
    q_row = pid_b * s_qb
    n_chunks = n_seg * K
    c0 = pid_p * part_segs * K
    c1 = tl.minimum(c0 + part_segs * K, n_chunks)

    for c in range(c0, c1):
        if not LOCAL:
            if c % K == 0:
                tl.store(st_rows + (c // K) * N, h, mask=dn_mask)
        m, p, pm, m2, U, DL, DT, DTU = _chunk_inputs(c, n_chunks, offs, dmask, u_rows, dl_rows, bias, L, T,
                                                     SOFTPLUS, REVERSE)
        if HAS_SEQ:
            KEEP = _keep_tile(seq_ptr, q_row, p, pm, dmask, L, REVERSE)
        if LOCAL:
            sum_dt += tl.sum(DT, axis=1)
            if HAS_SEQ:
                keep_all = keep_all * tl.min(KEEP, axis=1)
        Y = tl.zeros([BD, T], dtype=tl.float32)
        for j in tl.static_range(T):
            jj = j + REVERSE * (T - 1 - 2 * j)  # tile column of scan step j
            sel = offs[None, :] == jj
            pj = m * T + jj
            dt_j = _col(DT, sel)
            dtu_j = _col(DTU, sel)
            a = tl.exp2(dt_j[:, None] * A2)
            if HAS_SEQ:
                a = a * _col(KEEP, sel)[:, None]
            if B_VAR:
                Bj = tl.load(B_row + pj * s_Bl + n * s_Bn, mask=(pj < L) & (n < NP), other=0.0)
                h = a * h + dtu_j[:, None] * Bj[None, :]
            else:
                h = a * h + dtu_j[:, None] * Bc
            if not LOCAL:
                if C_VAR:
                    Cj = tl.load(C_row + pj * s_Cl + n * s_Cn, mask=(pj < L) & (n < NP), other=0.0)
                    y = tl.sum(h * Cj[None, :], axis=1)
                else:
                    y = tl.sum(h * Cc, axis=1)
                Y = tl.where(sel, y[:, None], Y)
        if not LOCAL:
            if HAS_D:
                Y += Dv[:, None] * U
            if HAS_Z:
                Z = tl.load(z_rows + p[None, :], mask=m2, other=0.0).to(tl.float32)
                Y = Y * Z * tl.sigmoid(Z)
            tl.store(out_rows + p[None, :], Y.to(out_ptr.dtype.element_ty), mask=m2)

    if LOCAL:
        tl.store(loc_ptr + pid_p * BDN + bdn, h, mask=dn_mask)
        dec = tl.exp2(sum_dt[:, None] * A2) * keep_all[:, None]
        tl.store(dec_ptr + pid_p * BDN + bdn, dec, mask=dn_mask)
    elif pid_p == n_par - 1:
        tl.store(last_ptr + (pid_b * dim + d[:, None]) * N + n[None, :], h, mask=dn_mask)


@triton.jit
def _seq_bwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, st_ptr, scr_ptr,
    dout_ptr, dlast_ptr, wend_ptr,
    du_ptr, ddl_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    dim, L, N, n_seg, dpg_B, dpg_C, part_segs, n_par,
    s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_ob, s_od,
    s_Ad, s_An,
    s_Bb, s_Bg, s_Bl, s_Bn,
    s_Cb, s_Cg, s_Cl, s_Cn,
    s_qb,
    s_gBb, s_gBg, s_gCb, s_gCg,
    BD: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, K: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr,
    B_VAR: tl.constexpr, C_VAR: tl.constexpr, ATOMIC: tl.constexpr, STORE_DH0: tl.constexpr,
    USE_WEND: tl.constexpr,
):
    """One program = (channel block, batch, part); the part's segments are walked last to first,
    starting from the adjoint `wend` that the later parts send back (or dlast for the last part)."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2)
    nb = tl.num_programs(1).to(tl.int64)
    pb = pid_p * nb + pid_b  # (part, batch) index of the partial sums
    LOG2E: tl.constexpr = 1.4426950408889634

    d, dmask, n, nmask, dn_mask, A, bias = _channel_block(A_ptr, bias_ptr, s_Ad, s_An, dim, N, BD, NP, HAS_BIAS)
    A2 = A * LOG2E
    offs = tl.arange(0, T)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    d0 = pid_d * BD
    # gradient rows of B/C are (batch, G or channel blocks, L, N) fp32, contiguous along N
    if B_VAR:
        B_row = B_ptr + pid_b * s_Bb + (d0 // dpg_B) * s_Bg
        gB_row = _grad_row(dB_ptr, pid_b, pid_d, d0, dpg_B, s_gBb, s_gBg, ATOMIC)
    else:
        Bc = tl.load(B_ptr + d[:, None] * s_Bg + n[None, :] * s_Bn, mask=dn_mask, other=0.0).to(tl.float32)
        dB_acc = tl.zeros([BD, NP], dtype=tl.float32)
    if C_VAR:
        C_row = C_ptr + pid_b * s_Cb + (d0 // dpg_C) * s_Cg
        gC_row = _grad_row(dC_ptr, pid_b, pid_d, d0, dpg_C, s_gCb, s_gCg, ATOMIC)
    else:
        Cc = tl.load(C_ptr + d[:, None] * s_Cg + n[None, :] * s_Cn, mask=dn_mask, other=0.0).to(tl.float32)
        dC_acc = tl.zeros([BD, NP], dtype=tl.float32)

    if USE_WEND:
        w = tl.load(wend_ptr + (pb * dim + d[:, None]) * N + n[None, :], mask=dn_mask, other=0.0)
    elif HAS_DLAST:
        w = tl.load(dlast_ptr + (pid_b * dim + d[:, None]) * N + n[None, :], mask=dn_mask, other=0.0)
    else:
        w = tl.zeros([BD, NP], dtype=tl.float32)
    dA_acc = tl.zeros([BD, NP], dtype=tl.float32)
    dD_acc = tl.zeros([BD], dtype=tl.float32)
    dbias_acc = tl.zeros([BD], dtype=tl.float32)

    u_rows = u_ptr + pid_b * s_ub + d[:, None] * s_ud
    dl_rows = dl_ptr + pid_b * s_db + d[:, None] * s_dd
    z_rows = z_ptr + pid_b * s_zb + d[:, None] * s_zd
    do_rows = dout_ptr + pid_b * s_ob + d[:, None] * s_od
    g_rows = (pid_b * dim + d[:, None]) * L  # du, ddelta, dz: contiguous (batch, dim, L)
    st_rows = st_ptr + (pid_b * dim + d[:, None]) * (n_seg * N) + n[None, :]
    scr_rows = scr_ptr + (pb * dim + d[:, None]) * (K * NP) + n[None, :]
    dfull = dmask[:, None] & (n[None, :] < NP)
    q_row = pid_b * s_qb
    n_chunks = n_seg * K

    s0 = pid_p * part_segs
    s1 = tl.minimum(s0 + part_segs, n_seg)
    for si in range(s1 - s0):
        s = s1 - 1 - si
        h = tl.load(st_rows + s * N, mask=dn_mask, other=0.0)
        # pass 1: states entering each chunk of the segment -> scratch
        for k in range(K):
            tl.store(scr_rows + k * NP, h, mask=dfull)
            c = s * K + k
            m, p, pm, m2, U, DL, DT, DTU = _chunk_inputs(c, n_chunks, offs, dmask, u_rows, dl_rows, bias, L, T,
                                                         SOFTPLUS, REVERSE)
            if HAS_SEQ:
                KEEP = _keep_tile(seq_ptr, q_row, p, pm, dmask, L, REVERSE)
            for j in tl.static_range(T):
                jj = j + REVERSE * (T - 1 - 2 * j)  # tile column of scan step j
                sel = offs[None, :] == jj
                pj = m * T + jj
                a = tl.exp2(_col(DT, sel)[:, None] * A2)
                if HAS_SEQ:
                    a = a * _col(KEEP, sel)[:, None]
                if B_VAR:
                    Bj = tl.load(B_row + pj * s_Bl + n * s_Bn, mask=(pj < L) & (n < NP), other=0.0)
                    h = a * h + _col(DTU, sel)[:, None] * Bj[None, :]
                else:
                    h = a * h + _col(DTU, sel)[:, None] * Bc
        tl.debug_barrier()
        # pass 2: chunks of the segment, last to first
        for ki in range(K):
            k = K - 1 - ki
            h = tl.load(scr_rows + k * NP, mask=dfull, other=0.0)
            c = s * K + k
            m, p, pm, m2, U, DL, DT, DTU = _chunk_inputs(c, n_chunks, offs, dmask, u_rows, dl_rows, bias, L, T,
                                                         SOFTPLUS, REVERSE)
            DO = tl.load(do_rows + p[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_Z:
                Z = tl.load(z_rows + p[None, :], mask=m2, other=0.0).to(tl.float32)
                DZ = tl.zeros([BD, T], dtype=tl.float32)
            if HAS_SEQ:
                KEEP = _keep_tile(seq_ptr, q_row, p, pm, dmask, L, REVERSE)
            # recompute the chunk's states; H[r] = state after scan step T-1-r
            H = ()
            for j in tl.static_range(T):
                jj = j + REVERSE * (T - 1 - 2 * j)  # tile column of scan step j
                sel = offs[None, :] == jj
                pj = m * T + jj
                a = tl.exp2(_col(DT, sel)[:, None] * A2)
                if HAS_SEQ:
                    a = a * _col(KEEP, sel)[:, None]
                if B_VAR:
                    Bj = tl.load(B_row + pj * s_Bl + n * s_Bn, mask=(pj < L) & (n < NP), other=0.0)
                    h = a * h + _col(DTU, sel)[:, None] * Bj[None, :]
                else:
                    h = a * h + _col(DTU, sel)[:, None] * Bc
                H = (h,) + H
            DU = tl.zeros([BD, T], dtype=tl.float32)
            DDT = tl.zeros([BD, T], dtype=tl.float32)
            for r in tl.static_range(T):
                jj = T - 1 - r - REVERSE * (T - 1 - 2 * r)  # tile column of scan step T-1-r
                sel = offs[None, :] == jj
                pj = m * T + jj
                h_j = H[r]
                dt_j = _col(DT, sel)
                dtu_j = _col(DTU, sel)
                u_j = _col(U, sel)
                dy_j = _col(DO, sel)
                if B_VAR:
                    Bx = tl.load(B_row + pj * s_Bl + n * s_Bn, mask=(pj < L) & (n < NP), other=0.0)[None, :]
                else:
                    Bx = Bc
                if C_VAR:
                    Cx = tl.load(C_row + pj * s_Cl + n * s_Cn, mask=(pj < L) & (n < NP), other=0.0)[None, :]
                else:
                    Cx = Cc
                if HAS_Z:
                    y_j = tl.sum(h_j * Cx, axis=1)
                    if HAS_D:
                        y_j += Dv * u_j
                    z_j = _col(Z, sel)
                    sz = tl.sigmoid(z_j)
                    DZ = tl.where(sel, (dy_j * y_j * sz * (1.0 + z_j * (1.0 - sz)))[:, None], DZ)
                    dy_j = dy_j * z_j * sz
                g = dy_j[:, None] * Cx + w
                a = tl.exp2(dt_j[:, None] * A2)
                if HAS_SEQ:
                    a = a * _col(KEEP, sel)[:, None]
                gah = g * (h_j - dtu_j[:, None] * Bx)  # g_t * a_t h_{t-1}
                gB = tl.sum(g * Bx, axis=1)
                ddt_j = tl.sum(gah * A, axis=1) + u_j * gB
                du_j = dt_j * gB
                if HAS_D:
                    du_j += dy_j * Dv
                    dD_acc += dy_j * u_j
                dA_acc += gah * dt_j[:, None]
                w = a * g  # gradient w.r.t. the previous state
                DU = tl.where(sel, du_j[:, None], DU)
                DDT = tl.where(sel, ddt_j[:, None], DDT)
                if B_VAR:
                    rowB = tl.sum(g * dtu_j[:, None], axis=0)
                    if ATOMIC:
                        tl.atomic_add(gB_row + pj * NP + n, rowB, mask=(pj < L) & (n < NP), sem="relaxed")
                    else:
                        tl.store(gB_row + pj * NP + n, rowB, mask=(pj < L) & (n < NP))
                else:
                    dB_acc += g * dtu_j[:, None]
                if C_VAR:
                    rowC = tl.sum(h_j * dy_j[:, None], axis=0)
                    if ATOMIC:
                        tl.atomic_add(gC_row + pj * NP + n, rowC, mask=(pj < L) & (n < NP), sem="relaxed")
                    else:
                        tl.store(gC_row + pj * NP + n, rowC, mask=(pj < L) & (n < NP))
                else:
                    dC_acc += h_j * dy_j[:, None]
            if SOFTPLUS:
                DDT = DDT * _softplus_grad(DL + bias[:, None])
            DDT = tl.where(m2, DDT, 0.0)
            dbias_acc += tl.sum(DDT, axis=1)
            tl.store(du_ptr + g_rows + p[None, :], DU.to(du_ptr.dtype.element_ty), mask=m2)
            tl.store(ddl_ptr + g_rows + p[None, :], DDT.to(ddl_ptr.dtype.element_ty), mask=m2)
            if HAS_Z:
                tl.store(dz_ptr + g_rows + p[None, :], DZ.to(dz_ptr.dtype.element_ty), mask=m2)
        tl.debug_barrier()

    dn_off = (pb * dim + d[:, None]) * N + n[None, :]
    tl.store(dA_ptr + dn_off, dA_acc, mask=dn_mask)
    if STORE_DH0:
        if pid_p == 0:
            tl.store(dh0_ptr + (pid_b * dim + d[:, None]) * N + n[None, :], w, mask=dn_mask)
    if not B_VAR:
        tl.store(dB_ptr + dn_off, dB_acc, mask=dn_mask)
    if not C_VAR:
        tl.store(dC_ptr + dn_off, dC_acc, mask=dn_mask)
    if HAS_D:
        tl.store(dD_ptr + pb * dim + d, dD_acc, mask=dmask)
    if HAS_BIAS:
        tl.store(dbias_ptr + pb * dim + d, dbias_acc, mask=dmask)


@triton.jit
def _seq_bwd_local_kernel(
    dl_ptr, A_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, dout_ptr, wloc_ptr, dec_ptr,
    dim, L, N, n_seg, dpg_C, part_segs,
    s_db, s_dd, s_zb, s_zd, s_ob, s_od,
    s_Ad, s_An,
    s_Cb, s_Cg, s_Cl, s_Cn,
    s_qb,
    BD: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, K: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr, C_VAR: tl.constexpr,
):
    """Adjoint of one part run from zero at its end: w = dL/d(state entering the part) from the part's
    own outputs (g_t = C_t dy_t + a_{t+1} g_{t+1}; no states needed). Parts 1..n_par-1 only."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_p = tl.program_id(2) + 1
    LOG2E: tl.constexpr = 1.4426950408889634
    d, dmask, n, nmask, dn_mask, A, bias = _channel_block(A_ptr, bias_ptr, s_Ad, s_An, dim, N, BD, NP, HAS_BIAS)
    A2 = A * LOG2E
    offs = tl.arange(0, T)
    if C_VAR:
        C_row = C_ptr + pid_b * s_Cb + ((pid_d * BD) // dpg_C) * s_Cg
    else:
        Cc = tl.load(C_ptr + d[:, None] * s_Cg + n[None, :] * s_Cn, mask=dn_mask, other=0.0).to(tl.float32)
    dl_rows = dl_ptr + pid_b * s_db + d[:, None] * s_dd
    z_rows = z_ptr + pid_b * s_zb + d[:, None] * s_zd
    do_rows = dout_ptr + pid_b * s_ob + d[:, None] * s_od
    q_row = pid_b * s_qb
    n_chunks = n_seg * K
    c0 = pid_p * part_segs * K
    c1 = tl.minimum(c0 + part_segs * K, n_chunks)
    w = tl.zeros([BD, NP], dtype=tl.float32)
    sum_dt = tl.zeros([BD], dtype=tl.float32)
    keep_all = tl.full([BD], 1.0, dtype=tl.float32)
    for ci in range(c1 - c0):
        m, p, pm, m2 = _chunk_tile(c1 - 1 - ci, n_chunks, offs, dmask, L, T, REVERSE)
        DL = tl.load(dl_rows + p[None, :], mask=m2, other=0.0).to(tl.float32)
        DT = _dt(DL, bias[:, None], m2, SOFTPLUS)
        DY = tl.load(do_rows + p[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            Z = tl.load(z_rows + p[None, :], mask=m2, other=0.0).to(tl.float32)
            DY = DY * Z * tl.sigmoid(Z)
        sum_dt += tl.sum(DT, axis=1)
        if HAS_SEQ:
            KEEP = _keep_tile(seq_ptr, q_row, p, pm, dmask, L, REVERSE)
            keep_all = keep_all * tl.min(KEEP, axis=1)
        for r in tl.static_range(T):
            jj = T - 1 - r - REVERSE * (T - 1 - 2 * r)  # tile column of scan step T-1-r
            sel = offs[None, :] == jj
            pj = m * T + jj
            if C_VAR:
                Cx = tl.load(C_row + pj * s_Cl + n * s_Cn, mask=(pj < L) & (n < NP), other=0.0)[None, :]
            else:
                Cx = Cc
            a = tl.exp2(_col(DT, sel)[:, None] * A2)
            if HAS_SEQ:
                a = a * _col(KEEP, sel)[:, None]
            w = a * (_col(DY, sel)[:, None] * Cx + w)
    BDN = tl.num_programs(1).to(tl.int64) * dim * N
    off = pid_p * BDN + (pid_b * dim + d[:, None]) * N + n[None, :]
    tl.store(wloc_ptr + off, w, mask=dn_mask)
    tl.store(dec_ptr + off, tl.exp2(sum_dt[:, None] * A2) * keep_all[:, None], mask=dn_mask)


@triton.jit
def _pass_kernel(x_ptr, dec_ptr, loc_ptr, init_ptr, total, n_par, BLOCK: tl.constexpr, REV: tl.constexpr,
                 HAS_INIT: tl.constexpr):
    """Carry across parts. Forward: x[p] = H; H = dec[p] H + loc[p] (H from init). Reverse (adjoint):
    x[p] = W; W = loc[p] + dec[p] W, for p = n_par-1 .. 0. Tensors are (n_par, total) fp32."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = i < total
    if HAS_INIT:
        H = tl.load(init_ptr + i, mask=msk, other=0.0).to(tl.float32)
    else:
        H = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(n_par):
        if REV:
            pp = n_par - 1 - k
        else:
            pp = k
        tl.store(x_ptr + pp * total + i, H, mask=msk)
        dec = tl.load(dec_ptr + pp * total + i, mask=msk, other=0.0)
        loc = tl.load(loc_ptr + pp * total + i, mask=msk, other=0.0)
        H = dec * H + loc


# ----------------------------------------------------------------------------------------------------
# seq launchers


def _rows(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Make the last (length) axis contiguous."""
    if x is None or x.stride(-1) == 1:
        return x
    return x.contiguous()


def _bc_t(X: torch.Tensor, NP: int) -> torch.Tensor:
    """(batch, G, N, L) -> fp32 (batch, G, L, NP) contiguous (zero-padded N); (dim, N) stays as is."""
    if X.dim() == 2:
        return X
    b, G, N, L = X.shape
    out = torch.zeros((b, G, L, NP), dtype=torch.float32, device=X.device) if NP != N else None
    if out is None:
        return X.transpose(2, 3).to(torch.float32, memory_format=torch.contiguous_format).contiguous()
    out[..., :N] = X.transpose(2, 3)
    return out


def _bc_args(X):
    if X.dim() == 2:  # (dim, N): group stride = dim stride
        return 0, X.stride(0), 0, X.stride(1)
    return X.stride(0), X.stride(1), X.stride(2), X.stride(3)


def _parts(n_seg: int, n_par: int):
    """(segments per part, number of parts) for a requested number of parts."""
    n_par = max(1, min(int(n_par), n_seg))
    part_segs = triton.cdiv(n_seg, n_par)
    return part_segs, triton.cdiv(n_seg, part_segs)


def _regs(maxnreg):
    return {"maxnreg": int(maxnreg)} if maxnreg and not interpreting() else {}


def _seq_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, reverse, p):
    batch, dim, L = u.shape
    N = A.shape[1]
    NP, T, seg, nw = p["NP"], p["T"], p["chunk"], p["nw"]
    BD = 32 * nw
    K = seg // T
    n_seg = triton.cdiv(L, seg)
    u, delta, z = _rows(u), _rows(delta), _rows(z)
    seq_idx = _rows(seq_idx)
    Bt, Ct = _bc_t(B, NP), _bc_t(C, NP)
    out = torch.empty((batch, dim, L), dtype=u.dtype, device=u.device)
    last = torch.empty((batch, dim, N), dtype=torch.float32, device=u.device)
    states = torch.empty((batch, dim, n_seg, N), dtype=torch.float32, device=u.device)
    part_segs, n_par = _parts(n_seg, p["n_par"])
    dummy = last
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    ent = loc = dec = dummy
    args = (
        dim, L, N, n_seg, dim // (B.shape[1] if B.dim() == 4 else dim), dim // (C.shape[1] if C.dim() == 4 else dim),
        part_segs, n_par,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
        *((z.stride(0), z.stride(1)) if z is not None else (0, 0)),
        A.stride(0), A.stride(1), *_bc_args(Bt), *_bc_args(Ct),
        seq_idx.stride(0) if seq_idx is not None else 0,
        *(h0.stride() if h0 is not None else (0, 0, 0)),
    )
    flags = dict(BD=BD, NP=NP, T=T, K=K, HAS_D=D is not None, HAS_Z=z is not None,
                 HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), HAS_H0=h0 is not None,
                 HAS_SEQ=seq_idx is not None, REVERSE=bool(reverse), B_VAR=B.dim() == 4, C_VAR=C.dim() == 4,
                 num_warps=nw, **_regs(p["maxnreg"]))
    ptrs = lambda: (u, delta, A, Bt, Ct, D if D is not None else dummy, z if z is not None else u,  # noqa: E731
                    delta_bias if delta_bias is not None else dummy, h0 if h0 is not None else dummy,
                    seq_idx if seq_idx is not None else u, out, last, states, loc, dec, ent)
    if n_par > 1:  # time-parallel: local pass per part, carry across parts, then the full pass
        total = batch * dim * N
        loc = torch.zeros((n_par, batch, dim, N), dtype=torch.float32, device=u.device)
        dec = torch.zeros_like(loc)
        ent = torch.empty_like(loc)
        _seq_fwd_kernel[(triton.cdiv(dim, BD), batch, n_par - 1)](*ptrs(), *args, LOCAL=True, USE_ENT=False,
                                                                  **flags)
        _pass_kernel[(triton.cdiv(total, 1024),)](ent, dec, loc, h0 if h0 is not None else dummy, total, n_par,
                                                  BLOCK=1024, REV=False, HAS_INIT=h0 is not None)
    _seq_fwd_kernel[(triton.cdiv(dim, BD), batch, n_par)](*ptrs(), *args, LOCAL=False, USE_ENT=n_par > 1, **flags)
    return out, last, states


def _seq_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, seq_idx, states, delta_softplus, reverse, need_dh0,
             p, atomic):
    batch, dim, L = u.shape
    N = A.shape[1]
    NP, T, seg, nw = p["NP"], p["Tb"], p["chunk"], p["bnw"]
    BD = 32 * nw
    K = seg // T
    n_seg = states.shape[2]
    u, delta, z, dout = _rows(u), _rows(delta), _rows(z), _rows(dout)
    seq_idx = _rows(seq_idx)
    Bt, Ct = _bc_t(B, NP), _bc_t(C, NP)
    dev, f32 = u.device, torch.float32
    n_blocks = triton.cdiv(dim, BD)
    part_segs, n_par = _parts(n_seg, p["bwd_n_par"])
    du = torch.empty((batch, dim, L), dtype=u.dtype, device=dev)
    ddelta = torch.empty((batch, dim, L), dtype=delta.dtype, device=dev)
    dz = torch.empty((batch, dim, L), dtype=z.dtype, device=dev) if z is not None else None
    dA_p = torch.empty((n_par * batch, dim, N), dtype=f32, device=dev)
    dh0 = torch.empty((batch, dim, N), dtype=f32, device=dev) if need_dh0 else None
    dD_p = torch.empty((n_par * batch, dim), dtype=f32, device=dev) if D is not None else None
    dbias_p = torch.empty((n_par * batch, dim), dtype=f32, device=dev) if delta_bias is not None else None
    scratch = torch.empty((n_par * batch, dim, K, NP), dtype=f32, device=dev)

    def grad_buf(X):
        if X.dim() == 2:
            return torch.empty((n_par * batch, dim, N), dtype=f32, device=dev)
        if atomic:
            return torch.zeros((batch, X.shape[1], L, NP), dtype=f32, device=dev)
        return torch.zeros((batch, n_blocks, L, NP), dtype=f32, device=dev)

    gB, gC = grad_buf(B), grad_buf(C)
    gs = lambda G: (G.stride(0), G.stride(1)) if G.dim() == 4 else (0, 0)  # noqa: E731
    dummy = dA_p
    wend = dummy
    if n_par > 1:  # adjoint of each later part from zero, then carried back across parts
        total = batch * dim * N
        wloc = torch.zeros((n_par, batch, dim, N), dtype=f32, device=dev)
        dec = torch.zeros_like(wloc)
        wend = torch.empty_like(wloc)
        _seq_bwd_local_kernel[(n_blocks, batch, n_par - 1)](
            delta, A, Ct, D if D is not None else dummy, z if z is not None else u,
            delta_bias if delta_bias is not None else dummy, seq_idx if seq_idx is not None else u, dout, wloc, dec,
            dim, L, N, n_seg, dim // (C.shape[1] if C.dim() == 4 else dim), part_segs,
            delta.stride(0), delta.stride(1), *((z.stride(0), z.stride(1)) if z is not None else (0, 0)),
            dout.stride(0), dout.stride(1), A.stride(0), A.stride(1), *_bc_args(Ct),
            seq_idx.stride(0) if seq_idx is not None else 0,
            BD=BD, NP=NP, T=p["T"], K=seg // p["T"], HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), HAS_SEQ=seq_idx is not None, REVERSE=bool(reverse), C_VAR=C.dim() == 4,
            num_warps=nw,
        )
        _pass_kernel[(triton.cdiv(total, 1024),)](wend, dec, wloc, dlast if dlast is not None else dummy, total,
                                                  n_par, BLOCK=1024, REV=True, HAS_INIT=dlast is not None)
    grid = (n_blocks, batch, n_par)
    _seq_bwd_kernel[grid](
        u, delta, A, Bt, Ct, D if D is not None else dummy, z if z is not None else u,
        delta_bias if delta_bias is not None else dummy, seq_idx if seq_idx is not None else u, states, scratch,
        dout, dlast if dlast is not None else dummy, wend,
        du, ddelta, dz if dz is not None else du, dA_p, gB, gC,
        dD_p if dD_p is not None else dummy, dbias_p if dbias_p is not None else dummy,
        dh0 if dh0 is not None else dummy,
        dim, L, N, n_seg, dim // (B.shape[1] if B.dim() == 4 else dim), dim // (C.shape[1] if C.dim() == 4 else dim),
        part_segs, n_par,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
        *((z.stride(0), z.stride(1)) if z is not None else (0, 0)),
        dout.stride(0), dout.stride(1),
        A.stride(0), A.stride(1), *_bc_args(Bt), *_bc_args(Ct),
        seq_idx.stride(0) if seq_idx is not None else 0,
        *gs(gB), *gs(gC),
        BD=BD, NP=NP, T=T, K=K,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        HAS_DLAST=dlast is not None, HAS_SEQ=seq_idx is not None, REVERSE=bool(reverse),
        B_VAR=B.dim() == 4, C_VAR=C.dim() == 4, ATOMIC=atomic, STORE_DH0=need_dh0, USE_WEND=n_par > 1,
        num_warps=nw, **_regs(p["bwd_maxnreg"]),
    )

    def finish(X, G):
        if X.dim() == 2:
            return G.sum(0).to(X.dtype)
        if not atomic:
            Gx = X.shape[1]
            G = G.view(batch, Gx, n_blocks // Gx, L, NP).sum(2)
        return G[..., :N].transpose(2, 3).to(X.dtype, memory_format=torch.contiguous_format)

    dB, dC = finish(B, gB), finish(C, gC)
    dA = dA_p.sum(0).to(A.dtype)
    dD = dD_p.sum(0).to(D.dtype) if D is not None else None
    dbias = dbias_p.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias, dh0


# ----------------------------------------------------------------------------------------------------
# custom ops


def _plan_from(u, delta, z, A, B, C, impl, chunk):
    p = plan(u, delta, z, A, B, C)
    if p["impl"] != impl or p["chunk"] != chunk:  # the plan changed between fwd and bwd: follow fwd
        with kernel_config(impl="seq" if impl == IMPL_SEQ else "assoc",
                           **({"seg": chunk} if impl == IMPL_SEQ else {"chunk": chunk})):
            p = plan(u, delta, z, A, B, C)
    return p


@torch.library.custom_op("ssmkit::selective_scan_fwd", mutates_args=())
def _scan_fwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                 initial_state: Optional[torch.Tensor], seq_idx: Optional[torch.Tensor],
                 delta_softplus: bool, reverse: bool, impl: int,
                 chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = _plan_from(u, delta, z, A, B, C, impl, chunk)
    if impl == IMPL_SEQ:
        return _seq_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, reverse, p)
    return assoc_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, reverse,
                     p["chunk"], p["bd"], p["nw"])


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, reverse, impl, chunk):
    batch, dim, L = u.shape
    N = A.shape[1]
    nc = (L + chunk - 1) // chunk
    return (u.new_empty((batch, dim, L)), u.new_empty((batch, dim, N), dtype=torch.float32),
            u.new_empty((batch, dim, nc, N), dtype=torch.float32))


@torch.library.custom_op("ssmkit::selective_scan_bwd", mutates_args=())
def _scan_bwd_op(dout: torch.Tensor, dlast: Optional[torch.Tensor], u: torch.Tensor, delta: torch.Tensor,
                 A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor],
                 z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], seq_idx: Optional[torch.Tensor],
                 states: torch.Tensor, delta_softplus: bool, reverse: bool, impl: int, chunk: int,
                 need_dh0: bool) -> list[torch.Tensor]:
    p = _plan_from(u, delta, z, A, B, C, impl, chunk)
    atomic = not deterministic()
    if impl == IMPL_SEQ:
        r = _seq_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, seq_idx, states, delta_softplus, reverse,
                     need_dh0, p, atomic)
    else:
        r = assoc_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, seq_idx, states, delta_softplus, reverse,
                      p["chunk"], need_dh0, p["bbd"], p["bnw"], p["rev_flip"], atomic)
    # absent gradients come back as empty tensors (a custom op cannot return None)
    return [x if x is not None else u.new_empty(0) for x in r]


@_scan_bwd_op.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, seq_idx, states, delta_softplus, reverse, impl, chunk,
      need_dh0):
    batch, dim, L = u.shape
    N = A.shape[1]
    e = u.new_empty(0)
    return [
        u.new_empty((batch, dim, L)),
        delta.new_empty((batch, dim, L)),
        torch.empty_like(A),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        D.new_empty(D.shape) if D is not None else e,
        z.new_empty((batch, dim, L)) if z is not None else e,
        delta_bias.new_empty(delta_bias.shape) if delta_bias is not None else e,
        u.new_empty((batch, dim, N), dtype=torch.float32) if need_dh0 else e,
    ]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, reverse, impl, chunk = inputs
    _, _, states = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, states)
    ctx.flags = (delta_softplus, reverse, impl, chunk, initial_state is not None,
                 initial_state.dtype if initial_state is not None else None)


def _backward(ctx, dout, dlast, dstates):
    u, delta, A, B, C, D, z, delta_bias, seq_idx, states = ctx.saved_tensors
    delta_softplus, reverse, impl, chunk, has_h0, h0_dtype = ctx.flags
    if dout is None:
        dout = torch.zeros_like(u)
    if dlast is not None:
        dlast = dlast.float().contiguous()
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = torch.ops.ssmkit.selective_scan_bwd(
        dout, dlast, u, delta, A, B, C, D, z, delta_bias, seq_idx, states, delta_softplus, reverse, impl, chunk,
        has_h0)
    return (du, ddelta, dA, dB, dC,
            dD if D is not None else None,
            dz if z is not None else None,
            dbias if delta_bias is not None else None,
            dh0.to(h0_dtype) if has_h0 else None,
            None, None, None, None, None)


torch.library.register_autograd("ssmkit::selective_scan_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# state update (one decode step)


@triton.jit
def _state_update_kernel(
    st_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    dim, N, dpg_B, dpg_C,
    s_sb, s_sd, s_sn,
    s_xb, s_xd, s_tb, s_td, s_zb, s_zd,
    s_Ad, s_An,
    s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
    BLOCK_D: tl.constexpr, NP: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < dim
    n = tl.arange(0, NP)
    m = dmask[:, None] & (n < N)[None, :]
    sp = st_ptr + pid_b * s_sb + d[:, None] * s_sd + n[None, :] * s_sn
    h = tl.load(sp, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * s_xb + d * s_xd, mask=dmask, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * s_tb + d * s_td, mask=dmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + d[:, None] * s_Ad + n[None, :] * s_An, mask=m, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + pid_b * s_Bb + (d // dpg_B)[:, None] * s_Bg + n[None, :] * s_Bn, mask=m,
                 other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pid_b * s_Cb + (d // dpg_C)[:, None] * s_Cg + n[None, :] * s_Cn, mask=m,
                 other=0.0).to(tl.float32)
    h = h * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * Bv
    tl.store(sp, h.to(st_ptr.dtype.element_ty), mask=m)
    y = tl.sum(h * Cv, axis=1)
    if HAS_D:
        y += tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32) * x
    if HAS_Z:
        zz = tl.load(z_ptr + pid_b * s_zb + d * s_zd, mask=dmask, other=0.0).to(tl.float32)
        y = y * zz * tl.sigmoid(zz)
    tl.store(y_ptr + pid_b * dim + d, y.to(y_ptr.dtype.element_ty), mask=dmask)


@torch.library.custom_op("ssmkit::selective_state_update", mutates_args=("state",))
def _state_update_op(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                     dt_bias: Optional[torch.Tensor], dt_softplus: bool) -> torch.Tensor:
    batch, dim, N = state.shape
    y = torch.empty((batch, dim), dtype=x.dtype, device=x.device)
    NP = triton.next_power_of_2(N)
    bd = max(1, min(64, 2048 // NP)) if not interpreting() else 4
    bd = min(bd, triton.next_power_of_2(dim))
    dummy = x
    grid = (triton.cdiv(dim, bd), batch)
    _state_update_kernel[grid](
        state, x, dt, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        dt_bias if dt_bias is not None else dummy, y,
        dim, N, dim // B.shape[1], dim // C.shape[1],
        *state.stride(), *x.stride(), *dt.stride(), *(z.stride() if z is not None else (0, 0)),
        *A.stride(), *B.stride(), *C.stride(),
        BLOCK_D=bd, NP=NP, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), num_warps=4,
    )
    return y


@_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return x.new_empty(x.shape)


# ----------------------------------------------------------------------------------------------------
# entry points (called by ssmkit.core.scan)


def selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reverse, seq_idx):
    """Triton selective scan. u, delta, z: (batch, dim, L); A: (dim, N) fp32; B, C: (batch, G, N, L)
    (any strides) or time-invariant (dim, N) (a stride-0 expansion of a (dim, N) tensor is recognised);
    D, delta_bias: (dim,) fp32 or None; initial_state: (batch, dim, N) fp32 or None; seq_idx: (batch, L)
    int or None. Returns (y (batch, dim, L) in u's dtype, last_state (batch, dim, N) fp32); both
    differentiable."""
    dim, N = A.shape
    B = B.unsqueeze(1) if B.dim() == 3 else as_time_invariant(B, dim, N)
    C = C.unsqueeze(1) if C.dim() == 3 else as_time_invariant(C, dim, N)
    p = plan(u, delta, z, A, B, C)
    out, last, _ = torch.ops.ssmkit.selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, bool(delta_softplus), bool(reverse),
        p["impl"], p["chunk"])
    return out, last


def selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """One decode step in place on `state` (batch, dim, N); B, C: (batch, G, N) or (batch, N).
    Returns y (batch, dim) in x's dtype."""
    if B.dim() == 2:
        B = B.unsqueeze(1)
    if C.dim() == 2:
        C = C.unsqueeze(1)
    return torch.ops.ssmkit.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))
