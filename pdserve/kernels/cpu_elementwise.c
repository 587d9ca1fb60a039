// The CPU's elementwise steps of a decoder layer, each in one pass over its rows: the
// residual add with RMSNorm, and SwiGLU's silu(gate) * up. In PyTorch they are six and two
// ops, each reading and writing the whole activation (a 1,024-token prefill's silu and muls
// took ~200 ms of its 2.9 s, and a decode step pays every op's dispatch 30 times).
//
// Layouts (float32, contiguous): rows of `width` elements. Built with the attention kernels
// by pdserve/kernels/cpu_native.py.

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "cpu_vec.h"

#define PARALLEL_ROWS 64 // fewer rows: not worth waking threads for

// sum = x + residual (or x where residual is NULL; sum may alias x), then
// out = sum / sqrt(mean(sum^2) + eps) * weight, as Hugging Face's LlamaRMSNorm in float32.
void add_rms_norm_f32(const float *x, const float *residual, float *sum, float *out,
                      const float *weight, int64_t rows, int64_t width, float eps,
                      int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * width;
        float *sr = sum + r * width, *outr = out + r * width;
        if (residual != NULL) {
            const float *rr = residual + r * width;
#pragma omp simd
            for (int64_t i = 0; i < width; i++) sr[i] = xr[i] + rr[i];
        } else if (sr != xr) {
            for (int64_t i = 0; i < width; i++) sr[i] = xr[i];
        }
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < width; i++) squares += sr[i] * sr[i];
        const float inv = 1.0f / sqrtf(squares / (float)width + eps);
#pragma omp simd
        for (int64_t i = 0; i < width; i++) outr[i] = weight[i] * (sr[i] * inv);
    }
}

// out[r][i] = silu(gate_up[r][i]) * gate_up[r][width + i]: gate and up packed in one row.
void silu_and_mul_f32(const float *gate_up, float *out, int64_t rows, int64_t width,
                      int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows >= PARALLEL_ROWS)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + 2 * r * width, *up = gate + width;
        float *o = out + r * width;
        int64_t i = 0;
        for (; i + LANES <= width; i += LANES) {
            const vec g = vload(gate + i);
            // sigmoid from exp(-|g|) <= 1, which never overflows: e / (1 + e) below 0
            const ivec negative = g < 0.0f;
            const vec e = vexp(vmax(pick(negative, g, -g), splat(FLOOR)));
            const vec sigmoid = pick(negative, e, splat(1.0f)) / (1.0f + e);
            vstore(o + i, g * sigmoid * vload(up + i));
        }
        for (; i < width; i++) o[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}
