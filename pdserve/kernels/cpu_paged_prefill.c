// Prefill attention on the CPU: one sequence's new tokens attend causally over its keys in
// the paged cache (the earlier chunks' and this step's, already written there).
//
// PyTorch's CPU flash kernel ran a 1,024-token SmolLM2 prompt at ~55 GFLOP/s, half a core's
// float32 peak (22 ms a layer), and a chunk after the first needed its keys gathered out of
// the cache and a mask built. Here a task is one query head and a tile of TILE queries; its
// queries are held transposed ([head_dim][TILE], scaled), so that every operation is a vector
// across the tile's queries: scores for KEYS keys at once are KEYS x 4 vector accumulators
// (one broadcast key element times four query vectors), the softmax's max, exp and sums are
// lane-wise, and the output, also held transposed, takes V elements broadcast against the
// probabilities. Nothing is transposed but the queries in and the output out, and K and V
// are read where they lie, a cache block at a time, with an online softmax across blocks.
//
// Layouts (float32, contiguous):
//   q, out     [q_len, q_heads, head_dim]: the sequence's new tokens, at positions
//              context .. context + q_len - 1
//   k_cache    [num_blocks, block_size, kv_heads, head_dim]; v_cache the same
//   table      int32: the sequence's block ids
// q_heads = kv_heads * group. Built with cpu_paged_decode.c by pdserve/kernels/cpu_native.py.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vec.h"

#if LANES == 16
#define KEYS 8 // 32 accumulators in 32 registers (4 or 6 keys: 10% slower at 1,024 tokens)
#else
#define KEYS 2 // 8 accumulators of 16 registers
#endif
#define TILE (4 * LANES) // queries of one task: four vectors
#define DIMS KEYS        // output elements of head_dim updated at once
// a running max before any key, and a hidden key's score: finite, since -ffast-math assumes
// no infinities
#define HIDDEN (-1e30f)

// scores[i][lane] = q_t[:, lane] . k[i] for the block's n keys (row stride row).
static inline void score_block(const float *restrict q_t, const float *restrict k, int64_t row,
                               int64_t n, int64_t dim, float *restrict scores) {
    const vec *qv = (const vec *)q_t;
    vec *sv = (vec *)scores;
    int64_t i = 0;
    for (; i + KEYS <= n; i += KEYS) {
        vec acc[KEYS][4] = {{{0}}};
        for (int64_t d = 0; d < dim; d++) {
            const vec *q4 = qv + 4 * d;
            for (int kk = 0; kk < KEYS; kk++) {
                const vec key = splat(k[(i + kk) * row + d]);
                for (int c = 0; c < 4; c++) acc[kk][c] += key * q4[c];
            }
        }
        for (int kk = 0; kk < KEYS; kk++)
            for (int c = 0; c < 4; c++) sv[4 * (i + kk) + c] = acc[kk][c];
    }
    for (; i < n; i++) {  // the block's last keys
        vec acc[4] = {0};
        for (int64_t d = 0; d < dim; d++) {
            const vec key = splat(k[i * row + d]);
            for (int c = 0; c < 4; c++) acc[c] += key * qv[4 * d + c];
        }
        for (int c = 0; c < 4; c++) sv[4 * i + c] = acc[c];
    }
}

// out_t[d][lane] = out_t[d][lane] * shrink[lane] + sum_i weights[i][lane] * v[i][d].
static inline void accumulate_block(float *restrict out_t, const float *restrict weights,
                                    const float *restrict shrink, const float *restrict v,
                                    int64_t row, int64_t n, int64_t dim) {
    vec *ov = (vec *)out_t;
    const vec *wv = (const vec *)weights, *sh = (const vec *)shrink;
    for (int64_t d = 0; d < dim; d += DIMS) {
        vec acc[DIMS][4];
        for (int dd = 0; dd < DIMS; dd++)
            for (int c = 0; c < 4; c++) acc[dd][c] = ov[4 * (d + dd) + c] * sh[c];
        for (int64_t i = 0; i < n; i++) {
            const vec *w4 = wv + 4 * i;
            for (int dd = 0; dd < DIMS; dd++) {
                const vec value = splat(v[i * row + d + dd]);
                for (int c = 0; c < 4; c++) acc[dd][c] += value * w4[c];
            }
        }
        for (int dd = 0; dd < DIMS; dd++)
            for (int c = 0; c < 4; c++) ov[4 * (d + dd) + c] = acc[dd][c];
    }
}

// One task: query head h, queries first .. first + n - 1 (n <= TILE) of the chunk.
// scratch: (2 * dim + block_size) * TILE floats, 64-byte aligned.
static inline void attend_tile(const float *restrict q, float *restrict out, int64_t first,
                               int64_t n, int64_t context, int64_t h,
                               const float *restrict k_cache, const float *restrict v_cache,
                               const int32_t *restrict table, int64_t block_size,
                               int64_t kv_heads, int64_t group, int64_t dim, float scale,
                               float *restrict scratch) {
    const int64_t q_heads = kv_heads * group, row = kv_heads * dim;
    float *restrict q_t = scratch;                  // [dim][TILE]
    float *restrict out_t = q_t + dim * TILE;       // [dim][TILE]
    float *restrict scores = out_t + dim * TILE;    // [block_size][TILE]
    // per query, four vectors of LANES: running max score, running sum of weights, what
    // this block's new max scales the earlier ones by, and the query's position
    vec top[4], total[4], shrink[4], pos[4];
    const int64_t first_pos = context + first, last_pos = first_pos + n - 1;
    for (int c = 0; c < 4; c++) {
        top[c] = splat(HIDDEN);
        total[c] = splat(0.0f);
        for (int j = 0; j < LANES; j++) pos[c][j] = (float)(first_pos + c * LANES + j);
    }
    for (int64_t d = 0; d < dim; d++)
        for (int64_t j = 0; j < TILE; j++)
            q_t[d * TILE + j] = j < n ? q[((first + j) * q_heads + h) * dim + d] * scale : 0.0f;
    memset(out_t, 0, sizeof(float) * (size_t)(dim * TILE));
    const int64_t head_at = (h / group) * dim;
    vec *sv = (vec *)scores;
    for (int64_t start = 0; start <= last_pos; start += block_size) {
        const int64_t keys = last_pos + 1 - start < block_size ? last_pos + 1 - start
                                                                : block_size;
        const int64_t at = (int64_t)table[start / block_size] * block_size * row + head_at;
        score_block(q_t, k_cache + at, row, keys, dim, scores);
        const int diagonal = start + keys - 1 > first_pos;  // keys past some queries
        if (diagonal)  // hidden from the max here, and weighted 0 below
            for (int64_t i = 0; i < keys; i++)
                for (int c = 0; c < 4; c++)
                    sv[4 * i + c] = pick(splat((float)(start + i)) > pos[c], splat(HIDDEN),
                                           sv[4 * i + c]);
        for (int c = 0; c < 4; c++) shrink[c] = top[c];
        for (int64_t i = 0; i < keys; i++)
            for (int c = 0; c < 4; c++) top[c] = vmax(top[c], sv[4 * i + c]);
        for (int c = 0; c < 4; c++) {
            shrink[c] = vexp(vmax(shrink[c] - top[c], splat(FLOOR)));
            total[c] *= shrink[c];
        }
        for (int64_t i = 0; i < keys; i++)
            for (int c = 0; c < 4; c++) {
                vec w = vexp(vmax(sv[4 * i + c] - top[c], splat(FLOOR)));
                if (diagonal)
                    w = pick(splat((float)(start + i)) > pos[c], splat(0.0f), w);
                sv[4 * i + c] = w;
                total[c] += w;
            }
        accumulate_block(out_t, scores, (const float *)shrink, v_cache + at, row, keys, dim);
    }
    for (int64_t j = 0; j < n; j++)
        for (int64_t d = 0; d < dim; d++)
            out[((first + j) * q_heads + h) * dim + d] = out_t[d * TILE + j] / total[j / LANES][j % LANES];
}

// Returns 0; -1 if scratch memory could not be had (out is then incomplete); -2 if head_dim
// is not a multiple of DIMS.
int paged_prefill_f32(const float *q, float *out, int64_t q_len, int64_t context,
                      const float *k_cache, const float *v_cache, const int32_t *table,
                      int64_t block_size, int64_t kv_heads, int64_t group, int64_t dim,
                      float scale, int num_threads) {
    if (dim % DIMS != 0) return -2;
    const int64_t q_heads = kv_heads * group, tiles = (q_len + TILE - 1) / TILE;
    const size_t bytes = sizeof(float) * (size_t)((2 * dim + block_size) * TILE);
    int failed = 0;
    // the last tiles see the most keys: handed out first, so no thread is left with one
#pragma omp parallel for schedule(dynamic) num_threads(num_threads) reduction(| : failed)
    for (int64_t task = 0; task < tiles * q_heads; task++) {
        const int64_t tile = tiles - 1 - task / q_heads, h = task % q_heads;
        float *scratch = aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (scratch == NULL) {
            failed = 1;
            continue;
        }
        const int64_t first = tile * TILE;
        const int64_t n = q_len - first < TILE ? q_len - first : TILE;
        if (dim == 64)  // the usual head size: constant loop bounds unroll
            attend_tile(q, out, first, n, context, h, k_cache, v_cache, table, block_size,
                        kv_heads, group, 64, scale, scratch);
        else
            attend_tile(q, out, first, n, context, h, k_cache, v_cache, table, block_size,
                        kv_heads, group, dim, scale, scratch);
        free(scratch);
    }
    return failed ? -1 : 0;
}
