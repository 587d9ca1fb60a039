// Decode attention on the CPU, reading K and V where they lie in the paged cache.
//
// One query token per sequence. PyTorch has no paged attention on the CPU, so its path
// first copies every sequence's blocks into a padded batch (index_select) and then runs
// SDPA over it: K and V cross memory three times, and each layer's weights have evicted
// them from the cache before they are read. Here each K and V row is read once, and the
// query heads that share a KV head (GQA) are served from that one read. A sequence is one
// task, read block by block: a block's rows are contiguous (16 tokens x all KV heads), so
// the reads stream, and the next block (anywhere in the cache) is prefetched meanwhile.
// Reading one KV head's slice of each row per task instead (a 256-byte stride) ran 2x
// slower than PyTorch's gather + SDPA in the engine, where the KV is cold.
//
// Layouts (float32, contiguous):
//   q, out         [rows, q_heads, head_dim]; sequence b's query is row q_rows[b]
//   k_cache        [num_blocks, block_size, kv_heads, head_dim]; v_cache the same
//   block_tables   int32 [num_seqs, table_width]; seq_lens int32 [num_seqs]
// q_heads = kv_heads * group. Built by pdserve/kernels/cpu_native.py: compiled with
// -ffast-math (vector expf from libmvec), linked without it, so that crtfastmath.o does not
// set flush-to-zero for the whole process.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define LINE 64

static inline void prefetch_block(const float *rows, int64_t floats) {
    const char *p = (const char *)rows;
    for (int64_t off = 0; off < floats * (int64_t)sizeof(float); off += LINE)
        __builtin_prefetch(p + off, 0, 3);
}

// one sequence: out[Hq][D] = softmax(q[Hq][D] . K^T * scale) V over its first len keys, in
// one pass over its blocks (online softmax: each block's weights rescale what came before),
// so that a block's K and V are read together while the next block is prefetched.
// scratch: q_heads * (block_size + 2) floats.
static inline void attend(const float *restrict q, float *restrict out,
                          const float *restrict k_cache, const float *restrict v_cache,
                          const int32_t *restrict table, int64_t len, int64_t block_size,
                          int64_t kv_heads, int64_t group, int64_t dim, float scale,
                          float *restrict scratch) {
    const int64_t q_heads = kv_heads * group, row = kv_heads * dim;
    const int64_t blocks = (len + block_size - 1) / block_size;
    float *restrict weights = scratch;  // [q_heads][block_size]
    float *restrict top = scratch + q_heads * block_size;  // running max score per head
    float *restrict total = top + q_heads;  // running sum of weights per head
    for (int64_t i = 0; i < q_heads * dim; i++) out[i] = 0.0f;
    for (int64_t blk = 0; blk < blocks; blk++) {
        if (blk + 1 < blocks) {
            const int64_t next = (int64_t)table[blk + 1] * block_size * row;
            prefetch_block(k_cache + next, block_size * row);
            prefetch_block(v_cache + next, block_size * row);
        }
        const int64_t at = (int64_t)table[blk] * block_size * row;
        const int64_t n = len - blk * block_size < block_size ? len - blk * block_size
                                                               : block_size;
        const float *restrict k = k_cache + at;
        for (int64_t o = 0; o < n; o++, k += row) {
            for (int64_t h = 0; h < q_heads; h++) {
                const float *restrict qh = q + h * dim, *restrict kh = k + (h / group) * dim;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < dim; d++) dot += qh[d] * kh[d];
                weights[h * block_size + o] = dot * scale;
            }
        }
        for (int64_t h = 0; h < q_heads; h++) {
            float *restrict w = weights + h * block_size;
            float peak = w[0];
            for (int64_t o = 1; o < n; o++) peak = w[o] > peak ? w[o] : peak;
            if (blk == 0) {
                top[h] = peak;
                total[h] = 0.0f;
            } else if (peak > top[h]) {  // what came before counts for less
                const float shrink = expf(top[h] - peak);
                total[h] *= shrink;
                for (int64_t d = 0; d < dim; d++) out[h * dim + d] *= shrink;
                top[h] = peak;
            }
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t o = 0; o < n; o++) {
                w[o] = expf(w[o] - top[h]);
                sum += w[o];
            }
            total[h] += sum;
        }
        const float *restrict v = v_cache + at;
        for (int64_t o = 0; o < n; o++, v += row) {
            for (int64_t h = 0; h < q_heads; h++) {
                const float wo = weights[h * block_size + o];
                const float *restrict vh = v + (h / group) * dim;
                float *restrict oh = out + h * dim;
#pragma omp simd
                for (int64_t d = 0; d < dim; d++) oh[d] += wo * vh[d];
            }
        }
    }
    for (int64_t h = 0; h < q_heads; h++)
        for (int64_t d = 0; d < dim; d++) out[h * dim + d] /= total[h];
}

// Returns 0, or -1 if scratch memory could not be had (out is then incomplete).
int paged_decode_f32(const float *q, float *out, const int64_t *q_rows,
                     const float *k_cache, const float *v_cache,
                     const int32_t *block_tables, int64_t table_width,
                     const int32_t *seq_lens, int64_t num_seqs, int64_t block_size,
                     int64_t kv_heads, int64_t group, int64_t dim, float scale,
                     int num_threads) {
    const int64_t q_heads = kv_heads * group;
    int failed = 0;
#pragma omp parallel for schedule(dynamic) num_threads(num_threads) reduction(| : failed)
    for (int64_t b = 0; b < num_seqs; b++) {
        const int64_t len = seq_lens[b];
        if (len <= 0) continue;
        float *scratch = malloc(sizeof(float) * (size_t)(q_heads * (block_size + 2)));
        if (scratch == NULL) {
            failed = 1;
            continue;
        }
        const int64_t at = q_rows[b] * q_heads * dim;
        // specialized where the model's shapes allow: constant loop bounds unroll
        if (dim == 64)
            attend(q + at, out + at, k_cache, v_cache, block_tables + b * table_width, len,
                   block_size, kv_heads, group, 64, scale, scratch);
        else
            attend(q + at, out + at, k_cache, v_cache, block_tables + b * table_width, len,
                   block_size, kv_heads, group, dim, scale, scratch);
        free(scratch);
    }
    return failed ? -1 : 0;
}
