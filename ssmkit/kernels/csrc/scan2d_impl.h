/* The 2-D selective scan of one direction for one scalar type; included by scan.c with T, SFX and
   STATE_EXP set. With Ā = exp(dt A) and x = dt u B at every cell, in scan order (rows from the top or
   the bottom, columns from the left or the right):

       g[i, j] = Ā[i, j] g[i, j-1] + x[i, j]      h[i, j] = Ā[i, j] h[i-1, j] + g[i, j]      y = C . h

   An item is (batch row, block of cb channels of one B/C group), walked channel by channel: the row pass
   state g stays in registers, the column pass reads and writes one row of states (W x N). The forward
   saves the state row entering every K-th scan row; the backward recomputes a band of K rows from it
   (h, g and Ā), then runs the adjoints bottom-up:

       λh[i, j] = C dy + Ā[i+1, j] λh[i+1, j]      λg[i, j] = λh[i, j] + Ā[i, j+1] λg[i, j+1]
       dĀ = λh h[i-1, j] + λg g[i, j-1]             dx = λg
*/

#define AT4(p, s, b, d, i, j) ((p)[(b) * (s)[0] + (d) * (s)[1] + (i) * (s)[2] + (j) * (s)[3]])

INLINE int64_t SFX(row_of)(const scan2d_args *a, int64_t r) { return a->bu ? a->H - 1 - r : r; }
INLINE int64_t SFX(col_of)(const scan2d_args *a, int64_t q) { return a->rtl ? a->W - 1 - q : q; }

INLINE void SFX(fwd2d_item)(const scan2d_args *a, int64_t b, int64_t blk, T *hrow, const int64_t N) {
    const T *u = a->u, *dt = a->dt, *A = a->A, *B = a->B, *C = a->C;
    T *y = a->y, *ckpt = a->ckpt;
    const int64_t H = a->H, W = a->W, K = a->K, nk = (H + K - 1) / K, d0 = blk * a->cb;
    const int64_t gB = d0 / a->dpg_B, gC = d0 / a->dpg_C;
    for (int64_t c = 0; c < a->cb; c++) {
        const int64_t d = d0 + c;
        const T *Ad = A + d * N;
        memset(hrow, 0, W * N * sizeof(T));
        for (int64_t r = 0; r < H; r++) {
            const int64_t i = SFX(row_of)(a, r);
            if (ckpt && r % K == 0) memcpy(ckpt + ((b * a->dim + d) * nk + r / K) * W * N, hrow, W * N * sizeof(T));
            T g[N];
            for (int64_t n = 0; n < N; n++) g[n] = 0;
            for (int64_t q = 0; q < W; q++) {
                const int64_t j = SFX(col_of)(a, q);
                const T s = AT4(dt, a->sdt, b, d, i, j), x = s * AT4(u, a->su, b, d, i, j);
                const T *Bc = &AT4(B, a->sB, b, gB, i, j), *Cc = &AT4(C, a->sC, b, gC, i, j);
                T *restrict hc = hrow + q * N, acc = 0;
#pragma omp simd reduction(+ : acc)
                for (int64_t n = 0; n < N; n++) {
                    const T an = STATE_EXP(s * Ad[n]), gn = an * g[n] + x * Bc[n], hn = an * hc[n] + gn;
                    g[n] = gn;
                    hc[n] = hn;
                    acc += Cc[n] * hn;
                }
                AT4(y, a->sy, b, d, i, j) = acc;
            }
        }
    }
}

void SFX(scan2d_fwd)(const scan2d_args *a) {
    const int64_t nblk = a->dim / a->cb, items = a->batch * nblk;
#pragma omp parallel num_threads(a->threads)
    {
        T *hrow = malloc(a->W * a->N * sizeof(T));
#pragma omp for schedule(static)
        for (int64_t w = 0; w < items; w++) {
            if (a->N == 16)
                SFX(fwd2d_item)(a, w / nblk, w % nblk, hrow, 16);
            else
                SFX(fwd2d_item)(a, w / nblk, w % nblk, hrow, a->N);
        }
        free(hrow);
    }
}

/* Scratch of one backward item: λ carry row, the band's h rows (K + 1), g and Ā rows (K each), a zero row. */
static int64_t SFX(bwd2d_scratch)(const scan2d_args *a) { return a->W * a->N * (3 * a->K + 2) + a->N; }

INLINE void SFX(bwd2d_item)(const scan2d_args *a, int64_t b, int64_t blk, T *work, const int64_t N) {
    const T *u = a->u, *dt = a->dt, *A = a->A, *B = a->B, *C = a->C, *dy = a->dy, *ckpt = a->ckpt;
    T *du = a->du, *ddt = a->ddt;
    const int64_t H = a->H, W = a->W, K = a->K, nk = (H + K - 1) / K, d0 = blk * a->cb, WN = W * N;
    const int64_t gB = d0 / a->dpg_B, gC = d0 / a->dpg_C, nblk = a->dim / a->cb;
    T *dBp = (T *)a->dB + (b * nblk + blk) * H * WN, *dCp = (T *)a->dC + (b * nblk + blk) * H * WN;
    T *lam = work, *hs = lam + WN, *gs = hs + (K + 1) * WN, *as = gs + K * WN, *zero = as + K * WN;
    memset(zero, 0, N * sizeof(T));
    memset(dBp, 0, H * WN * sizeof(T));
    memset(dCp, 0, H * WN * sizeof(T));
    for (int64_t c = 0; c < a->cb; c++) {
        const int64_t d = d0 + c;
        const T *Ad = A + d * N;
        T dAc[N];
        for (int64_t n = 0; n < N; n++) dAc[n] = 0;
        memset(lam, 0, WN * sizeof(T));
        for (int64_t k = nk - 1; k >= 0; k--) {
            const int64_t r0 = k * K, m = (r0 + K < H ? r0 + K : H) - r0;
            memcpy(hs, ckpt + ((b * a->dim + d) * nk + k) * WN, WN * sizeof(T));
            for (int64_t rr = 0; rr < m; rr++) { /* recompute the band */
                const int64_t i = SFX(row_of)(a, r0 + rr);
                T g[N];
                for (int64_t n = 0; n < N; n++) g[n] = 0;
                for (int64_t q = 0; q < W; q++) {
                    const int64_t j = SFX(col_of)(a, q);
                    const T s = AT4(dt, a->sdt, b, d, i, j), x = s * AT4(u, a->su, b, d, i, j);
                    const T *Bc = &AT4(B, a->sB, b, gB, i, j), *hp = hs + rr * WN + q * N;
                    T *restrict hn = hs + (rr + 1) * WN + q * N, *restrict gc = gs + rr * WN + q * N;
                    T *restrict ac = as + rr * WN + q * N;
#pragma omp simd
                    for (int64_t n = 0; n < N; n++) {
                        const T an = STATE_EXP(s * Ad[n]), gn = an * g[n] + x * Bc[n];
                        g[n] = gn;
                        gc[n] = gn;
                        ac[n] = an;
                        hn[n] = an * hp[n] + gn;
                    }
                }
            }
            for (int64_t rr = m - 1; rr >= 0; rr--) { /* adjoints, bottom-up and right to left in scan order */
                const int64_t i = SFX(row_of)(a, r0 + rr);
                T lgc[N]; /* Ā[i, j+1] λg[i, j+1] */
                for (int64_t n = 0; n < N; n++) lgc[n] = 0;
                for (int64_t q = W - 1; q >= 0; q--) {
                    const int64_t j = SFX(col_of)(a, q);
                    const T s = AT4(dt, a->sdt, b, d, i, j), uu = AT4(u, a->su, b, d, i, j), g0 = AT4(dy, a->sdy, b, d, i, j);
                    const T *Bc = &AT4(B, a->sB, b, gB, i, j), *Cc = &AT4(C, a->sC, b, gC, i, j);
                    const T *hn = hs + (rr + 1) * WN + q * N, *hp = hs + rr * WN + q * N, *ac = as + rr * WN + q * N;
                    const T *gp = q > 0 ? gs + rr * WN + (q - 1) * N : zero; /* g[i, j-1] */
                    T *restrict lc = lam + q * N, *restrict dBc = dBp + (i * W + j) * N, *restrict dCc = dCp + (i * W + j) * N;
                    T sAq = 0, sGB = 0;
#pragma omp simd reduction(+ : sAq, sGB)
                    for (int64_t n = 0; n < N; n++) {
                        const T lh = Cc[n] * g0 + lc[n], lg = lh + lgc[n];
                        const T q_ = (lh * hp[n] + lg * gp[n]) * ac[n]; /* dL/d(s A_n) */
                        sAq += q_ * Ad[n];
                        sGB += lg * Bc[n];
                        dAc[n] += q_ * s;
                        dBc[n] += lg * s * uu;
                        dCc[n] += g0 * hn[n];
                        lgc[n] = ac[n] * lg;
                        lc[n] = ac[n] * lh;
                    }
                    AT4(ddt, a->sddt, b, d, i, j) = sAq + uu * sGB;
                    AT4(du, a->sdu, b, d, i, j) = s * sGB;
                }
            }
        }
        memcpy((T *)a->dA + (b * a->dim + d) * N, dAc, N * sizeof(T));
    }
}

void SFX(scan2d_bwd)(const scan2d_args *a) {
    const int64_t nblk = a->dim / a->cb, items = a->batch * nblk;
#pragma omp parallel num_threads(a->threads)
    {
        T *work = malloc(SFX(bwd2d_scratch)(a) * sizeof(T));
#pragma omp for schedule(static)
        for (int64_t w = 0; w < items; w++) {
            if (a->N == 16)
                SFX(bwd2d_item)(a, w / nblk, w % nblk, work, 16);
            else
                SFX(bwd2d_item)(a, w / nblk, w % nblk, work, a->N);
        }
        free(work);
    }
}

#undef AT4
