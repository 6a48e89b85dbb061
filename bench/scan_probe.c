/* The hardware probe of bench/scan.py: the selective-scan forward written as plainly as C allows, the
   speed a fused CPU kernel can hope for. Per (batch, channel): the N states in registers, B and C read
   as contiguous (L, N) rows, exp vectorised by the compiler; channels in parallel (OpenMP).
   y_t = C_t . h_t + D u_t,  h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t  (N = 16, fp32). */
#include <math.h>
#include <stdint.h>

#define N 16

void probe_scan(const float *u, const float *dt, const float *A, const float *B, const float *C,
                const float *D, float *y, int64_t batch, int64_t dim, int64_t L, int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t w = 0; w < batch * dim; w++) {
        const int64_t b = w / dim, d = w % dim;
        const float *uw = u + w * L, *dtw = dt + w * L, *Ad = A + d * N, *Bb = B + b * L * N, *Cb = C + b * L * N;
        float h[N] = {0};
        for (int64_t t = 0; t < L; t++) {
            const float s = dtw[t], su = s * uw[t];
            float acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int n = 0; n < N; n++) {
                h[n] = expf(s * Ad[n]) * h[n] + su * Bb[t * N + n];
                acc += h[n] * Cb[t * N + n];
            }
            y[w * L + t] = acc + D[d] * uw[t];
        }
    }
}
