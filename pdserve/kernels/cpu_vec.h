// Vectors for the CPU kernels (GCC's vector extensions: one zmm register with AVX-512, one ymm
// with AVX2, so the same source builds for either), and an inline exp over them.

#ifndef PDSERVE_CPU_VEC_H
#define PDSERVE_CPU_VEC_H

#include <stdint.h>

#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
// exp's smallest argument: exp(-80) ~ 2e-35, nothing next to the weights it is summed with
#define FLOOR (-80.0f)

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(LANES * sizeof(int32_t))));

static inline vec splat(float x) { return (vec){0} + x; }

static inline vec pick(ivec take_a, vec a, vec b) {
    return (vec)(((ivec)a & take_a) | ((ivec)b & ~take_a));
}

static inline vec vmax(vec a, vec b) { return pick(a > b, a, b); }

static inline vec vload(const float *p) {  // unaligned
    vec v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vec v) { __builtin_memcpy(p, &v, sizeof v); }

// exp(x) for FLOOR <= x <= 0, inline: 2^n * exp(r), |r| <= ln2/2, exp(r) by Cephes' expf
// polynomial (relative error ~1e-7). libmvec's expf, called per vector, took a quarter of
// the prefill kernel's time.
static inline vec vexp(vec x) {
    const vec y = x * 1.44269504088896341f;  // x / ln 2
    const ivec n = __builtin_convertvector(y - 0.5f, ivec);  // round(y): y <= 0, trunc(y - .5)
    const vec nf = __builtin_convertvector(n, vec);
    const vec r = x - nf * 0.693359375f - nf * -2.12194440e-4f;  // ln 2 in two parts
    vec p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (vec)((n + 127) << 23);  // 2^n, n >= -116: a normal float
}

#endif
