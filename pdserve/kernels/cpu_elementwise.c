// The CPU's elementwise steps of a decoder layer, each in one pass over its rows: the
// residual add with RMSNorm, SwiGLU's silu(gate) * up, RoPE on q and k, and the store of k
// and v into the paged cache. In PyTorch they are six, two, fourteen and four ops, each
// reading and writing the whole activation (a 1,024-token prefill's silu and muls took
// ~200 ms of its 2.9 s, RoPE and the store ~170 ms, and a decode step pays every op's
// dispatch 30 times).
//
// Layouts (float32): rows of `width` elements, contiguous, or for q, k and v (views of one
// qkv projection) rows `stride` floats apart. Built with the attention kernels by
// pdserve/kernels/cpu_native.py.

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

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

// One row of heads rotated in place, rotate-half style: x1' = x1 cos - x2 sin, x2' = x2 cos
// + x1 sin. Each product rounded on its own (no fused multiply-add), as PyTorch's
// `q * cos + rotate_half(q) * sin` rounds them: the same bits as the PyTorch path.
__attribute__((optimize("fp-contract=off"))) static void rotate_heads(
    float *restrict x, int64_t heads, int64_t dim, const float *restrict cos,
    const float *restrict sin) {
    const int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; h++, x += dim)
#pragma omp simd
        for (int64_t i = 0; i < half; i++) {
            const float a = x[i], b = x[i + half];
            x[i] = a * cos[i] - b * sin[i];
            x[i + half] = b * cos[i] + a * sin[i];
        }
}

// q [tokens][q_heads][dim] and k [tokens][k_heads][dim] (token rows q_stride and k_stride
// floats apart) rotated in place by their positions' rows of table [table_rows][dim]
// (cos | sin of position * inv_freq, dim / 2 each). Returns 0; -1, rotating nothing, if a
// position is outside the table.
int rope_f32(float *q, int64_t q_stride, int64_t q_heads, float *k, int64_t k_stride,
             int64_t k_heads, int64_t dim, const int64_t *positions, int64_t tokens,
             const float *table, int64_t table_rows, int num_threads) {
    for (int64_t t = 0; t < tokens; t++)
        if (positions[t] < 0 || positions[t] >= table_rows) return -1;
#pragma omp parallel for num_threads(num_threads) if (tokens >= PARALLEL_ROWS)
    for (int64_t t = 0; t < tokens; t++) {
        const float *cos = table + positions[t] * dim, *sin = cos + dim / 2;
        rotate_heads(q + t * q_stride, q_heads, dim, cos, sin);
        rotate_heads(k + t * k_stride, k_heads, dim, cos, sin);
    }
    return 0;
}

// Each token's k and v rows (width floats; token rows k_stride and v_stride floats apart)
// copied to its slot of k_cache and v_cache ([num_slots][width]); slot -1 is padding, skipped.
// Returns 0; -1, storing nothing, if a slot is outside the cache.
int store_kv_f32(const float *k, int64_t k_stride, const float *v, int64_t v_stride,
                 const int64_t *slots, int64_t tokens, int64_t width, float *k_cache,
                 float *v_cache, int64_t num_slots) {
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] < -1 || slots[t] >= num_slots) return -1;
    for (int64_t t = 0; t < tokens; t++) {
        if (slots[t] < 0) continue;
        memcpy(k_cache + slots[t] * width, k + t * k_stride, sizeof(float) * (size_t)width);
        memcpy(v_cache + slots[t] * width, v + t * v_stride, sizeof(float) * (size_t)width);
    }
    return 0;
}
