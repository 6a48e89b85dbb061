/* Fused CPU kernels for ssmkit.core.scan and ssmkit.core.scan2d: the 1-D selective scan (forward,
backward), its decode step, and one direction of the 2-D selective scan (forward, backward).

Compiled at first use by ssmkit/kernels/cpu.py with the system C compiler (-O3 -march=native
-ffast-math -fopenmp) and called through ctypes. scan_impl.h (1-D) and scan2d_impl.h (2-D) hold the
code; they are included once for float and once for double. The 1-D math is that of ssmkit/core/scan.py:

    dt = softplus(delta + bias) (or delta + bias);  a_t = exp(dt_t A) * keep_t
    h_t = a_t h_{t-1} + dt_t u_t B_t;   y_t = (C_t . h_t + D u_t) * silu(z_t)

Work is split into items of (batch row, block of cb channels); a block never straddles a group of B
or C, so the channels of an item share their B and C rows. One item walks the length once with its
cb x N states in L1, the loop over the N states vectorised (exp through the compiler's vector math
library). Items are independent and write disjoint outputs; the dB and dC rows of an item are summed
over its channels and reduced over the items of a group afterwards in a fixed order, so results do
not depend on the number of threads or on scheduling.
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

typedef struct {
    int64_t batch, dim, L, N;
    int64_t cb;               /* channels per item; divides the channels of every time-varying group */
    int64_t K;                /* positions between saved states (backward recomputes from them) */
    int64_t dpg_B, dpg_C;     /* channels per group of B and of C */
    int64_t B_var, C_var;     /* 1: rows per (batch, group, time); 0: time-invariant (dim, N) */
    int64_t softplus, reverse, threads;
    /* strides in elements, (batch, channel, time) */
    int64_t su[3], sd[3], sz[3], sy[3], sdy[3], sdu[3], sdd[3], sdz[3];
    /* B and C rows: (batch, group, time) strides, n contiguous; time-invariant: (0, row, 0) */
    int64_t sB[3], sC[3];
    const void *u, *delta, *A, *B, *C, *D, *z, *bias, *h0, *dy, *dlast;
    const int64_t *seq;       /* packed-sequence ids (batch, L), contiguous, or NULL */
    void *y, *last, *ckpt;    /* ckpt: (batch, dim, ceil(L/K), N) states entering each K-block, or NULL */
    void *du, *ddelta, *dz;
    void *dA, *dD, *dbias;    /* per batch row: (batch, dim, N), (batch, dim), (batch, dim) */
    void *dB, *dC;            /* time-varying: (batch, dim/cb, L, N) per item; invariant: (batch, dim, N) */
    void *dh0;                /* (batch, dim, N) or NULL */
} ssm_args;

typedef struct {
    int64_t batch, dim, H, W, N;
    int64_t cb, K, dpg_B, dpg_C;  /* channels per item (within one B and C group); rows between saved state rows */
    int64_t rtl, bu, threads;     /* columns right to left; rows bottom up */
    /* strides in elements: (batch, channel, row, column); B and C (batch, group, row, column), n contiguous */
    int64_t su[4], sdt[4], sy[4], sdy[4], sdu[4], sddt[4], sB[4], sC[4];
    const void *u, *dt, *A, *B, *C, *dy;
    void *y, *ckpt;               /* ckpt: (batch, dim, ceil(H/K), W, N), by scan row and column */
    void *du, *ddt, *dA, *dB, *dC; /* dA: (batch, dim, N); dB, dC: (batch, dim/cb, H, W, N) per item */
} scan2d_args;

typedef struct {
    int64_t batch, dim, N, dpg_B, dpg_C, softplus, threads;
    int64_t sh[2], sx[2], sdt[2], sz[2], sB[2], sC[2];  /* state (b, d), n contiguous; x, dt, z (b, d); B, C (b, g) */
    void *state;
    const void *x, *dt, *A, *B, *C, *D, *z, *bias;
    void *y;                  /* (batch, dim) contiguous */
} step_args;

/* Sum of `parts` consecutive (len)-blocks into out, in block order; parallel over (row, segment). */
#define DEFINE_REDUCE(T, NAME)                                                                       \
    void NAME(const T *parts, T *out, int64_t rows, int64_t nparts, int64_t len, int64_t threads) {  \
        const int64_t seg = 4096, nseg = (len + seg - 1) / seg;                                      \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                            \
        for (int64_t w = 0; w < rows * nseg; w++) {                                                  \
            const int64_t r = w / nseg, i0 = (w % nseg) * seg, i1 = i0 + seg < len ? i0 + seg : len; \
            T *o = out + r * len;                                                                    \
            const T *p = parts + r * nparts * len;                                                   \
            for (int64_t i = i0; i < i1; i++) o[i] = p[i];                                           \
            for (int64_t j = 1; j < nparts; j++)                                                     \
                for (int64_t i = i0; i < i1; i++) o[i] += p[j * len + i];                            \
        }                                                                                            \
    }
DEFINE_REDUCE(float, ssm_reduce_f32)
DEFINE_REDUCE(double, ssm_reduce_f64)

/* exp for the loops over the states, inlined so that they keep their vectors in registers (a call to the
   vector math library spills them): 2^n exp(r) with n = round(x / ln 2), r = x - n ln 2 in two parts
   (Cody-Waite, exact with FMA), exp(r) by Cephes' degree-6 polynomial; relative error < 2e-7 on
   [-87, 88], clamped outside (0 below, exp(88) above) */
static inline __attribute__((always_inline)) float state_expf(float x) {
    x = fminf(fmaxf(x, -87.0f), 88.0f);
    const float n = floorf(fmaf(x, 1.44269504088896341f, 0.5f));
    float r = fmaf(-n, 0.693359375f, x);
    r = fmaf(-n, -2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r + 1.0f);
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#define T float
#define SFX(name) name##_f32
#define EXP expf
#define STATE_EXP state_expf
#define LOG1P log1pf
#include "scan_impl.h"
#include "scan2d_impl.h"
#undef T
#undef SFX
#undef EXP
#undef STATE_EXP
#undef LOG1P

#define T double
#define SFX(name) name##_f64
#define EXP exp
#define STATE_EXP exp
#define LOG1P log1p
#include "scan_impl.h"
#include "scan2d_impl.h"
#undef T
#undef SFX
#undef EXP
#undef STATE_EXP
#undef LOG1P
