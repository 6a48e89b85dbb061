/* The selective-scan kernels for one scalar type; included by scan.c with T, SFX, EXP and LOG1P set. */

#define AT(p, s, b, d, t) ((p)[(b) * (s)[0] + (d) * (s)[1] + (t) * (s)[2]])

INLINE T SFX(sigmoid)(T x) { return (T)1 / ((T)1 + EXP(-x)); }

/* softplus with PyTorch's threshold: x above 20 is kept as it is */
INLINE T SFX(softplus)(T x) { return x > (T)20 ? x : LOG1P(EXP(x < (T)20 ? x : (T)20)); }

/* dt from x = delta + bias; *slope = d dt / d x (softplus' = sigmoid below PyTorch's threshold of 20) */
INLINE T SFX(step_size)(T x, int64_t softplus, T *slope) {
    if (!softplus) {
        *slope = 1;
        return x;
    }
    const T e = EXP(x < (T)20 ? x : (T)20);
    *slope = x > (T)20 ? (T)1 : e / ((T)1 + e);
    return x > (T)20 ? x : LOG1P(e);
}

/* Where an item's B (or C) rows start: its group's rows (time-varying; the item's channels share them)
   or the time-invariant row of its first channel */
INLINE const T *SFX(bc_base)(const T *X, const int64_t *s, int64_t var, int64_t dpg, int64_t b, int64_t d0) {
    return var ? X + b * s[0] + (d0 / dpg) * s[1] : X + d0 * s[1];
}

/* The row of the item's channel c at time t */
INLINE const T *SFX(bc_row)(const T *base, const int64_t *s, int64_t var, int64_t c, int64_t t) {
    return var ? base + t * s[2] : base + c * s[1];
}

INLINE int64_t SFX(position)(const ssm_args *a, int64_t s) { return a->reverse ? a->L - 1 - s : s; }

/* 0 where scan step s starts a new packed sequence (the state resets), else 1 */
INLINE T SFX(keep)(const ssm_args *a, const int64_t *seq, int64_t s) {
    if (!seq || s == 0) return 1;
    return seq[SFX(position)(a, s)] != seq[SFX(position)(a, s - 1)] ? (T)0 : (T)1;
}

/* tile[j * tj + c * tc] = p[c * s[1] + j * step] for the m steps of a block (step: +-s[2], in scan order),
   read along whichever of the time and channel axes is contiguous in memory */
INLINE void SFX(gather_tile)(const T *p, const int64_t *s, int64_t reverse, int64_t m, int64_t cb, T *restrict tile,
                             int64_t tj, int64_t tc) {
    const int64_t st = reverse ? -s[2] : s[2], sc = s[1];
    if (s[2] == 1 && sc != 1) {
        for (int64_t c = 0; c < cb; c++)
#pragma omp simd
            for (int64_t j = 0; j < m; j++) tile[j * tj + c * tc] = p[c * sc + j * st];
    } else {
        for (int64_t j = 0; j < m; j++)
#pragma omp simd
            for (int64_t c = 0; c < cb; c++) tile[j * tj + c * tc] = p[c * sc + j * st];
    }
}

/* The inverse of gather_tile: p[c * s[1] + j * step] = tile[j * tj + c * tc] */
INLINE void SFX(scatter_tile)(const T *tile, int64_t tj, int64_t tc, int64_t m, int64_t cb, T *restrict p,
                              const int64_t *s, int64_t reverse) {
    const int64_t st = reverse ? -s[2] : s[2], sc = s[1];
    if (s[2] == 1 && sc != 1) {
        for (int64_t c = 0; c < cb; c++)
#pragma omp simd
            for (int64_t j = 0; j < m; j++) p[c * sc + j * st] = tile[j * tj + c * tc];
    } else {
        for (int64_t j = 0; j < m; j++)
#pragma omp simd
            for (int64_t c = 0; c < cb; c++) p[c * sc + j * st] = tile[j * tj + c * tc];
    }
}

/* The backward's per-position inputs and outputs of scan steps s0 .. s0+m-1 of the item's channels, as
   [c][j] tiles of stride K: dt and its slope, u, z and sigmoid(z), dy; du, d(delta), dz. */
typedef struct {
    T *dt, *slope, *u, *z, *sz, *dy, *du, *ddelta, *dz;
} SFX(tile);

static int64_t SFX(tile_scratch)(const ssm_args *a) { return 9 * a->cb * a->K; }

INLINE SFX(tile) SFX(tile_at)(const ssm_args *a, T *work) {
    const int64_t n = a->cb * a->K;
    SFX(tile) tl = {work, work + n, work + 2 * n, work + 3 * n, work + 4 * n, work + 5 * n, work + 6 * n,
                    work + 7 * n, work + 8 * n};
    return tl;
}

INLINE void SFX(load_tile)(const ssm_args *a, const SFX(tile) *tl, int64_t b, int64_t d0, int64_t s0, int64_t m) {
    const int64_t K = a->K, cb = a->cb, t0 = SFX(position)(a, s0);
    SFX(gather_tile)(&AT((const T *)a->delta, a->sd, b, d0, t0), a->sd, a->reverse, m, cb, tl->dt, 1, K);
    SFX(gather_tile)(&AT((const T *)a->u, a->su, b, d0, t0), a->su, a->reverse, m, cb, tl->u, 1, K);
    SFX(gather_tile)(&AT((const T *)a->dy, a->sdy, b, d0, t0), a->sdy, a->reverse, m, cb, tl->dy, 1, K);
    if (a->z) SFX(gather_tile)(&AT((const T *)a->z, a->sz, b, d0, t0), a->sz, a->reverse, m, cb, tl->z, 1, K);
    for (int64_t c = 0; c < cb; c++) {
        const T bd = a->bias ? ((const T *)a->bias)[d0 + c] : (T)0;
        T *dt = tl->dt + c * K, *slope = tl->slope + c * K, *zz = tl->z + c * K, *sg = tl->sz + c * K;
#pragma omp simd
        for (int64_t j = 0; j < m; j++) dt[j] = SFX(step_size)(dt[j] + bd, a->softplus, slope + j);
        if (a->z) {
#pragma omp simd
            for (int64_t j = 0; j < m; j++) sg[j] = SFX(sigmoid)(zz[j]);
        }
    }
}

INLINE void SFX(store_tile)(const ssm_args *a, const SFX(tile) *tl, int64_t b, int64_t d0, int64_t s0, int64_t m) {
    const int64_t K = a->K, cb = a->cb, t0 = SFX(position)(a, s0);
    SFX(scatter_tile)(tl->du, 1, K, m, cb, &AT((T *)a->du, a->sdu, b, d0, t0), a->sdu, a->reverse);
    SFX(scatter_tile)(tl->ddelta, 1, K, m, cb, &AT((T *)a->ddelta, a->sdd, b, d0, t0), a->sdd, a->reverse);
    if (a->z) SFX(scatter_tile)(tl->dz, 1, K, m, cb, &AT((T *)a->dz, a->sdz, b, d0, t0), a->sdz, a->reverse);
}

/* Forward scratch of one item, in elements of T: states, A, time-invariant B and C as [n][c], and the
   step tiles dt, u, silu(z) and y as [j][c]. */
static int64_t SFX(fwd_scratch)(const ssm_args *a) { return 4 * a->N * a->cb + 4 * a->K * a->cb; }

/* The K-block steps of one item, the loop over its channels vectorised (channel-last tiles): per
   step and state n, exp(dt A_n) for all the item's channels at once, and y accumulates over n
   without a horizontal sum. BV, CV: B, C time-varying (one row shared by the item's channels, a
   scalar per state) or time-invariant (a row per channel, [n][c] in BT, CT). */
INLINE void SFX(fwd_steps)(const ssm_args *a, const int64_t *seq, int64_t s0, int64_t m,
                           const T *B0, const T *C0, T *restrict h, const T *AT, const T *BT, const T *CT,
                           const T *dts, const T *us, T *restrict ys, const int64_t N, const int64_t cb,
                           const int BV, const int CV) {
    for (int64_t j = 0; j < m; j++) {
        const int64_t t = SFX(position)(a, s0 + j);
        const T keep = SFX(keep)(a, seq, s0 + j);
        const T *Bt = BV ? B0 + t * a->sB[2] : NULL, *Ct = CV ? C0 + t * a->sC[2] : NULL;
        const T *dt = dts + j * cb, *u = us + j * cb;
        T *restrict y = ys + j * cb;
        for (int64_t c = 0; c < cb; c++) y[c] = 0;
        for (int64_t n = 0; n < N; n++) {
            const T *An = AT + n * cb, *Bn = BT + n * cb, *Cn = CT + n * cb;
            T *restrict hn = h + n * cb;
            const T bn = BV ? Bt[n] : (T)0, cn = CV ? Ct[n] : (T)0;
#pragma omp simd
            for (int64_t c = 0; c < cb; c++) {
                const T v = STATE_EXP(dt[c] * An[c]) * keep * hn[c] + dt[c] * u[c] * (BV ? bn : Bn[c]);
                hn[c] = v;
                y[c] += v * (CV ? cn : Cn[c]);
            }
        }
    }
}

/* Forward of one item (batch row b, channels d0 .. d0+cb-1), K-block by K-block. */
INLINE void SFX(fwd_item)(const ssm_args *a, int64_t b, int64_t blk, T *work, const int64_t N, const int64_t cb) {
    const T *A = a->A, *D = a->D, *h0 = a->h0, *u = a->u, *delta = a->delta, *z = a->z, *bias = a->bias;
    T *y = a->y, *last = a->last, *ckpt = a->ckpt;
    const int64_t d0 = blk * cb, L = a->L, K = a->K, dim = a->dim, nk = (L + K - 1) / K;
    const int64_t *seq = a->seq ? a->seq + b * L : NULL;
    T *h = work, *AT = h + N * cb, *BT = AT + N * cb, *CT = BT + N * cb;
    T *dts = CT + N * cb, *us = dts + K * cb, *gs = us + K * cb, *ys = gs + K * cb;
    const T *B0 = SFX(bc_base)(a->B, a->sB, a->B_var, a->dpg_B, b, d0);
    const T *C0 = SFX(bc_base)(a->C, a->sC, a->C_var, a->dpg_C, b, d0);
    for (int64_t c = 0; c < cb; c++)
        for (int64_t n = 0; n < N; n++) {
            h[n * cb + c] = h0 ? h0[(b * dim + d0 + c) * N + n] : (T)0;
            AT[n * cb + c] = A[(d0 + c) * N + n];
            BT[n * cb + c] = a->B_var ? (T)0 : B0[c * a->sB[1] + n];
            CT[n * cb + c] = a->C_var ? (T)0 : C0[c * a->sC[1] + n];
        }
    for (int64_t k = 0; k < nk; k++) {
        const int64_t s0 = k * K, m = (s0 + K < L ? s0 + K : L) - s0;
        if (ckpt)
            for (int64_t c = 0; c < cb; c++)
                for (int64_t n = 0; n < N; n++) ckpt[((b * dim + d0 + c) * nk + k) * N + n] = h[n * cb + c];
        /* the block's dt, u and gate as [j][c] tiles */
        const int64_t t0 = SFX(position)(a, s0);
        SFX(gather_tile)(&AT(delta, a->sd, b, d0, t0), a->sd, a->reverse, m, cb, dts, cb, 1);
        SFX(gather_tile)(&AT(u, a->su, b, d0, t0), a->su, a->reverse, m, cb, us, cb, 1);
        if (z) SFX(gather_tile)(&AT(z, a->sz, b, d0, t0), a->sz, a->reverse, m, cb, gs, cb, 1);
        for (int64_t j = 0; j < m; j++) {
            T *dt = dts + j * cb, *g = gs + j * cb;
#pragma omp simd
            for (int64_t c = 0; c < cb; c++) dt[c] += bias ? bias[d0 + c] : (T)0;
            if (a->softplus) {
#pragma omp simd
                for (int64_t c = 0; c < cb; c++) dt[c] = SFX(softplus)(dt[c]);
            }
            if (z) {
#pragma omp simd
                for (int64_t c = 0; c < cb; c++) g[c] *= SFX(sigmoid)(g[c]);
            }
        }
        /* specialised for B and C varying or not */
#define FWD_STEPS(BV, CV) SFX(fwd_steps)(a, seq, s0, m, B0, C0, h, AT, BT, CT, dts, us, ys, N, cb, BV, CV)
        if (a->B_var && a->C_var) FWD_STEPS(1, 1);
        else if (a->B_var) FWD_STEPS(1, 0);
        else if (a->C_var) FWD_STEPS(0, 1);
        else FWD_STEPS(0, 0);
#undef FWD_STEPS
        for (int64_t j = 0; j < m; j++) { /* y = (C.h + D u) * silu(z) */
#pragma omp simd
            for (int64_t c = 0; c < cb; c++) {
                const T v = ys[j * cb + c] + (D ? D[d0 + c] : (T)0) * us[j * cb + c];
                ys[j * cb + c] = z ? v * gs[j * cb + c] : v;
            }
        }
        SFX(scatter_tile)(ys, cb, 1, m, cb, &AT(y, a->sy, b, d0, t0), a->sy, a->reverse);
    }
    if (last)
        for (int64_t c = 0; c < cb; c++)
            for (int64_t n = 0; n < N; n++) last[(b * dim + d0 + c) * N + n] = h[n * cb + c];
}

void SFX(ssm_fwd)(const ssm_args *a) {
    const int64_t nblk = a->dim / a->cb, items = a->batch * nblk;
#pragma omp parallel num_threads(a->threads)
    {
        T *work = malloc(SFX(fwd_scratch)(a) * sizeof(T));
#pragma omp for schedule(static)
        for (int64_t w = 0; w < items; w++) {
            if (a->N == 16 && a->cb == 16) /* the common case, compiled for its constants */
                SFX(fwd_item)(a, w / nblk, w % nblk, work, 16, 16);
            else
                SFX(fwd_item)(a, w / nblk, w % nblk, work, a->N, a->cb);
        }
        free(work);
    }
}

/* Scratch of one backward item, in elements of T (see bwd_item). */
static int64_t SFX(bwd_scratch)(const ssm_args *a) {
    const int64_t cn = a->cb * a->N, K = a->K;
    return 4 * cn + cn * (2 * K + 1) + 2 * K * a->N + 2 * a->cb + SFX(tile_scratch)(a);
}

/* Backward of one item. For each K-block, last to first: recompute the block's states from the saved
   state entering it, then run the adjoint G_t = dL/dh_t = g_t C_t + a_{t+1} G_{t+1} backwards; both
   channel by channel, so that the channel's states and adjoint stay in registers. */
INLINE void SFX(bwd_item)(const ssm_args *a, int64_t b, int64_t blk, T *work, const int64_t N) {
    const T *A = a->A, *D = a->D, *dlast = a->dlast, *ckpt = a->ckpt;
    const int64_t cb = a->cb, d0 = blk * cb, L = a->L, K = a->K, dim = a->dim, nk = (L + K - 1) / K;
    const int64_t cn = cb * N, nblk = dim / cb, dir = a->reverse ? -1 : 1;
    const int64_t *seq = a->seq ? a->seq + b * L : NULL;
    /* per channel, over the whole length: adjoint, dA, and the time-invariant dB, dC */
    T *G = work, *dAacc = G + cn, *dBacc = dAacc + cn, *dCacc = dBacc + cn;
    /* per channel over one block: states h_{j-1}, h_j as hs[c][j][n], decays as[c][j][n] */
    T *hs = dCacc + cn, *as = hs + cn * (K + 1);
    /* per block, summed over the item's channels: time-varying dB, dC rows [j][n] */
    T *dBt = as + cn * K, *dCt = dBt + K * N, *dDacc = dCt + K * N, *dbacc = dDacc + cb;
    const SFX(tile) tl = SFX(tile_at)(a, dbacc + cb);
    const T *B0 = SFX(bc_base)(a->B, a->sB, a->B_var, a->dpg_B, b, d0);
    const T *C0 = SFX(bc_base)(a->C, a->sC, a->C_var, a->dpg_C, b, d0);
    for (int64_t i = 0; i < cn; i++) {
        G[i] = dlast ? dlast[(b * dim + d0) * N + i] : (T)0;
        dAacc[i] = dBacc[i] = dCacc[i] = 0;
    }
    for (int64_t c = 0; c < cb; c++) dDacc[c] = dbacc[c] = 0;

    for (int64_t k = nk - 1; k >= 0; k--) {
        const int64_t s0 = k * K, m = (s0 + K < L ? s0 + K : L) - s0, t0 = SFX(position)(a, s0);
        SFX(load_tile)(a, &tl, b, d0, s0, m);
        for (int64_t c = 0; c < cb; c++) { /* recompute */
            const T *Ad = A + (d0 + c) * N, *dtc = tl.dt + c * K, *uc = tl.u + c * K;
            T *restrict hc = hs + c * (K + 1) * N, *restrict ac = as + c * K * N;
            memcpy(hc, ckpt + ((b * dim + d0 + c) * nk + k) * N, N * sizeof(T));
            for (int64_t j = 0; j < m; j++) {
                const T *Bc = SFX(bc_row)(B0, a->sB, a->B_var, c, t0 + dir * j);
                const T keep = SFX(keep)(a, seq, s0 + j), dt = dtc[j], dtu = dt * uc[j];
#pragma omp simd
                for (int64_t n = 0; n < N; n++) {
                    const T an = STATE_EXP(dt * Ad[n]) * keep;
                    ac[j * N + n] = an;
                    hc[(j + 1) * N + n] = an * hc[j * N + n] + dtu * Bc[n];
                }
            }
        }
        if (a->B_var) memset(dBt, 0, m * N * sizeof(T));
        if (a->C_var) memset(dCt, 0, m * N * sizeof(T));
        for (int64_t c = 0; c < cb; c++) { /* adjoint */
            const int64_t d = d0 + c;
            const T *Ad = A + d * N, *hc = hs + c * (K + 1) * N, *ac = as + c * K * N;
            const T Dd = D ? D[d] : (T)0;
            T *restrict Gc = G + c * N, *restrict dAc = dAacc + c * N;
            T dDc = 0, dbc = 0;
            for (int64_t j = m - 1; j >= 0; j--) {
                const int64_t t = t0 + dir * j, i = c * K + j;
                const T *Bc = SFX(bc_row)(B0, a->sB, a->B_var, c, t);
                const T *Cc = SFX(bc_row)(C0, a->sC, a->C_var, c, t);
                const T *hp = hc + j * N, *hn = hc + (j + 1) * N, *aj = ac + j * N;
                const T dt = tl.dt[i], uu = tl.u[i], dtu = dt * uu;
                T g = tl.dy[i];
                if (a->z) { /* y = y0 * silu(z): dz = g y0 silu'(z), dy0 = g silu(z) */
                    T y0 = Dd * uu;
#pragma omp simd reduction(+ : y0)
                    for (int64_t n = 0; n < N; n++) y0 += hn[n] * Cc[n];
                    const T zz = tl.z[i], sz = tl.sz[i];
                    tl.dz[i] = g * y0 * sz * ((T)1 + zz * ((T)1 - sz));
                    g *= zz * sz;
                }
                dDc += g * uu;
                T *restrict dCd = a->C_var ? dCt + j * N : dCacc + c * N;
                T *restrict dBd = a->B_var ? dBt + j * N : dBacc + c * N;
                T sGB = 0, sqA = 0;
#pragma omp simd reduction(+ : sGB, sqA)
                for (int64_t n = 0; n < N; n++) {
                    dCd[n] += g * hn[n];
                    const T Gn = Gc[n] + g * Cc[n];
                    dBd[n] += Gn * dtu;
                    sGB += Gn * Bc[n];
                    const T q = Gn * aj[n] * hp[n]; /* dL/d(dt A_n) */
                    sqA += q * Ad[n];
                    dAc[n] += q * dt;
                    Gc[n] = Gn * aj[n];
                }
                tl.du[i] = g * Dd + dt * sGB;
                const T ddt = (uu * sGB + sqA) * tl.slope[i];
                tl.ddelta[i] = ddt;
                dbc += ddt;
            }
            dDacc[c] += dDc;
            dbacc[c] += dbc;
        }
        SFX(store_tile)(a, &tl, b, d0, s0, m);
        for (int64_t j = 0; j < m; j++) {
            const int64_t row = (b * nblk + blk) * L + t0 + dir * j;
            if (a->B_var) memcpy((T *)a->dB + row * N, dBt + j * N, N * sizeof(T));
            if (a->C_var) memcpy((T *)a->dC + row * N, dCt + j * N, N * sizeof(T));
        }
    }
    const int64_t row = (b * dim + d0) * N;
    if (a->dh0) memcpy((T *)a->dh0 + row, G, cn * sizeof(T));
    memcpy((T *)a->dA + row, dAacc, cn * sizeof(T));
    if (!a->B_var) memcpy((T *)a->dB + row, dBacc, cn * sizeof(T));
    if (!a->C_var) memcpy((T *)a->dC + row, dCacc, cn * sizeof(T));
    for (int64_t c = 0; c < cb; c++) {
        if (a->dD) ((T *)a->dD)[b * dim + d0 + c] = dDacc[c];
        if (a->dbias) ((T *)a->dbias)[b * dim + d0 + c] = dbacc[c];
    }
}

void SFX(ssm_bwd)(const ssm_args *a) {
    const int64_t nblk = a->dim / a->cb, items = a->batch * nblk;
#pragma omp parallel num_threads(a->threads)
    {
        T *work = malloc(SFX(bwd_scratch)(a) * sizeof(T));
#pragma omp for schedule(static)
        for (int64_t w = 0; w < items; w++) {
            if (a->N == 16)
                SFX(bwd_item)(a, w / nblk, w % nblk, work, 16);
            else
                SFX(bwd_item)(a, w / nblk, w % nblk, work, a->N);
        }
        free(work);
    }
}

/* One decode step in place on the state (batch, dim, N); y (batch, dim). */
void SFX(ssm_step)(const step_args *a) {
    const int64_t N = a->N, dim = a->dim;
    const T *x = a->x, *dtp = a->dt, *A = a->A, *B = a->B, *C = a->C, *D = a->D, *z = a->z, *bias = a->bias;
    T *state = a->state, *y = a->y;
#pragma omp parallel for schedule(static) num_threads(a->threads)
    for (int64_t w = 0; w < a->batch * dim; w++) {
        const int64_t b = w / dim, d = w % dim;
        T slope;
        const T dt = SFX(step_size)(dtp[b * a->sdt[0] + d * a->sdt[1]] + (bias ? bias[d] : (T)0), a->softplus, &slope);
        const T xx = x[b * a->sx[0] + d * a->sx[1]], dtx = dt * xx;
        const T *Bn = B + b * a->sB[0] + (d / a->dpg_B) * a->sB[1], *Cn = C + b * a->sC[0] + (d / a->dpg_C) * a->sC[1];
        const T *Ad = A + d * N;
        T *h = state + b * a->sh[0] + d * a->sh[1], acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t n = 0; n < N; n++) {
            const T hn = STATE_EXP(dt * Ad[n]) * h[n] + dtx * Bn[n];
            h[n] = hn;
            acc += hn * Cn[n];
        }
        if (D) acc += D[d] * xx;
        if (z) {
            const T zz = z[b * a->sz[0] + d * a->sz[1]];
            acc *= zz * SFX(sigmoid)(zz);
        }
        y[w] = acc;
    }
}

#undef AT
