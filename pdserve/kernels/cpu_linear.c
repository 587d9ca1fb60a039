// A decode step's linears on the CPU: out = x W^T (+ bias) for a few rows of x (1-64), on a
// copy of W packed in panels of 32 columns (models/cpu_layout.py): panel p holds W^T[k][32p ..
// 32p + 31] for k = 0..K-1, contiguous, so a tile reads its weights as one sequential stream.
//
// Why: at a few rows a linear is a stream over its weight, read once whatever the row count.
// oneDNN's kernels for 8 and 16 rows took 1.7x and 2.4x the time the embedded model's weights
// take to read (AVX-512 EPYC, one thread, 2026-12-07); MKL on the K-major weight 3.3x. Here a
// tile keeps every row's sums in registers over the whole K: each weight element is loaded
// once and used by all the rows of its group.
//
// Tile: up to GROUP rows x NV vectors of columns. For each k, NV vectors of the panel's row k
// are loaded and each row's x[k] broadcast against them: rows * NV accumulators, NV weight
// vectors and a broadcast within the register file (32 vector registers with AVX-512, 16
// with AVX2). More rows than GROUP go in groups over the same columns: the panel (K x 128
// bytes) is then read again from L2, not memory.

#include <omp.h>
#include <stddef.h>
#include <stdint.h>

#include "cpu_vec.h"

#define PANEL 32      // columns per panel: the packing's layout (cpu_native.PANEL_COLUMNS)
#define MAX_ROWS 64   // more rows: oneDNN (layers.linear), faster at 256 rows (522 ms to 602)
#define NV 2          // vectors of columns per tile: PANEL / NV / LANES passes per panel
#if LANES == 16
#define GROUP 12      // 24 accumulators + 2 + 1 of 32 registers
#else
#define GROUP 5       // 10 accumulators + 2 + 1 of 16 registers
#endif

static inline __attribute__((always_inline)) void tile(
    const float *x, int64_t x_stride, const float *panels, const float *bias, float *out,
    int64_t out_stride, int64_t K, int64_t n0, const int rows) {
    vec acc[GROUP][NV];
    for (int v = 0; v < NV; v++) {
        const vec b = bias ? vload(bias + n0 + v * LANES) : splat(0.0f);
        for (int m = 0; m < rows; m++) acc[m][v] = b;
    }
    const float *w = panels + (n0 / PANEL) * K * PANEL + n0 % PANEL;
    for (int64_t k = 0; k < K; k++, w += PANEL) {
        vec wk[NV];
        for (int v = 0; v < NV; v++) wk[v] = vload(w + v * LANES);
        for (int m = 0; m < rows; m++) {
            const vec xk = splat(x[m * x_stride + k]);
            for (int v = 0; v < NV; v++) acc[m][v] += xk * wk[v];
        }
    }
    for (int m = 0; m < rows; m++)
        for (int v = 0; v < NV; v++) vstore(out + m * out_stride + n0 + v * LANES, acc[m][v]);
}

// One instance of the tile per row count, so its loops unroll and its sums stay in registers.
#define CASE(R)                                                                      \
    case R:                                                                          \
        tile(xg, x_stride, panels, bias, og, out_stride, K, n, R);                   \
        break;

// Columns [n_begin, n_end): each tile of NV vectors, for every group of rows in turn.
static void columns(const float *x, int64_t x_stride, const float *panels, const float *bias,
                    float *out, int64_t out_stride, int64_t rows, int64_t K, int64_t n_begin,
                    int64_t n_end) {
    const int64_t groups = (rows + GROUP - 1) / GROUP;
    for (int64_t n = n_begin; n < n_end; n += NV * LANES) {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t first = rows * g / groups, count = rows * (g + 1) / groups - first;
            const float *xg = x + first * x_stride;
            float *og = out + first * out_stride;
            switch (count) {
                CASE(1) CASE(2) CASE(3) CASE(4) CASE(5)
#if GROUP > 5
                CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
#endif
            }
        }
    }
}

// out[rows, N] (rows out_stride floats apart) = x[rows, K] (x_stride apart) W^T (+ bias[N]),
// `panels` W packed as above. Returns -1, computing nothing, unless 1 <= rows <= MAX_ROWS and
// N is a whole number of panels. Threads split the panels.
int linear_rows_f32(const float *x, int64_t x_stride, const float *panels, const float *bias,
                    float *out, int64_t out_stride, int64_t rows, int64_t K, int64_t N,
                    int num_threads) {
    if (rows < 1 || rows > MAX_ROWS || K < 1 || N < PANEL || N % PANEL != 0) return -1;
    const int64_t count = N / PANEL;
    if (num_threads <= 1 || count < 2 * num_threads) {
        columns(x, x_stride, panels, bias, out, out_stride, rows, K, 0, N);
        return 0;
    }
#pragma omp parallel num_threads(num_threads)
    {
        const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
        const int64_t begin = count * t / threads, end = count * (t + 1) / threads;
        columns(x, x_stride, panels, bias, out, out_stride, rows, K, begin * PANEL,
                end * PANEL);
    }
    return 0;
}
