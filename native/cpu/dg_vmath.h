/* dg_vmath.h — float vectors of VL lanes (GCC / clang vector extensions) and the math on them: exp, tanh, the
 * gated GELU and (AVX2) an 8 x 8 transpose, shared by the float kernels (dg_kernels.c) and the int8 ones
 * (dg_int8.c), so both compute the same function. The includer defines VL (lanes per vector) first.
 */
#ifndef DG_VMATH_H
#define DG_VMATH_H
#include <stdint.h>

typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));

static inline vf ld(const float *p) { return *(const vfu *)p; }
static inline void st(float *p, vf x) { *(vfu *)p = x; }
static inline vf splat(float x) { return x - (vf){0}; } /* broadcast (x - 0 is x, even for -0) */
static inline vf sel(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
static inline vf vmax(vf a, vf b) { return sel(a > b, a, b); }
static inline vf vmin(vf a, vf b) { return sel(a < b, a, b); }
static inline float hmax(vf x) { float m = x[0]; for (int i = 1; i < VL; i++) m = x[i] > m ? x[i] : m; return m; }

/* ---------------------------------------------------------------------------------------------------------------
 * Math: exp and tanh on vectors (Cephes' single-precision algorithms, within 2 ulp of the correctly rounded
 * value; numpy's own float32 exp/tanh are within 1-3 ulp, so both sit at float32 rounding level).
 * ------------------------------------------------------------------------------------------------------------- */

/* exp(x); 0 below -87.33 (where float32 goes subnormal) and for -inf. */
static inline vf vexp(vf x) {
    vi under = x < splat(-87.33654475f);
    x = sel(x > splat(88.3762626647949f), splat(88.3762626647949f), x);
    x = sel(under, splat(0.0f), x);
    vf t = x * 1.44269504088896341f + 0.5f; /* n = floor(x / ln 2 + 1/2) */
    vf n = __builtin_convertvector(__builtin_convertvector(t, vi), vf);
    n = n - (vf)((vi)splat(1.0f) & (n > t));
    vf r = x - n * 0.693359375f - n * -2.12194440e-4f; /* x - n ln 2 in two pieces */
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return sel(under, splat(0.0f), p * (vf)e);
}

/* tanh(x): odd polynomial below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above (no cancellation either side). */
static inline vf vtanh(vf x) {
    vi neg = x < splat(0.0f);
    vf ax = sel(neg, -x, x);
    vf z = x * x;
    vf small = splat(-5.70498872745e-3f);
    small = small * z + 2.06390887954e-2f;
    small = small * z - 5.37397155531e-2f;
    small = small * z + 1.33314422036e-1f;
    small = small * z - 3.33332819422e-1f;
    small = small * z * x + x;
    vf big = 1.0f - 2.0f / (vexp(sel(ax > splat(44.0f), splat(88.0f), ax + ax)) + 1.0f);
    big = sel(neg, -big, big);
    return sel(ax < splat(0.625f), small, big);
}

/* gelu_tanh(g) * u with numpy_backend.gelu_tanh's operation order. */
static inline vf vgelu_mul(vf g, vf u) {
    vf inner = 0.7978845608028654f * (g + 0.044715f * (g * g * g));
    return 0.5f * g * (1.0f + vtanh(inner)) * u;
}

#if VL == 8 && defined(__AVX2__)
#include <immintrin.h>
/* An 8 x 8 transpose in registers: x[i] holds row i on entry and column i on return. */
static inline void transpose8(__m256 x[8]) {
    __m256 y[8];
    for (int i = 0; i < 8; i += 2)
        y[i] = _mm256_unpacklo_ps(x[i], x[i + 1]), y[i + 1] = _mm256_unpackhi_ps(x[i], x[i + 1]);
    for (int i = 0; i < 8; i += 4) {
        x[i] = _mm256_shuffle_ps(y[i], y[i + 2], 0x44), x[i + 1] = _mm256_shuffle_ps(y[i], y[i + 2], 0xEE);
        x[i + 2] = _mm256_shuffle_ps(y[i + 1], y[i + 3], 0x44), x[i + 3] = _mm256_shuffle_ps(y[i + 1], y[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) { /* the 128-bit halves: rows 0-3 and 4-7 of each column */
        y[i] = _mm256_permute2f128_ps(x[i], x[i + 4], 0x20), y[i + 4] = _mm256_permute2f128_ps(x[i], x[i + 4], 0x31);
    }
    for (int i = 0; i < 8; i++) x[i] = y[i];
}
#endif

#endif
