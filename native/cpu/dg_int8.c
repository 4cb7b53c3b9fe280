/* dgrun CPU int8 kernels: matmuls of quantized weights in integer arithmetic, as ggml does.
 *
 * build.py compiles this file once per int8 kernel set (x86-64: avx512bf16, avx512vnni, avxvnni, avx2; arm64: i8mm,
 * dotprod; every machine: generic) and dg_cpu.c picks the best one the CPU runs. avx512bf16 and generic also take
 * BF16 weights, in bfloat16 products ("BF16 weights" below). What they compute, for C[m, n] = A[m, k] @ W[n, k]^T:
 *
 *   activations  each row of A in blocks of 32 values: d = amax / 127, q = rint(x * (1 / d)) (nearest, ties to
 *                even), |q| <= 127 (Q8_0-style, with a float32 scale). q8_quantize below is the definition.
 *   weights      each 32-value block of a row as unsigned codes u (0..255) and, per 16-value half h, a scale
 *                s_h and an offset o_h with value = s_h * u - o_h: Q4_0 u = nibble, s = d, o = 8 d; Q5_0 u = 5
 *                bits, o = 16 d; Q5_1 u = 5 bits, s = d, o = -m; Q8_0 u = q + 128, o = 128 d; MXFP4/NVFP4 u =
 *                doubled E2M1 value + 12, s = the block (half) scale, o = 12 s; Q4_K / Q5_K u = 4 / 5 bits,
 *                s = d sc, o = dmin m; Q6_K u = 6 bits, s = d sc, o = 32 s (the scales of its 16-value
 *                sub-blocks); IQ4_NL / IQ4_XS u = kvalues_iq4nl[q] + 128 (1..241), s = d / d (ls - 32), o = 128 s;
 *                IQ3_S u = 16 +- grid magnitude (1..15), s = d (1 + 2 sc), o = 16 s; IQ2_S u = 43 +- grid
 *                magnitude (8, 25, 43), s = d (0.5 + sc) / 4 per 16 values, o = 43 s. decode_codes below is the
 *                definition; s u - o is the float decoders' value bit for bit (but NVFP4's, whose tensor scale
 *                folded into s rounds once more: tests/test_int8.py).
 *   dot product  per (output, token, block, half): the integer sum I = sum u * q and the activation sum
 *                S = sum q (both exact, int32), then in float32
 *                    c += s_h * (d * I) - o_h * (d * S),
 *                summed over halves and blocks in order. The integer parts are exact; what is rounded is the
 *                float accumulation above (tests/test_int8.py checks both against a numpy model of it). Q6_K on
 *                AVX2 (micro8_iscale) applies its integer sub-block scales in integer arithmetic and rounds once
 *                per block: the same sum, in another float32 order.
 *
 * The microkernel keeps R8 weight rows x 16 tokens (or 8, for a panel that holds no more) of int32 sums in
 * registers: tokens are the vector lanes (8 per 256-bit vector), each lane's 4 bytes are 4 consecutive k of one
 * token, and one instruction multiplies them by 4 bytes of a weight row broadcast to every lane (u8 x s8,
 * summed into the int32 lane): VNNI's vpdpbusd, or on plain AVX2 vpmaddubsw + vpmaddwd (exact while the int16
 * sums fit: codes to 129 at most, so Q8_0's and IQ4_NL's / IQ4_XS's need VNNI; see KINDS8); on arm64 (4 tokens
 * per vector) USDOT, or SDOT, which takes the codes as signed bytes (so again not those three). The float flush
 * happens once per block, or per 16-value half for types with two scales per block.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "dg_internal.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(DG_INT8_AVX512BF16) /* the avx512vnni set, plus BF16 weights (every CPU with AVX512-BF16 has VNNI) */
#define DG_INT8_AVX512VNNI 1
#define SFX8(x) x##_avx512bf16
#define NAME8 "avx512bf16"
#elif defined(DG_INT8_AVX512VNNI)
#define SFX8(x) x##_avx512vnni
#define NAME8 "avx512vnni"
#elif defined(DG_INT8_AVXVNNI)
#define SFX8(x) x##_avxvnni
#define NAME8 "avxvnni"
#elif defined(DG_INT8_AVX2)
#define SFX8(x) x##_avx2
#define NAME8 "avx2"
#elif defined(DG_INT8_I8MM)
#define SFX8(x) x##_i8mm
#define NAME8 "i8mm"
#elif defined(DG_INT8_DOTPROD)
#define SFX8(x) x##_dotprod
#define NAME8 "dotprod"
#else
#define SFX8(x) x##_generic
#define NAME8 "generic"
#endif
#if defined(DG_INT8_AVX512VNNI) || defined(DG_INT8_AVXVNNI) || defined(DG_INT8_AVX2)
#define SIMD8 1
#elif defined(DG_INT8_I8MM) || defined(DG_INT8_DOTPROD)
#define NEON8 1
#include <arm_neon.h>
#endif
/* Sets that take BF16 weights (bf16 products, see "BF16 weights" below): avx512bf16, and generic, which defines
 * its arithmetic. */
#if defined(DG_INT8_AVX512BF16) || !(defined(SIMD8) || defined(NEON8))
#define BF16_SET 1
#else
#define BF16_SET 0
#endif

/* float vectors for the elementwise work (dg_vmath.h): 8 lanes where AVX2 is there (every x86 int8 set) */
#ifdef SIMD8
#define VL 8
#else
#define VL 4
#endif
#include "dg_vmath.h"

#define QB 32 /* values per activation block */
#define TP 16 /* tokens per panel: two vectors of 8 lanes */
#define R8 3  /* weight rows per microkernel call: 3 x 2 int32 + 3 x 2 float accumulators of 16 registers */
#define PB8 16 /* R8-row panels per weight block of linear and the ffn (see linear). Against 8, tools/kernel_ab.py on
                * the bench model: the output projection 3.5-6% faster, the MLPs the same; 32 slower (3-10%) */
#define WB8 (R8 * PB8)
_Static_assert(WB8 % 8 == 0, "tile_by_token moves whole 8 x 8 blocks of a block's rows");
#define ALIGN8 64

#ifdef _OPENMP
#define NT8 (dg_nthreads > 0 ? dg_nthreads : 1)
#define TID8 omp_get_thread_num()
#define TEAM8 omp_get_num_threads() /* may be fewer than NT8 asked (OMP_THREAD_LIMIT) */
#else
#define NT8 1
#define TID8 0
#define TEAM8 1
#endif

static void *alloc8(size_t bytes) { return aligned_alloc(ALIGN8, (bytes + ALIGN8 - 1) / ALIGN8 * ALIGN8 + ALIGN8); }

/* ---------------------------------------------------------------------------------------------------------------
 * Activations: q8_quantize is the definition; pack_panel lays a panel of TP tokens out for the microkernel:
 * per block b, 8 groups of 4 k, each group TP tokens x 4 bytes; per block the scales d[TP] and the scaled
 * activation sums d * S of each half, lo[TP] and hi[TP].
 * ------------------------------------------------------------------------------------------------------------- */

static void q8_block(const float *x, int8_t *q, float *d, int32_t *sum_lo, int32_t *sum_hi) {
#ifdef SIMD8 /* the loop below, 8 values at a time (the same operations, so the same bits) */
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 v[4], vmax = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) { /* max(|x|, running): a NaN is passed over, as by the loop's comparison */
        v[i] = _mm256_loadu_ps(x + 8 * i);
        vmax = _mm256_max_ps(_mm256_and_ps(v[i], magnitude), vmax);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
    const float dd = amax / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
    __m256i c[4];
    for (int i = 0; i < 4; i++) {
        const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(id)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); /* rintf */
        c[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f)));
    }
    /* int32 -> int8 with saturating packs (values already in range), which interleave 128-bit lanes: undo it */
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    int32_t sums[2][8];
    _mm256_storeu_si256((__m256i *)sums[0], _mm256_add_epi32(c[0], c[1]));
    _mm256_storeu_si256((__m256i *)sums[1], _mm256_add_epi32(c[2], c[3]));
    int32_t lo = 0, hi = 0;
    for (int j = 0; j < 8; j++) lo += sums[0][j], hi += sums[1][j];
    *d = dd, *sum_lo = lo, *sum_hi = hi;
#else
    float amax = 0;
    for (int j = 0; j < QB; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
    const float dd = amax / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
    int32_t lo = 0, hi = 0;
    for (int j = 0; j < QB; j++) {
        float v = rintf(x[j] * id); /* the default rounding mode: to nearest, ties to even */
        v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
        q[j] = (int8_t)v;
        if (j < QB / 2) lo += q[j]; else hi += q[j];
    }
    *d = dd, *sum_lo = lo, *sum_hi = hi;
#endif
}

static int SFX8(q8_quantize)(const float *x, int64_t n, int8_t *q, float *d) {
    if (n % QB) return DG_E_ARG;
    for (int64_t b = 0; b < n / QB; b++) {
        int32_t lo, hi;
        q8_block(x + b * QB, q + b * QB, d + b, &lo, &hi);
    }
    return 0;
}

typedef struct {
    int8_t *q;    /* [nb][8][TP][4] */
    float *d;     /* [nb][TP] */
    float *lo;    /* [nb][TP]: d * (sum of the first 16 codes) */
    float *hi;    /* [nb][TP]: d * (sum of the last 16 codes) */
    int16_t *off; /* [nb][2][TP][2]: iscale kinds only (micro8_iscale) */
} panel8;

/* A panel of nb blocks of 32 values for weights of `type`: int8 codes and their scales, or BF16's bf16 pairs. */
static size_t panel_bytes(int type, int64_t nb) {
    if (BF16_SET && type == T_BF16) return (size_t)nb * QB * TP * sizeof(uint16_t);
    return (size_t)nb * (QB * TP + 3 * TP * sizeof(float) + 2 * TP * 2 * sizeof(int16_t));
}

static panel8 panel_at(uint8_t *base, int64_t nb) {
    panel8 p;
    p.q = (int8_t *)base;
    p.d = (float *)(base + nb * QB * TP);
    p.lo = p.d + nb * TP;
    p.hi = p.lo + nb * TP;
    p.off = (int16_t *)(p.hi + nb * TP);
    return p;
}

/* How each weight type enters the microkernel (see there): X(type, split, chain, ratio, umax, iscale, sgn) with
 *   split   its two 16-value halves have scales of their own;
 *   chain   how many vpmaddubsw results (AVX2) are added in int16 before widening;
 *   ratio   o = ratio * s, or 0: o is its own (Q4_K, Q5_K, Q5_1);
 *   umax    its largest code (decode_codes);
 *   iscale  on AVX2, the halves' scales are small integers times one float per 256 values, applied in integer
 *           arithmetic (micro8_iscale);
 *   sgn     on AVX2 and dotprod, the codes enter as the signed values u - 128 (ratio 128), so the integer sum is
 *           sum (u - 128) q and the offset is never subtracted in float.
 * AVX2's vpmaddubsw sums a pair of u8 x s8 products into int16 (|q| <= 127), and `chain` of those are added in
 * int16: exact while chain * 2 * umax * 127 < 2^15. A single pair of Q8_0's codes (to 255) or IQ4_NL's / IQ4_XS's
 * (to 241) could reach 2^15, so those are sgn kinds: AVX2 multiplies |u - 128| (<= 128, unsigned) by q carrying
 * the sign of u - 128 (vpsignb), as ggml does, 2 * 128 * 127 < 2^15 for one pair; SDOT (dotprod) takes signed
 * bytes as they are, and takes the other kinds' codes as signed bytes too (all < 128). Each chain is the largest
 * the bound allows (MXFP4's / NVFP4's 4, where 5 would fit, divide a block's 8 groups and a half's 4). An iscale
 * kind subtracts the offset ratio * S in int16 before widening, so what must fit is the sum of (u - ratio) q, not
 * of u q (int16 addition wraps: the raw sums may overflow on the way, the true one is exact):
 * chain * 2 * max|u - ratio| * 127 < 2^15. The bounds are checked at compile time below. */
#define KINDS8(X)                                                                                                      \
    X(T_Q4_0, 0, 8, 8.0f, 15, 0, 0)      /* 8 * 2 * 15 * 127 = 30480 */                                                \
    X(T_Q5_0, 0, 4, 16.0f, 31, 0, 0)     /* 4 * 2 * 31 * 127 = 31496 */                                                \
    X(T_Q5_1, 0, 4, 0.0f, 31, 0, 0)      /* o = -m: value = d u + m */                                                 \
    X(T_Q8_0, 0, 1, 128.0f, 255, 0, 1)   /* u - 128 = q in -128..127: 2 * 128 * 127 = 32512 */                         \
    X(T_MXFP4, 0, 4, 12.0f, 24, 0, 0)    /* 4 * 2 * 24 * 127 = 24384 */                                                \
    X(T_NVFP4, 1, 4, 12.0f, 24, 0, 0)                                                                                  \
    X(T_Q4_K, 0, 8, 0.0f, 15, 0, 0)                                                                                    \
    X(T_Q5_K, 0, 4, 0.0f, 31, 0, 0)                                                                                    \
    X(T_Q6_K, 1, 4, 32.0f, 63, 1, 0)     /* u - 32 in -32..31: 4 * 2 * 32 * 127 = 32512 */                             \
    X(T_IQ4_NL, 0, 1, 128.0f, 241, 0, 1) /* u - 128 = kvalues in -127..113 */                                          \
    X(T_IQ4_XS, 0, 1, 128.0f, 241, 0, 1)                                                                               \
    X(T_IQ3_S, 0, 4, 16.0f, 31, 0, 0)    /* 16 +- 1..15 */                                                             \
    X(T_IQ2_S, 1, 1, 43.0f, 86, 0, 0)    /* 43 +- {8, 25, 43}: 1 * 2 * 86 * 127 = 21844 */

#define KIND8_MAG(ratio, umax) ((int)(ratio) > (umax) - (int)(ratio) ? (int)(ratio) : (umax) - (int)(ratio))
#define KIND8_EXACT(type, split, chain, ratio, umax, iscale, sgn)                                                    \
    _Static_assert(iscale || sgn ? (chain) == (sgn ? 1 : 4) && (chain) * 2 * KIND8_MAG(ratio, umax) * 127 < 1 << 15 \
                                 : (chain) * 2 * (umax) * 127 < 1 << 15,                                            \
                   #type ": chain overflows int16");
KINDS8(KIND8_EXACT)

typedef struct {
    int split, chain;
    float ratio;
    int umax; /* 0: no int8 codes */
    int iscale, sgn;
} kind8;

/* The kind as this kernel set uses it: iscale is AVX2's (VNNI sums u q in int32 directly), sgn AVX2's and
 * dotprod's (VNNI and i8mm multiply unsigned codes). */
static kind8 kind_of(int type) {
#if defined(DG_INT8_AVX2)
#define ISCALE8(iscale) iscale
#else
#define ISCALE8(iscale) 0
#endif
#if defined(DG_INT8_AVX2) || defined(DG_INT8_DOTPROD)
#define SGN8(sgn) sgn
#else
#define SGN8(sgn) 0
#endif
    switch (type) {
#define KIND8_CASE(type, split, chain, ratio, umax, iscale, sgn)                                                     \
    case type: return (kind8){split, chain, ratio, umax, ISCALE8(iscale), SGN8(sgn)};
        KINDS8(KIND8_CASE)
    default: return (kind8){0, 1, 0.0f, 0, 0, 0};
    }
}

/* Rows rows[0..count) of x (row stride k) into panel p for weights of kind `kind` (see the microkernel): lo / hi
 * hold ratio * d * S per half (0 for sgn kinds), or (halves sharing a scale) lo the block's; for iscale kinds off
 * holds ratio times each token's int16 lane sums per half (lane j: values 4g + 2j and 4g + 2j + 1 of the half's
 * groups g, what vpmaddubsw pairs into that lane); missing tokens are zeros. */
static void pack_q8(const float *x, int64_t k, const int64_t *rows, int64_t first, int64_t count, kind8 kind,
                    panel8 p) {
    const int64_t nb = k / QB;
    int8_t q[QB];
    for (int64_t t = 0; t < TP; t++) {
        const float *src = t < count ? x + (rows ? rows[first + t] : first + t) * k : NULL;
        for (int64_t b = 0; b < nb; b++) {
            float d = 0;
            int32_t lo = 0, hi = 0;
            if (src) q8_block(src + b * QB, q, &d, &lo, &hi); else memset(q, 0, QB);
            int8_t *dst = p.q + b * QB * TP;
            for (int g = 0; g < 8; g++) memcpy(dst + (g * TP + t) * 4, q + 4 * g, 4);
            /* sgn kinds: the offset is inside the integer sum already */
            const float ratio = kind.sgn ? 0.0f : kind.ratio != 0.0f ? kind.ratio : 1.0f;
            p.d[b * TP + t] = d;
            p.lo[b * TP + t] = ratio * (d * (float)(kind.split ? lo : lo + hi));
            p.hi[b * TP + t] = ratio * (d * (float)hi);
            for (int h = 0; kind.iscale && h < 2; h++)
                for (int j = 0; j < 2; j++) {
                    int lane = 0;
                    for (int g = 4 * h; g < 4 * h + 4; g++) lane += q[4 * g + 2 * j] + q[4 * g + 2 * j + 1];
                    p.off[((b * 2 + h) * TP + t) * 2 + j] = (int16_t)(kind.ratio * lane); /* < 2^15: KINDS8 */
                }
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * BF16 weights (the sets with BF16_SET): activations rounded to bfloat16, products summed in float32 the way
 * AVX512-BF16's VDPBF16PS sums them. Plain definition, for C[m, n] = A[m, k] @ W[n, k]^T:
 *   activations  a = bf16_round(x): to nearest, ties to even, as ggml_compute_fp32_to_bf16 and gguf-py round;
 *                float32 subnormals become zeros (the instruction reads bf16 subnormals as zeros anyway)
 *   weights      the file's bfloat16 values as they are (subnormals read as zeros: the instruction's DAZ)
 *   dot product  per pair j of k, in order: c += a[2j+1] w[2j+1], then c += a[2j] w[2j] (Intel's pseudo-code for
 *                VDPBF16PS). A product of two bf16 values (8 significant bits each) is exact in float32, so each
 *                step rounds once, to nearest even; a subnormal sum is flushed to zero (its FTZ).
 * The activations' rounding (2^-8 relative at most: 8 significant bits) is the one lossy step: like the int8 codes
 * it follows the int8 switch, and int8 off keeps BF16 files on the exact float32 path. Why: VDPBF16PS does 32
 * multiply-adds where VFMADD231PS does 16, and the weights are read as stored, never widened. A panel holds per
 * pair j the TP tokens' bf16 pairs (4 bytes a token, as the int8 panels' 4 codes), so one 512-bit vector is a
 * pair of all 16 tokens.
 * ------------------------------------------------------------------------------------------------------------- */

/* (Every set compiles these; those without BF16_SET never call them: static inline, so no code is emitted.) */
#define RB16 12 /* weight rows per BF16 microkernel call: 12 independent sums hide VDPBF16PS's latency */
_Static_assert(WB8 % RB16 == 0, "a block of weight rows splits into BF16 microkernel calls");

static inline uint16_t bf16_round(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays a (quiet) NaN */
    if (!(u & 0x7F800000u)) return (uint16_t)((u >> 16) & 0x8000);             /* zero or subnormal: signed zero */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

/* Tokens rows[first .. first + count) of x (row stride k; rows NULL: consecutive) as a panel of bf16 pairs
 * p[k / 2][TP][2]; missing tokens are zeros. */
static inline void pack_bf16(const float *x, int64_t k, const int64_t *rows, int64_t first, int64_t count,
                             uint16_t *p) {
    for (int64_t t = 0; t < TP; t++) {
        const float *src = t < count ? x + (rows ? rows[first + t] : first + t) * k : NULL;
        for (int64_t j = 0; j < k; j++) p[(j / 2 * TP + t) * 2 + j % 2] = src ? bf16_round(src[j]) : 0;
    }
}

#if defined(DG_INT8_AVX512BF16)
/* out[r][l] (r < rows) = sum over pairs j < np of a[j][l] . w[r][j], lane l of 16, as the definition above:
 * a[j] at a + j * a_stride (16 lanes x 2 bf16), w[r][j] the 4 bytes at w[r] + 4 j. */
static inline __attribute__((always_inline)) void dot_bf16(const uint8_t *const *w, const int rows, int64_t np,
                                                           const uint8_t *a, int64_t a_stride, float *out) {
    __m512 f[RB16];
    for (int r = 0; r < rows; r++) f[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < np; j++) {
        const __m512bh av = (__m512bh)_mm512_loadu_si512(a + j * a_stride);
        for (int r = 0; r < rows; r++) {
            int32_t w2;
            memcpy(&w2, w[r] + 4 * j, 4);
            f[r] = _mm512_dpbf16_ps(f[r], (__m512bh)_mm512_set1_epi32(w2), av);
        }
    }
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(out + 16 * r, f[r]);
}
#else
static inline float bf16_value(uint16_t h) {
    return dg_bits_f32((uint32_t)(h & 0x7F80 ? h : h & 0x8000) << 16); /* exponent 0: a signed zero (DAZ) */
}

static inline float bf16_step(float c, uint16_t a, uint16_t w) {
    c += bf16_value(a) * bf16_value(w); /* exact product, one rounding */
    return fabsf(c) < FLT_MIN ? copysignf(0.0f, c) : c; /* FTZ */
}

static inline void dot_bf16(const uint8_t *const *w, const int rows, int64_t np, const uint8_t *a, int64_t a_stride,
                            float *out) {
    for (int r = 0; r < rows; r++)
        for (int l = 0; l < 16; l++) {
            const uint16_t *wr = (const uint16_t *)w[r];
            float c = 0;
            for (int64_t j = 0; j < np; j++) {
                const uint16_t *al = (const uint16_t *)(a + j * a_stride) + 2 * l;
                c = bf16_step(bf16_step(c, al[1], wr[2 * j + 1]), al[0], wr[2 * j]);
            }
            out[16 * r + l] = c;
        }
}
#endif

/* Tokens rows[first .. first + count) of x into the panel at `base`, for weights of `type`. */
static void pack_panel(int type, const float *x, int64_t k, const int64_t *rows, int64_t first, int64_t count,
                       uint8_t *base) {
    if (BF16_SET && type == T_BF16) pack_bf16(x, k, rows, first, count, (uint16_t *)base);
    else pack_q8(x, k, rows, first, count, kind_of(type), panel_at(base, k / QB));
}

/* ---------------------------------------------------------------------------------------------------------------
 * Weights: decode_codes is the definition of the codes, scales and offsets (see the top of the file).
 * ------------------------------------------------------------------------------------------------------------- */

static void decode_codes(int type, const uint8_t *row, int64_t k, float ts, uint8_t *u, float *s, float *o,
                         int16_t *isc, float *isd);

static int SFX8(supports)(int type) {
    return kind_of(type).umax != 0 || (BF16_SET && type == T_BF16);
}

/* One row of k values as codes u[k] and per 16-value half scale s[k / 16] and offset o[k / 16]. */
static int SFX8(codes)(int type, const uint8_t *row, int64_t k, float ts, uint8_t *u, float *s, float *o) {
    if (!kind_of(type).umax || k % 256) return DG_E_TYPE;
    decode_codes(type, row, k, ts, u, s, o, NULL, NULL);
    return 0;
}

/* 2n codes from n bytes of 4-bit indices (byte j: values j, j + n) through a table of signed values, plus bias
 * (mod 256: the codes are the bytes). With SSSE3 (every x86 int8 set) 16 bytes are two byte shuffles. */
static inline void table_codes(const uint8_t *q, int n, const int8_t *table, int bias, uint8_t *u) {
#if defined(__AVX2__)
    if (n == 16) {
        const __m128i t = _mm_add_epi8(_mm_loadu_si128((const __m128i *)table), _mm_set1_epi8((char)bias));
        const __m128i v = _mm_loadu_si128((const __m128i *)q), low4 = _mm_set1_epi8(15);
        _mm_storeu_si128((__m128i *)u, _mm_shuffle_epi8(t, _mm_and_si128(v, low4)));
        _mm_storeu_si128((__m128i *)(u + 16), _mm_shuffle_epi8(t, _mm_and_si128(_mm_srli_epi16(v, 4), low4)));
        return;
    }
#endif
    for (int j = 0; j < n; j++) {
        u[j] = (uint8_t)(table[q[j] & 15] + bias);
        u[j + n] = (uint8_t)(table[q[j] >> 4] + bias);
    }
}

/* 8 codes bias -+ magnitude (bytes of `mag`; bit e of `signs` set: minus) for the grid types, in the bytes of one
 * word: magnitude <= bias and bias + magnitude < 256, so no byte carries into the next. */
static inline void signed_codes8(uint64_t mag, unsigned signs, unsigned bias, uint8_t *u) {
    const uint64_t ones = 0x0101010101010101ull, low7 = 0x7F7F7F7F7F7F7F7Full;
    const uint64_t bit = ((uint64_t)signs * ones) & 0x8040201008040201ull; /* byte e: bit e of signs */
    const uint64_t minus = (((((bit & low7) + low7) | bit) >> 7) & ones) * 0xFF; /* byte e: 0xFF where set */
    const uint64_t b = bias * ones, codes = ((b + mag) & ~minus) | ((b - mag) & minus);
    memcpy(u, &codes, 8);
}

/* 32 codes from 16 bytes of nibbles (byte j: values j and j + 16) with bit j of `fifth` as their bit 4 (Q5_0 /
 * Q5_1; 0 for Q4_0). With AVX2: byte j of a 32-byte vector holds byte j / 8 of `fifth`, tested against bit j % 8. */
static inline void nibble_codes(const uint8_t *q, uint32_t fifth, uint8_t *u) {
#if defined(__AVX2__)
    const __m128i v = _mm_loadu_si128((const __m128i *)q), low4 = _mm_set1_epi8(15);
    const __m256i nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_and_si128(v, low4));
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)fifth),
                                               _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2,
                                                                2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    _mm256_storeu_si256((__m256i *)u, _mm256_or_si256(nib, _mm256_and_si256(set, _mm256_set1_epi8(16))));
#else
    for (int j = 0; j < 16; j++) {
        u[j] = (uint8_t)((q[j] & 15) | ((fifth >> j) & 1) << 4);
        u[j + 16] = (uint8_t)((q[j] >> 4) | ((fifth >> (j + 16)) & 1) << 4);
    }
#endif
}

/* For iscale kinds (and isc, isd non-NULL) also each half's integer scale isc[k / 16] and the float isd[k / 256]
 * they multiply: s = isd * isc exactly. */
static void decode_codes(int type, const uint8_t *row, int64_t k, float ts, uint8_t *u, float *s, float *o,
                         int16_t *isc, float *isd) {
    switch (type) {
    case T_Q4_0: case T_Q5_0: case T_Q5_1: case T_Q8_0: case T_MXFP4: case T_IQ4_NL: {
        for (int64_t b = 0; b < k / 32; b++, row += dg_type_size(type), u += 32) {
            float d, off;
            if (type == T_MXFP4) {
                d = dg_e8m0_half(row[0]), off = 12.0f * d;
                table_codes(row + 1, 16, dg_kvalues_fp4, 12, u);
            } else if (type == T_IQ4_NL) { /* value = d * kvalues[q]: u = kvalues[q] + 128, 1..241 */
                d = dg_rd_fp16(row), off = 128.0f * d;
                table_codes(row + 2, 16, dg_kvalues_iq4nl, 128, u);
            } else if (type == T_Q8_0) {
                d = dg_rd_fp16(row), off = 128.0f * d;
                for (int j = 0; j < 32; j++) u[j] = (uint8_t)((int8_t)row[2 + j] + 128);
            } else if (type == T_Q4_0) {
                d = dg_rd_fp16(row), off = 8.0f * d;
                nibble_codes(row + 2, 0, u);
            } else { /* Q5_0: fp16 d, u32 fifth bits, nibbles; Q5_1: fp16 d, fp16 m, then the same (value = d u + m) */
                const int head = type == T_Q5_1 ? 4 : 2;
                uint32_t qh;
                memcpy(&qh, row + head, 4); /* bit j: the fifth bit of value j (little-endian, as ggml) */
                d = dg_rd_fp16(row), off = type == T_Q5_1 ? -dg_rd_fp16(row + 2) : 16.0f * d;
                nibble_codes(row + head + 4, qh, u);
            }
            s[2 * b] = s[2 * b + 1] = d;
            o[2 * b] = o[2 * b + 1] = off;
        }
        break;
    }
    case T_NVFP4: /* 64 values: four UE4M3 scales, one per 16 values; the tensor scale folded into them */
        for (int64_t b = 0; b < k / 64; b++, row += 36, u += 64) {
            for (int sb = 0; sb < 4; sb++) {
                const float d = dg_ue4m3_half(row[sb]) * ts;
                table_codes(row + 4 + 8 * sb, 8, dg_kvalues_fp4, 12, u + 16 * sb);
                s[4 * b + sb] = d, o[4 * b + sb] = 12.0f * d;
            }
        }
        break;
    case T_Q4_K: case T_Q5_K: /* Q5_K: Q4_K's fields plus qh[32] before the nibbles, bit j of qh[l]: sub-block j */
        for (int64_t b = 0; b < k / 256; b++, row += dg_type_size(type), u += 256) {
            const float d = dg_rd_fp16(row), dmin = dg_rd_fp16(row + 2);
            const uint8_t *q = row + (type == T_Q5_K ? 48 : 16), *qh = row + 16;
            for (int j = 0; j < 8; j++) {
                int sj, mj;
                dg_scale_min_k4(row + 4, j, &sj, &mj);
                const uint8_t *qq = q + (j / 2) * 32;
#if defined(__AVX2__)
                const __m256i v = _mm256_loadu_si256((const __m256i *)qq), low4 = _mm256_set1_epi8(15);
                __m256i code = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(v, 4) : v, low4);
                if (type == T_Q5_K) { /* bit j of each qh byte as bit 4 (masked to its own byte after the shift) */
                    const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
                    const __m256i fifth = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
                    code = _mm256_or_si256(code, _mm256_slli_epi16(fifth, 4));
                }
                _mm256_storeu_si256((__m256i *)(u + 32 * j), code);
#else
                for (int l = 0; l < 32; l++)
                    u[32 * j + l] = (uint8_t)((j % 2 ? qq[l] >> 4 : qq[l] & 15) |
                                              (type == T_Q5_K ? ((qh[l] >> j) & 1) << 4 : 0));
#endif
                s[16 * b + 2 * j] = s[16 * b + 2 * j + 1] = d * (float)sj;
                o[16 * b + 2 * j] = o[16 * b + 2 * j + 1] = dmin * (float)mj;
            }
        }
        break;
    case T_Q6_K:
        for (int64_t b = 0; b < k / 256; b++, row += 210) {
            const float d = dg_rd_fp16(row + 208);
            for (int half = 0; half < 2; half++) {
                const uint8_t *ql = row + 64 * half, *qh = row + 128 + 32 * half;
                const int8_t *sc = (const int8_t *)(row + 192 + 8 * half);
                uint8_t *y = u + 128 * half;
#if defined(__AVX2__)
                /* the loop below, 32 bytes at a time: 16-bit shifts carry bits across bytes, but each result is
                 * masked to the bits that came from its own byte before it is combined */
                const __m256i lo = _mm256_loadu_si256((const __m256i *)ql), hi = _mm256_loadu_si256((const __m256i *)(ql + 32));
                const __m256i h = _mm256_loadu_si256((const __m256i *)qh), low4 = _mm256_set1_epi8(15), low2 = _mm256_set1_epi8(3);
                for (int quarter = 0; quarter < 4; quarter++) {
                    const __m256i q = _mm256_and_si256(quarter < 2 ? (quarter ? hi : lo) : _mm256_srli_epi16(quarter == 3 ? hi : lo, 4), low4);
                    const __m256i top = _mm256_and_si256(_mm256_srli_epi16(h, 2 * quarter), low2);
                    _mm256_storeu_si256((__m256i *)(y + 32 * quarter), _mm256_or_si256(q, _mm256_slli_epi16(top, 4)));
                }
#else
                for (int l = 0; l < 32; l++) {
                    y[l] = (uint8_t)((ql[l] & 15) | (qh[l] & 3) << 4);
                    y[l + 32] = (uint8_t)((ql[l + 32] & 15) | ((qh[l] >> 2) & 3) << 4);
                    y[l + 64] = (uint8_t)((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4);
                    y[l + 96] = (uint8_t)((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4);
                }
#endif
                for (int i = 0; i < 8; i++) {
                    const float si = d * (float)sc[i];
                    s[16 * b + 8 * half + i] = si, o[16 * b + 8 * half + i] = 32.0f * si;
                    if (isc) isc[16 * b + 8 * half + i] = sc[i];
                }
            }
            if (isd) isd[b] = d;
            u += 256;
        }
        break;
    case T_IQ4_XS: /* value = d (ls - 32) kvalues[q] per 32 values */
        for (int64_t b = 0; b < k / 256; b++, row += 136, u += 256) {
            const float d = dg_rd_fp16(row);
            for (int ib = 0; ib < 8; ib++) {
                const float si = d * (float)(dg_iq4xs_ls(row, ib) - 32);
                table_codes(row + 8 + 16 * ib, 16, dg_kvalues_iq4nl, 128, u + 32 * ib);
                s[16 * b + 2 * ib] = s[16 * b + 2 * ib + 1] = si;
                o[16 * b + 2 * ib] = o[16 * b + 2 * ib + 1] = 128.0f * si;
            }
        }
        break;
    case T_IQ3_S: /* value = db * (+-magnitude), magnitude 1..15: u = 16 +- magnitude */
        for (int64_t b = 0; b < k / 256; b++, row += 110, u += 256) {
            const float d = dg_rd_fp16(row);
            for (int i = 0; i < 32; i++) { /* 8 values: groups 2i, 2i + 1 and sign byte i */
                uint32_t mag[2];
                memcpy(&mag[0], dg_iq3s_group(row, 2 * i), 4), memcpy(&mag[1], dg_iq3s_group(row, 2 * i + 1), 4);
                signed_codes8(mag[0] | (uint64_t)mag[1] << 32, row[74 + i], 16, u + 8 * i);
            }
            for (int ib = 0; ib < 8; ib++) {
                const float si = dg_iq3s_scale(d, row, ib);
                s[16 * b + 2 * ib] = s[16 * b + 2 * ib + 1] = si;
                o[16 * b + 2 * ib] = o[16 * b + 2 * ib + 1] = 16.0f * si;
            }
        }
        break;
    case T_IQ2_S: /* value = db * (+-magnitude), magnitude 8, 25 or 43: u = 43 +- magnitude; db per 16 values */
        for (int64_t b = 0; b < k / 256; b++, row += 82, u += 256) {
            const float d = dg_rd_fp16(row);
            for (int g = 0; g < 32; g++) {
                uint64_t mag;
                memcpy(&mag, dg_iq2s_group(row, g), 8);
                signed_codes8(mag, row[34 + g], 43, u + 8 * g);
            }
            for (int h = 0; h < 16; h++)
                s[16 * b + h] = dg_iq2s_scale(d, row, h), o[16 * b + h] = 43.0f * s[16 * b + h];
        }
        break;
    default:
        break;
    }
}

/* The codes, scales and offsets of up to WB8 weight rows (`n` of them), a row per pointer; BF16 rows where they
 * are stored (raw: the weights themselves, no copy). */
typedef struct {
    int n;
    uint8_t *u[WB8];
    const uint8_t *raw[WB8];
    float *s[WB8], *o[WB8];
    int16_t *isc[WB8]; /* iscale kinds: decode_codes' isc and isd */
    float *isd[WB8];
} rows8;

static int rows8_alloc(rows8 *w, int64_t k, int n) {
    memset(w, 0, sizeof(*w));
    w->n = n;
    for (int r = 0; r < n; r++) {
        w->u[r] = alloc8((size_t)k);
        w->s[r] = alloc8((size_t)k / 16 * sizeof(float));
        w->o[r] = alloc8((size_t)k / 16 * sizeof(float));
        w->isc[r] = alloc8((size_t)k / 16 * sizeof(int16_t));
        w->isd[r] = alloc8((size_t)k / 256 * sizeof(float));
        if (!w->u[r] || !w->s[r] || !w->o[r] || !w->isc[r] || !w->isd[r]) return 0;
    }
    return 1;
}

static void rows8_free(rows8 *w) {
    for (int r = 0; r < w->n; r++) free(w->u[r]), free(w->s[r]), free(w->o[r]), free(w->isc[r]), free(w->isd[r]);
}

/* Rows [r0, r0 + count) of W into w, and up to the next multiple of the microkernel's rows past them the first
 * again (their results are not stored). */
static void rows8_decode(rows8 *w, int type, const uint8_t *base, int64_t row_bytes, int64_t k, float ts, int64_t r0,
                         int64_t count) {
    if (BF16_SET && type == T_BF16) {
        for (int64_t r = 0; r < (count + RB16 - 1) / RB16 * RB16 && r < w->n; r++)
            w->raw[r] = base + (r0 + (r < count ? r : 0)) * row_bytes;
        return;
    }
    const int64_t padded = (count + R8 - 1) / R8 * R8;
    const int iscale = kind_of(type).iscale;
    for (int64_t r = 0; r < padded && r < w->n; r++)
        decode_codes(type, base + (r0 + (r < count ? r : 0)) * row_bytes, k, ts, w->u[r], w->s[r], w->o[r],
                     iscale ? w->isc[r] : NULL, iscale ? w->isd[r] : NULL);
}

/* ---------------------------------------------------------------------------------------------------------------
 * The microkernel. Plain definition, for r < R8 rows of decoded weights and the TP tokens of a panel:
 *     tile[r][t] = sum over blocks b, halves h of  s[r][2b+h] * (d[b][t] * I) - o[r][2b+h] * (d[b][t] * S),
 *     I = sum_{j in half} u[r][32b + j] * q[b][t][j],   S = the half's sum of q (stored as d * S in lo / hi).
 * Types whose two halves share a scale (all but Q6_K, NVFP4 and IQ2_S) take both halves as one sum; types whose
 * offset is a fixed multiple of the scale (all but Q4_K, Q5_K and Q5_1) have that multiple folded into lo / hi by
 * pack_q8, so their flush is s * (d * I - lo). sgn kinds (on AVX2 and dotprod) sum (u - 128) q instead, the
 * exact integer I - 128 S, with lo = 0. On AVX2, vpmaddubsw's int16 pair sums are added `chain` at a time in int16
 * before widening (chain * 2 * umax * 127 < 2^15, umax the type's largest code: KINDS8).
 * ------------------------------------------------------------------------------------------------------------- */

#ifdef SIMD8
static inline __m256i bcast4(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

#if defined(DG_INT8_AVX2)
/* x, kept in a register at this point of its chain of int16 sums: integer addition being associative, GCC
 * otherwise computes all of a block's vpmaddubsw products first and spills them to the stack to add them
 * afterwards (the C harness on Zen 3, one core: Q4_K 78 -> 110 GMAC/s, Q6_K 87 -> 105). */
static inline __m256i in_order(__m256i x) {
    __asm__("" : "+x"(x));
    return x;
}
#endif

/* nv: the panel's vectors of 8 tokens to compute, 2 or (a panel of at most 8 tokens) 1 */
static inline __attribute__((always_inline)) void micro8_kind(const uint8_t *const *u, const float *const *s,
                                                              const float *const *o, int64_t nb, panel8 p,
                                                              float *tile, const int split, const int chain,
                                                              const int ratio, const int sgn, const int nv) {
    (void)sgn; /* unused by the VNNI sets, which multiply the unsigned codes (kind_of) */
    __m256 f[R8][2];
    for (int r = 0; r < R8; r++)
        for (int v = 0; v < nv; v++) f[r][v] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *qa = p.q + b * QB * TP;
        for (int h = 0; h < (split ? 2 : 1); h++) {
            const int g_end = split ? 4 * h + 4 : 8;
            __m256i acc[R8][2];
            for (int r = 0; r < R8; r++)
                for (int v = 0; v < nv; v++) acc[r][v] = _mm256_setzero_si256();
            for (int g0 = split ? 4 * h : 0; g0 < g_end; g0 += chain) {
#if defined(DG_INT8_AVX2)
                __m256i a16[R8][2];
                for (int r = 0; r < R8; r++)
                    for (int v = 0; v < nv; v++) a16[r][v] = _mm256_setzero_si256();
#endif
                for (int g = g0; g < g0 + chain && g < g_end; g++) {
                    __m256i a[2];
                    for (int v = 0; v < nv; v++) a[v] = _mm256_loadu_si256((const __m256i *)(qa + g * TP * 4 + 32 * v));
                    for (int r = 0; r < R8; r++) {
                        const __m256i w = bcast4(u[r] + b * QB + 4 * g);
#if defined(DG_INT8_AVX512VNNI)
                        for (int v = 0; v < nv; v++) acc[r][v] = _mm256_dpbusd_epi32(acc[r][v], w, a[v]);
#elif defined(DG_INT8_AVXVNNI)
                        for (int v = 0; v < nv; v++) acc[r][v] = _mm256_dpbusd_avx_epi32(acc[r][v], w, a[v]);
#else
                        if (sgn) { /* (u - 128) q as |u - 128| times q with the sign of u - 128 */
                            const __m256i w8 = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));
                            const __m256i mag = _mm256_abs_epi8(w8);
                            for (int v = 0; v < nv; v++) {
                                const __m256i m = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(a[v], w8));
                                a16[r][v] = in_order(_mm256_add_epi16(a16[r][v], m));
                            }
                        } else {
                            for (int v = 0; v < nv; v++)
                                a16[r][v] = in_order(_mm256_add_epi16(a16[r][v], _mm256_maddubs_epi16(w, a[v])));
                        }
#endif
                    }
                }
#if defined(DG_INT8_AVX2)
                const __m256i ones = _mm256_set1_epi16(1);
                for (int r = 0; r < R8; r++)
                    for (int v = 0; v < nv; v++) acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(a16[r][v], ones));
#endif
            }
            const float *lo = split && h ? p.hi : p.lo; /* one sum over the block: pack_q8 put it in lo */
            for (int v = 0; v < nv; v++) {
                const __m256 d = _mm256_loadu_ps(p.d + b * TP + 8 * v), c = _mm256_loadu_ps(lo + b * TP + 8 * v);
                for (int r = 0; r < R8; r++) {
                    const __m256 sr = _mm256_set1_ps(s[r][2 * b + h]), x = _mm256_cvtepi32_ps(acc[r][v]);
                    if (ratio)
                        f[r][v] = _mm256_fmadd_ps(_mm256_fmsub_ps(x, d, c), sr, f[r][v]);
                    else
                        f[r][v] = _mm256_fnmadd_ps(c, _mm256_set1_ps(o[r][2 * b + h]),
                                                   _mm256_fmadd_ps(_mm256_mul_ps(x, d), sr, f[r][v]));
                }
            }
        }
    }
    for (int r = 0; r < R8; r++)
        for (int v = 0; v < nv; v++) _mm256_storeu_ps(tile + r * TP + 8 * v, f[r][v]);
}
#if defined(DG_INT8_AVX2)
/* An iscale kind (Q6_K) on AVX2: value = isd * isc_h * (u - ratio), isc_h a small integer per 16-value half and
 * isd one float per 256 values. Per block b, exactly in integers (int16 sums, see KINDS8; then vpmaddwd by the
 * half's scale into int32):
 *     I_b = sum over halves h of isc_h * sum_{j in half} (u_j - ratio) q_j,   |I_b| <= 2 * 128 * 16 * 32 * 127 < 2^24,
 * so its float32 conversion is exact too, and then in float32  c += (isd * d_b) * I_b  over blocks in order.
 * The same number as micro8_kind's sum over halves of s_h (d I_h) - o_h (d S_h) (s = isd isc, o = ratio s),
 * rounded once per block instead of twice per half, and a quarter of the widening and float work. */
static inline __attribute__((always_inline)) void micro8_iscale(uint8_t *const *u, int16_t *const *isc,
                                                                float *const *isd, int64_t nb, panel8 p,
                                                                float *tile, const int nv) {
    __m256 f[R8][2];
    for (int r = 0; r < R8; r++)
        for (int v = 0; v < nv; v++) f[r][v] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *qa = p.q + b * QB * TP;
        __m256i t[R8][2];
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            __m256i a16[R8][2];
#pragma GCC unroll 4 /* whole, so the first group starts the sums without a test: Q6_K 69 -> 87 GMAC/s (harness) */
            for (int g = 4 * h; g < 4 * h + 4; g++) {
                __m256i a[2];
                for (int v = 0; v < nv; v++) a[v] = _mm256_loadu_si256((const __m256i *)(qa + g * TP * 4 + 32 * v));
                for (int r = 0; r < R8; r++) {
                    const __m256i w = bcast4(u[r] + b * QB + 4 * g);
                    for (int v = 0; v < nv; v++) {
                        const __m256i m = _mm256_maddubs_epi16(w, a[v]);
                        a16[r][v] = in_order(g == 4 * h ? m : _mm256_add_epi16(a16[r][v], m));
                    }
                }
            }
            const int16_t *off = p.off + (b * 2 + h) * TP * 2;
            for (int v = 0; v < nv; v++) {
                const __m256i ov = _mm256_loadu_si256((const __m256i *)(off + 16 * v));
                for (int r = 0; r < R8; r++) {
                    const __m256i m = _mm256_madd_epi16(_mm256_sub_epi16(a16[r][v], ov), _mm256_set1_epi16(isc[r][2 * b + h]));
                    t[r][v] = h ? _mm256_add_epi32(t[r][v], m) : m;
                }
            }
        }
        for (int v = 0; v < nv; v++) {
            const __m256 d = _mm256_loadu_ps(p.d + b * TP + 8 * v);
            for (int r = 0; r < R8; r++)
                f[r][v] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(isd[r][b * QB / 256]), d),
                                          _mm256_cvtepi32_ps(t[r][v]), f[r][v]);
        }
    }
    for (int r = 0; r < R8; r++)
        for (int v = 0; v < nv; v++) _mm256_storeu_ps(tile + r * TP + 8 * v, f[r][v]);
}
#endif
#elif defined(NEON8)
/* acc + the dot products of 4 bytes w4, in every lane, with each lane's 4 bytes of a: USDOT (w4 unsigned, i8mm) or
 * SDOT (w4 signed: bytes below 128 read the same either way). */
static inline int32x4_t dot4(int32x4_t acc, uint32_t w4, int8x16_t a) {
#if defined(DG_INT8_I8MM)
    return vusdotq_s32(acc, vreinterpretq_u8_u32(vdupq_n_u32(w4)), a);
#else
    return vdotq_s32(acc, vreinterpretq_s8_u32(vdupq_n_u32(w4)), a);
#endif
}

/* arm64: 4 tokens per 128-bit vector; USDOT (u8 codes x s8 activations) or SDOT (codes < 128 as signed). */
static inline __attribute__((always_inline)) void micro8_kind(const uint8_t *const *u, const float *const *s,
                                                              const float *const *o, int64_t nb, panel8 p,
                                                              float *tile, const int split, const int chain,
                                                              const int ratio, const int sgn, const int nv) {
    (void)chain;
    const int nq = 2 * nv; /* vectors of 4 tokens */
    float32x4_t f[R8][4];
    for (int r = 0; r < R8; r++)
        for (int v = 0; v < nq; v++) f[r][v] = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *qa = p.q + b * QB * TP;
        for (int h = 0; h < (split ? 2 : 1); h++) {
            int32x4_t acc[R8][4];
            for (int r = 0; r < R8; r++)
                for (int v = 0; v < nq; v++) acc[r][v] = vdupq_n_s32(0);
            for (int g = split ? 4 * h : 0; g < (split ? 4 * h + 4 : 8); g++) {
                int8x16_t a[4];
                for (int v = 0; v < nq; v++) a[v] = vld1q_s8(qa + g * TP * 4 + 16 * v);
                for (int r = 0; r < R8; r++) {
                    uint32_t w4;
                    memcpy(&w4, u[r] + b * QB + 4 * g, 4);
                    if (sgn) w4 ^= 0x80808080u; /* u - 128 as signed bytes (dotprod only: see kind_of) */
                    for (int v = 0; v < nq; v++) acc[r][v] = dot4(acc[r][v], w4, a[v]);
                }
            }
            const float *lo = split && h ? p.hi : p.lo;
            for (int v = 0; v < nq; v++) {
                const float32x4_t d = vld1q_f32(p.d + b * TP + 4 * v), c = vld1q_f32(lo + b * TP + 4 * v);
                for (int r = 0; r < R8; r++) {
                    const float32x4_t t = vmulq_f32(vcvtq_f32_s32(acc[r][v]), d);
                    if (ratio) {
                        f[r][v] = vfmaq_f32(f[r][v], vsubq_f32(t, c), vdupq_n_f32(s[r][2 * b + h]));
                    } else {
                        f[r][v] = vfmaq_f32(f[r][v], t, vdupq_n_f32(s[r][2 * b + h]));
                        f[r][v] = vfmsq_f32(f[r][v], c, vdupq_n_f32(o[r][2 * b + h]));
                    }
                }
            }
        }
    }
    for (int r = 0; r < R8; r++)
        for (int v = 0; v < nq; v++) vst1q_f32(tile + r * TP + 4 * v, f[r][v]);
}
#else
static inline void micro8_kind(const uint8_t *const *u, const float *const *s, const float *const *o, int64_t nb,
                               panel8 p, float *tile, const int split, const int chain, const int ratio, const int sgn,
                               const int nv) {
    (void)chain, (void)sgn; /* no sgn kinds here (kind_of) */
    for (int r = 0; r < R8; r++)
        for (int t = 0; t < 8 * nv; t++) {
            float f = 0;
            for (int64_t b = 0; b < nb; b++) {
                const int8_t *qa = p.q + b * QB * TP;
                for (int h = 0; h < (split ? 2 : 1); h++) {
                    int32_t acc = 0;
                    for (int g = split ? 4 * h : 0; g < (split ? 4 * h + 4 : 8); g++)
                        for (int l = 0; l < 4; l++) acc += (int32_t)u[r][b * QB + 4 * g + l] * qa[(g * TP + t) * 4 + l];
                    const float c = (split && h ? p.hi : p.lo)[b * TP + t], d = p.d[b * TP + t];
                    if (ratio)
                        f = fmaf(fmaf((float)acc, d, -c), s[r][2 * b + h], f);
                    else
                        f = fmaf(-c, o[r][2 * b + h], fmaf((float)acc * d, s[r][2 * b + h], f));
                }
            }
            tile[r * TP + t] = f;
        }
}
#endif

/* Rows r0 .. r0 + R8 of w against the first `cols` tokens of panel p: the whole panel, or its first 8 tokens
 * (one vector of them) where those are all it holds — a mixture of experts' last panel of an expert often. */
static void micro8(int type, const rows8 *w, int r0, int64_t nb, panel8 p, float *tile, int64_t cols) {
    const int half = cols <= 8;
#if defined(DG_INT8_AVX2)
    if (kind_of(type).iscale) {
        if (half) micro8_iscale(w->u + r0, w->isc + r0, w->isd + r0, nb, p, tile, 1);
        else micro8_iscale(w->u + r0, w->isc + r0, w->isd + r0, nb, p, tile, 2);
        return;
    }
#endif
    const uint8_t *const *u = (const uint8_t *const *)w->u + r0;
    const float *const *s = (const float *const *)w->s + r0, *const *o = (const float *const *)w->o + r0;
    switch (type) { /* each kind compiled with its constants, for a whole panel and for half of one */
#define KIND8_MICRO(type, split, chain, ratio, umax, iscale, sgn)                                                    \
    case type:                                                                                                       \
        if (half) micro8_kind(u, s, o, nb, p, tile, split, chain, ratio != 0, SGN8(sgn), 1);                        \
        else micro8_kind(u, s, o, nb, p, tile, split, chain, ratio != 0, SGN8(sgn), 2);                             \
        break;
        KINDS8(KIND8_MICRO)
    default: break;
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * linear — c[i, j] = sum over k of a[i, k] w[j, k], in the integer arithmetic above. Threads take blocks of
 * WB8 = R8 * PB8 weight rows; each decodes its block's codes once (~200 KB for k = 2816: they stay in L2) and runs every
 * token panel against the block's PB8 row panels in turn, so a token panel comes from L3 once per block rather than
 * once per R8 rows (all of them together, a canvas of 256 tokens, do not fit L2), and each token's results are
 * stored WB8 at a time.
 * ------------------------------------------------------------------------------------------------------------- */

/* The microkernel's tiles hold each weight row's tokens side by side (tile[r * TP + t]); the outputs want each
 * token's rows. by_token[t * WB8 + r] = tile[r * TP + t] for r < rows, t < cols, in whole 8 x 8 blocks (a tile's
 * padding rows and lanes are moved too, never stored further), with AVX2 transposed in registers: the scalar
 * gather it replaced kept linear's and the ffn's own time at 3.2% and 4.4% of the bench model's perf samples
 * (now 1.2% and 2.1%). */
static void tile_by_token(const float *tile, int64_t rows, int64_t cols, float *by_token) {
    for (int64_t r0 = 0; r0 < rows; r0 += 8)
        for (int64_t t0 = 0; t0 < cols; t0 += 8) {
#ifdef SIMD8
            __m256 x[8];
            for (int i = 0; i < 8; i++) x[i] = _mm256_loadu_ps(tile + (r0 + i) * TP + t0);
            transpose8(x);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(by_token + (t0 + i) * WB8 + r0, x[i]);
#else
            for (int64_t t = t0; t < t0 + 8; t++)
                for (int64_t r = r0; r < r0 + 8; r++) by_token[t * WB8 + r] = tile[r * TP + t];
#endif
        }
}

/* A token's outputs of a block of `rows` weight rows: a whole block's constant size is copied inline (a libc
 * memcpy call, which GCC also makes of a copy loop, cost more than the copy). */
static inline void copy_rows(float *dst, const float *src, int64_t rows) {
    if (rows == WB8) memcpy(dst, src, WB8 * sizeof(float));
    else memcpy(dst, src, (size_t)rows * sizeof(float));
}

/* Whether rows of k values split into this type's blocks and the activations' 32-value blocks. */
static int k_fits(int type, int64_t k) { return k % QB == 0 && k % dg_block_size(type) == 0; }

/* micro8 on the first `rows` rows of w (as many R8-row panels as they need) against the `cols` tokens of the
 * panel at `base`: tile[r * TP + t] for r < rows rounded up to R8, t < cols. BF16: RB16 rows and every token. */
static void micro8_block(int type, const rows8 *w, int64_t rows, int64_t nb, const uint8_t *base, int64_t cols,
                         float *tile) {
    if (BF16_SET && type == T_BF16) {
        for (int q = 0; q * RB16 < rows; q++)
            dot_bf16(w->raw + q * RB16, RB16, nb * QB / 2, base, TP * 4, tile + q * RB16 * TP);
        return;
    }
    const panel8 p = panel_at((uint8_t *)base, nb);
    for (int q = 0; q * R8 < rows; q++) micro8(type, w, q * R8, nb, p, tile + q * R8 * TP, cols);
}

static int SFX8(linear)(const float *a, int64_t m, int64_t k, int type, const uint8_t *w, int64_t row_bytes, float ts,
                        int64_t n, float *c) {
    if (!SFX8(supports)(type) || !k_fits(type, k)) return DG_E_TYPE;
    if (m <= 0 || n <= 0) return 0;
    const int64_t nb = k / QB, mp = (m + TP - 1) / TP, nwb = (n + WB8 - 1) / WB8;
    const size_t pb = panel_bytes(type, nb);
    uint8_t *act = alloc8(pb * (size_t)mp);
    if (!act) return DG_E_NOMEM;
    int failed = 0;
#pragma omp parallel num_threads(NT8)
    {
#pragma omp for schedule(static)
        for (int64_t p = 0; p < mp; p++)
            pack_panel(type, a, k, NULL, p * TP, m - p * TP < TP ? m - p * TP : TP, act + p * pb);
        rows8 wr;
        float tile[WB8 * TP] = {0}, by_token[TP * WB8]; /* zeros: tile_by_token moves whole 8 x 8 blocks */
        if (!rows8_alloc(&wr, k, WB8)) failed = 1;
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
        for (int64_t jb = 0; jb < nwb; jb++) {
            if (failed) continue;
            const int64_t j0 = jb * WB8, rows = n - j0 < WB8 ? n - j0 : WB8;
            rows8_decode(&wr, type, w, row_bytes, k, ts, j0, rows);
            for (int64_t p = 0; p < mp; p++) {
                const int64_t i0 = p * TP, cols = m - i0 < TP ? m - i0 : TP;
                micro8_block(type, &wr, rows, nb, act + p * pb, cols, tile);
                tile_by_token(tile, rows, cols, by_token);
                for (int64_t i = 0; i < cols; i++)
                    copy_rows(c + (i0 + i) * n + j0, by_token + i * WB8, rows);
            }
        }
        rows8_free(&wr);
    }
    free(act);
    return failed ? DG_E_NOMEM : 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * ffn — dg_ffn (dense gated MLP and mixture of experts) in the integer arithmetic above, per (token t, slot s),
 * e = index[t, s]:  h = gelu_tanh(gate_e @ x_t) * (up_e @ x_t);  out[t] += weights[t, s] * (down_e @ h).
 * As the float kernel: tokens grouped per expert; phase 1 splits (expert, block of WB8 gate/up rows) over threads
 * and writes h per grouped token; h is quantized per token; phase 2 splits blocks of WB8 output columns (each
 * thread owns those columns of `out` for every expert: race-free, experts added in ascending order). Blocks of
 * WB8 rows, as in linear, so each token's row of h or `out` is written WB8 values at a time.
 * ------------------------------------------------------------------------------------------------------------- */

/* tile = gelu_tanh(tile) * up over micro8_block's tiles of `rows` rows and `cols` tokens, with the float kernels'
 * vector tanh: libm's scalar tanhf took a sixth of a decoder pass on the bench model. */
static void gelu_mul_tile(float *tile, const float *up, int64_t rows, int64_t cols) {
    const int64_t lanes = cols <= 8 ? 8 : TP; /* what micro8 wrote (a multiple of VL) */
    for (int64_t r = 0; r < (rows + R8 - 1) / R8 * R8; r++)
        for (int64_t i = r * TP; i < r * TP + lanes; i += VL) st(tile + i, vgelu_mul(ld(tile + i), ld(up + i)));
}

static int SFX8(ffn)(const float *x, int64_t n, int64_t hidden, int64_t inter, const int64_t *index,
                     const float *weights, int64_t top_k, int64_t n_experts, int gt, const uint8_t *gw, int64_t grb,
                     int64_t gstride, float gts, int ut, const uint8_t *uw, int64_t urb, int64_t ustride, float uts,
                     int dt, const uint8_t *dw, int64_t drb, int64_t dstride, float dts, float *out) {
    if (!SFX8(supports)(gt) || !SFX8(supports)(ut) || !SFX8(supports)(dt) || !k_fits(gt, hidden) ||
        !k_fits(ut, hidden) || !k_fits(dt, inter))
        return DG_E_TYPE;
    memset(out, 0, (size_t)(n * hidden) * sizeof(float));
    if (n <= 0) return 0;
    const int64_t ne = index ? n_experts : 1, slots = index ? top_k : 1;
    dg_groups grp;
    int rc = dg_group_experts(index, weights, n, slots, ne, TP, &grp);
    if (rc) return rc;
    const int64_t np_ = grp.panel0[ne], nbh = hidden / QB, nbi = inter / QB;
    const int same = gt == ut;
    const size_t pg = panel_bytes(gt, nbh), pu = panel_bytes(ut, nbh), pd = panel_bytes(dt, nbi);
    uint8_t *xg = alloc8(pg * (size_t)np_), *xu = same ? xg : alloc8(pu * (size_t)np_), *hq = alloc8(pd * (size_t)np_);
    float *h = alloc8((size_t)(grp.start[ne] + 1) * (size_t)inter * sizeof(float));
    if (!xg || !xu || !hq || !h) {
        rc = DG_E_NOMEM;
        goto done;
    }
    const int64_t ib = (inter + WB8 - 1) / WB8, hb = (hidden + WB8 - 1) / WB8;
    int failed = 0;
#pragma omp parallel num_threads(NT8)
    {
        rows8 wg, wu;
        float tg[WB8 * TP] = {0}, tu[WB8 * TP], by_token[TP * WB8];
        /* both, so that both get freed */
        const int ok_g = rows8_alloc(&wg, hidden, WB8), ok_u = rows8_alloc(&wu, hidden, WB8);
        if (!ok_g || !ok_u) failed = 1;
        /* every expert panel's inputs, quantized for the gate's (and the up's) kind */
#pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < np_; p++) {
            const int64_t e = dg_panel_expert(&grp, ne, p), c0 = (p - grp.panel0[e]) * TP;
            const int64_t cols = grp.count[e] - c0 < TP ? grp.count[e] - c0 : TP;
            pack_panel(gt, x, hidden, grp.tok, grp.start[e] + c0, cols, xg + p * pg);
            if (!same) pack_panel(ut, x, hidden, grp.tok, grp.start[e] + c0, cols, xu + p * pu);
        }
        /* phase 1: h = gelu(gate @ x) * (up @ x) per expert and block of WB8 hidden units */
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < ne * ib; item++) {
            const int64_t e = item / ib, j0 = (item % ib) * WB8, rows = inter - j0 < WB8 ? inter - j0 : WB8;
            if (failed || grp.count[e] == 0) continue;
            rows8_decode(&wg, gt, gw + e * gstride, grb, hidden, gts, j0, rows);
            rows8_decode(&wu, ut, uw + e * ustride, urb, hidden, uts, j0, rows);
            for (int64_t p = grp.panel0[e]; p < grp.panel0[e + 1]; p++) {
                const int64_t c0 = (p - grp.panel0[e]) * TP, cols = grp.count[e] - c0 < TP ? grp.count[e] - c0 : TP;
                micro8_block(gt, &wg, rows, nbh, xg + p * pg, cols, tg);
                micro8_block(ut, &wu, rows, nbh, xu + p * pu, cols, tu);
                gelu_mul_tile(tg, tu, rows, cols);
                tile_by_token(tg, rows, cols, by_token);
                for (int64_t c = 0; c < cols; c++)
                    copy_rows(h + (grp.start[e] + c0 + c) * inter + j0, by_token + c * WB8, rows);
            }
        }
        /* h quantized per grouped token, for the down projection's kind */
#pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < np_; p++) {
            const int64_t e = dg_panel_expert(&grp, ne, p), c0 = (p - grp.panel0[e]) * TP;
            const int64_t cols = grp.count[e] - c0 < TP ? grp.count[e] - c0 : TP;
            pack_panel(dt, h, inter, NULL, grp.start[e] + c0, cols, hq + p * pd);
        }
        rows8_free(&wg), rows8_free(&wu);
        rows8 wd;
        float td[WB8 * TP] = {0};
        if (!rows8_alloc(&wd, inter, WB8)) failed = 1;
#pragma omp barrier
        /* phase 2: out[t, j0:j0+WB8] += w * (down @ h), experts in ascending order */
#pragma omp for schedule(dynamic, 1)
        for (int64_t jb = 0; jb < hb; jb++) {
            if (failed) continue;
            const int64_t j0 = jb * WB8, rows = hidden - j0 < WB8 ? hidden - j0 : WB8;
            for (int64_t e = 0; e < ne; e++) {
                if (grp.count[e] == 0) continue;
                rows8_decode(&wd, dt, dw + e * dstride, drb, inter, dts, j0, rows);
                for (int64_t p = grp.panel0[e]; p < grp.panel0[e + 1]; p++) {
                    const int64_t c0 = (p - grp.panel0[e]) * TP, cols = grp.count[e] - c0 < TP ? grp.count[e] - c0 : TP;
                    micro8_block(dt, &wd, rows, nbi, hq + p * pd, cols, td);
                    tile_by_token(td, rows, cols, by_token);
                    for (int64_t c = 0; c < cols; c++) {
                        float *dst = out + grp.tok[grp.start[e] + c0 + c] * hidden + j0;
                        const float wc = grp.wt[grp.start[e] + c0 + c], *src = by_token + c * WB8;
                        for (int64_t r = 0; r < rows; r++) dst[r] += src[r] * wc;
                    }
                }
            }
        }
        rows8_free(&wd);
    }
    if (failed) rc = DG_E_NOMEM;
done:
    dg_groups_free(&grp), free(xg), free(hq), free(h);
    if (!same) free(xu);
    return rc;
}

/* ---------------------------------------------------------------------------------------------------------------
 * soft_embed — the dense rows (path[i] < 0) of dg_soft_embed, c[i, :] = scale * softmax(x[i]) @ T, in integer
 * arithmetic; the float kernels have taken the sparse rows already. The contraction runs over the vocabulary, across
 * T's rows, whose ggml blocks run along them: so T is re-quantized along the vocabulary, a chunk of KC8 rows at a
 * time as it is needed (no copy of it is kept). Plain definition, per 32-value block b of the vocabulary:
 *   probabilities  e_j = exp(x[i, j] - row_max[i]) (the float kernels' vexp): dp = max e / PMAX,
 *                  p_j = rint(e_j / dp) in 0..PMAX
 *   table          t[j, c] decoded (decode_codes: s u - o), per column c: dt = max|t| / 127,
 *                  q_jc = rint(t[j, c] / dt) in -127..127
 *   c[i, c] = (scale / row_total[i]) * sum over b of (dt_bc * dp_ib) * I,   I = sum_{j in b} p_j q_jc (exact int32)
 * The probabilities are the unsigned operand (vpmaddubsw / vpdpbusd; SDOT takes them as signed, all < 128).
 * PMAX 31 lets AVX2 add 4 vpmaddubsw results in int16 (4 * 2 * 31 * 127 < 2^15) and widen once per 16 values:
 * against PMAX 127, which must widen every result, the microkernel runs at 88 against 46 GMAC/s on a Zen 3 core
 * (the float one: ~43). What the coarser codes cost: on the bench model's q4_k_m file the soft embedding moves
 * from the f32 file's by 0.86% against the float path's 0.71% (PMAX 127: 0.75%). Every kernel set uses the same
 * codes, so they all compute the same sums. Threads take chunks of the vocabulary in order and keep private
 * partials, summed in thread order (as the float kernel: the same bits for a given thread count).
 * The microkernel keeps RS rows x 16 columns: columns are the vector lanes, each lane's 4 bytes the codes of 4
 * consecutive vocabulary rows of its column, times 4 probabilities of one row broadcast to every lane.
 * ------------------------------------------------------------------------------------------------------------- */

#define KC8 1024 /* vocabulary rows re-quantized at once: a thread's chunk is n * KC8 bytes of codes */
#define PMAX 31  /* the probabilities' largest code */
#define CHAIN 4  /* AVX2: vpmaddubsw pair sums added in int16 before widening, a block's 8 groups in two chains */
#define RS 4     /* probability rows per microkernel call */
#define CS 16    /* columns per microkernel call: two vectors of 8 (four of 4 on arm64) */
_Static_assert(CS == 16, "a BF16 table's columns are dot_bf16's 16 lanes");
_Static_assert(CHAIN * 2 * PMAX * 127 < 1 << 15, "soft_embed: the int16 chain overflows");

/* Rows t[0..32) ([32][n] floats, decoded) as codes tq[g][c][4] (group g: rows 4g..4g+3; g stride 4 n) and
 * scales dt[c]: each column's 32 values quantized as q8_block quantizes activations (amax / 127, rint, clamp). */
static void table_block8(const float *t, int64_t n, int8_t *tq, float *dt) {
    int64_t c0 = 0;
#ifdef SIMD8
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    /* packs leave each 128-bit lane's 16 bytes as [row j][column]: byte (4 c + j) comes from byte (4 j + c) */
    const __m256i to_columns = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                                0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (; c0 + 8 <= n; c0 += 8) {
        __m256 amax = _mm256_setzero_ps();
        for (int r = 0; r < 32; r++) amax = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(t + r * n + c0), magnitude), amax);
        const __m256 d = _mm256_div_ps(amax, _mm256_set1_ps(127.0f));
        const __m256 id = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), d),
                                        _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_NEQ_OQ));
        _mm256_storeu_ps(dt + c0, d);
        for (int g = 0; g < 8; g++) {
            __m256i q[4];
            for (int j = 0; j < 4; j++) {
                const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(t + (4 * g + j) * n + c0), id);
                const __m256 r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f)));
            }
            const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            _mm256_storeu_si256((__m256i *)(tq + g * 4 * n + 4 * c0), _mm256_shuffle_epi8(bytes, to_columns));
        }
    }
#endif
    for (int64_t c = c0; c < n; c++) { /* a column at a time: the activations' q8_block, which the loop above is */
        float column[32];
        int8_t q[32];
        int32_t lo, hi;
        for (int r = 0; r < 32; r++) column[r] = t[r * n + c];
        q8_block(column, q, dt + c, &lo, &hi);
        for (int r = 0; r < 32; r++) tq[(r / 4) * 4 * n + 4 * c + r % 4] = q[r];
    }
}

/* rint for 0 <= x < 2^22 in the default rounding mode (to nearest, ties to even): adding 1.5 * 2^23 leaves no
 * fraction bits, so the addition rounds x to an integer, and the subtraction is exact. */
static inline vf round_small(vf x) { return (x + 12582912.0f) - 12582912.0f; }

/* exp(x[j + l] - mx) for the VL lanes l, 0 past kn (the vocabulary's end: -inf, whose exp is 0). */
static inline vf exp_lanes(const float *x, float mx, int64_t j, int64_t kn) {
    if (j + VL <= kn) return vexp(ld(x + j) - mx);
    float tail[VL];
    for (int l = 0; l < VL; l++) tail[l] = j + l < kn ? x[j + l] - mx : -INFINITY;
    return vexp(ld(tail));
}

/* A row's probabilities over vocabulary rows [k0, k0 + kn) (kn <= KC8; zeros past kn, up to whole blocks) as
 * codes p[KC8] and scales dp[KC8 / 32]. */
static void prob_chunk8(const float *x, float mx, int64_t kn, uint8_t *p, float *dp) {
    for (int64_t j0 = 0; j0 < kn; j0 += 32) {
        vf e[32 / VL], amax = (vf){0};
        for (int v = 0; v < 32 / VL; v++) {
            e[v] = exp_lanes(x, mx, j0 + v * VL, kn);
            amax = vmax(amax, e[v]);
        }
        const float d = hmax(amax) / (float)PMAX, id = d != 0.0f ? 1.0f / d : 0.0f;
        dp[j0 / 32] = d;
        vi q[32 / VL]; /* e * id <= PMAX (rounding aside: the min keeps it there) */
        for (int v = 0; v < 32 / VL; v++) q[v] = __builtin_convertvector(vmin(round_small(e[v] * id), splat((float)PMAX)), vi);
#ifdef SIMD8 /* int32 -> uint8 with packs, which interleave 128-bit lanes: undone by the permutation */
        const __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32((__m256i)q[0], (__m256i)q[1]),
                                                  _mm256_packs_epi32((__m256i)q[2], (__m256i)q[3]));
        _mm256_storeu_si256((__m256i *)(p + j0), _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
        for (int v = 0; v < 32 / VL; v++)
            for (int l = 0; l < VL; l++) p[j0 + v * VL + l] = (uint8_t)q[v][l];
#endif
    }
}

/* tile[r][c] (r < RS, c < CS) = sum over blocks b < nb of (dt[b][c] * dp[r][b]) * I over rows p + r * KC8 (codes)
 * and columns tq + 4 c (group stride 4 n), dt at column 0 with block stride n. */
static void micro_soft8(const uint8_t *p, const float *dp, const int8_t *tq, const float *dt, int64_t n, int64_t nb,
                        float *tile) {
#ifdef SIMD8
    enum { NV = CS / 8 };
    __m256 f[RS][NV];
    for (int r = 0; r < RS; r++)
        for (int v = 0; v < NV; v++) f[r][v] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i acc[RS][NV];
        for (int r = 0; r < RS; r++)
            for (int v = 0; v < NV; v++) acc[r][v] = _mm256_setzero_si256();
#if defined(DG_INT8_AVX2)
        for (int g0 = 0; g0 < 8; g0 += CHAIN) { /* CHAIN vpmaddubsw pair sums added in int16, then widened */
            __m256i a16[RS][NV];
#pragma GCC unroll 8
            for (int g = g0; g < g0 + CHAIN; g++) {
                const int8_t *col = tq + (b * 8 + g) * 4 * n;
                __m256i tv[NV];
                for (int v = 0; v < NV; v++) tv[v] = _mm256_loadu_si256((const __m256i *)(col + 32 * v));
                for (int r = 0; r < RS; r++) {
                    const __m256i w = bcast4(p + r * KC8 + b * 32 + 4 * g);
                    for (int v = 0; v < NV; v++) {
                        const __m256i m = _mm256_maddubs_epi16(w, tv[v]);
                        a16[r][v] = in_order(g == g0 ? m : _mm256_add_epi16(a16[r][v], m));
                    }
                }
            }
            for (int r = 0; r < RS; r++)
                for (int v = 0; v < NV; v++)
                    acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(a16[r][v], _mm256_set1_epi16(1)));
        }
#else
        for (int g = 0; g < 8; g++) {
            const int8_t *col = tq + (b * 8 + g) * 4 * n;
            __m256i tv[NV];
            for (int v = 0; v < NV; v++) tv[v] = _mm256_loadu_si256((const __m256i *)(col + 32 * v));
            for (int r = 0; r < RS; r++) {
                const __m256i w = bcast4(p + r * KC8 + b * 32 + 4 * g);
                for (int v = 0; v < NV; v++)
#if defined(DG_INT8_AVX512VNNI)
                    acc[r][v] = _mm256_dpbusd_epi32(acc[r][v], w, tv[v]);
#else
                    acc[r][v] = _mm256_dpbusd_avx_epi32(acc[r][v], w, tv[v]);
#endif
            }
        }
#endif
        for (int v = 0; v < NV; v++) {
            const __m256 d = _mm256_loadu_ps(dt + b * n + 8 * v);
            for (int r = 0; r < RS; r++)
                f[r][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][v]),
                                          _mm256_mul_ps(d, _mm256_set1_ps(dp[r * (KC8 / 32) + b])), f[r][v]);
        }
    }
    for (int r = 0; r < RS; r++)
        for (int v = 0; v < NV; v++) _mm256_storeu_ps(tile + r * CS + 8 * v, f[r][v]);
#elif defined(NEON8)
    enum { NV = CS / 4 };
    float32x4_t f[RS][NV];
    for (int r = 0; r < RS; r++)
        for (int v = 0; v < NV; v++) f[r][v] = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < nb; b++) {
        int32x4_t acc[RS][NV];
        for (int r = 0; r < RS; r++)
            for (int v = 0; v < NV; v++) acc[r][v] = vdupq_n_s32(0);
        for (int g = 0; g < 8; g++) {
            const int8_t *col = tq + (b * 8 + g) * 4 * n;
            int8x16_t tv[NV];
            for (int v = 0; v < NV; v++) tv[v] = vld1q_s8(col + 16 * v);
            for (int r = 0; r < RS; r++) {
                uint32_t w4;
                memcpy(&w4, p + r * KC8 + b * 32 + 4 * g, 4);
                for (int v = 0; v < NV; v++) acc[r][v] = dot4(acc[r][v], w4, tv[v]);
            }
        }
        for (int v = 0; v < NV; v++) {
            const float32x4_t d = vld1q_f32(dt + b * n + 4 * v);
            for (int r = 0; r < RS; r++)
                f[r][v] = vfmaq_f32(f[r][v], vcvtq_f32_s32(acc[r][v]), vmulq_f32(d, vdupq_n_f32(dp[r * (KC8 / 32) + b])));
        }
    }
    for (int r = 0; r < RS; r++)
        for (int v = 0; v < NV; v++) vst1q_f32(tile + r * CS + 4 * v, f[r][v]);
#else
    for (int r = 0; r < RS; r++)
        for (int c = 0; c < CS; c++) {
            float f = 0;
            for (int64_t b = 0; b < nb; b++) {
                int32_t acc = 0;
                for (int j = 0; j < 32; j++) acc += (int32_t)p[r * KC8 + b * 32 + j] * tq[(b * 8 + j / 4) * 4 * n + 4 * c + j % 4];
                f = fmaf((float)acc, dt[b * n + c] * dp[r * (KC8 / 32) + b], f);
            }
            tile[r * CS + c] = f;
        }
#endif
}

/* decode_codes' values as floats, per 16: s u - o, or s (u - ratio) where o = ratio s. Either has one rounding
 * at most, so contraction into FMA cannot change it: s u is exact where o is free (Q4_K, Q5_K, Q5_1: a float16
 * times small integers), and u - ratio is exact (NVFP4's s, its tensor scale folded in, makes s u inexact). */
static void codes_to_floats(const uint8_t *u, const float *s, const float *o, float ratio, int64_t n, float *y) {
    for (int64_t j = 0; j < n; j += VL) {
#ifdef SIMD8 /* (GCC makes a lane-by-lane conversion of the vector extension's byte-to-float conversion) */
        const vf uf = (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(u + j))));
#else
        vf uf;
        for (int l = 0; l < VL; l++) uf[l] = (float)u[j + l];
#endif
        st(y + j, ratio != 0.0f ? splat(s[j / 16]) * (uf - ratio) : splat(s[j / 16]) * uf - splat(o[j / 16]));
    }
}

/* A BF16 table's rows [k0, k0 + kn) as pairs per column, tp[g][c][2] = rows 2g and 2g + 1 of column c, for g <
 * np (zeros past kn); and a row's probabilities exp(x - mx) over them rounded to bf16, pb[2 np] (zeros past kn).
 * The soft embedding of a BF16 table is then dot_bf16 with the columns as lanes: bf16 probabilities (the
 * activations' rounding), products summed in float32 per pair of rows, in order. */
static inline void table_pairs_bf16(const uint8_t *t, int64_t row_bytes, int64_t kn, int64_t n, int64_t np,
                                    uint16_t *tp) {
    for (int64_t j = 0; j < 2 * np; j++) {
        const uint16_t *row = j < kn ? (const uint16_t *)(t + j * row_bytes) : NULL;
        for (int64_t c = 0; c < n; c++) tp[(j / 2 * n + c) * 2 + j % 2] = row ? row[c] : 0;
    }
}

static inline void prob_bf16(const float *x, float mx, int64_t kn, int64_t np, uint16_t *pb) {
    for (int64_t j = 0; j < 2 * np; j += VL) {
        const vf e = exp_lanes(x, mx, j, kn);
        for (int l = 0; l < VL; l++) pb[j + l] = bf16_round(e[l]);
    }
}

static int SFX8(soft_embed)(const float *x, int64_t rows, int64_t vocab, const float *row_max, const float *row_total,
                            const int64_t *path, int type, const uint8_t *t, int64_t row_bytes, float ts, int64_t n,
                            float scale, float *c) {
    if (!SFX8(supports)(type) || n % 32) return DG_E_TYPE;
    int64_t *dense;
    const int64_t m = dg_dense_rows(path, rows, &dense);
    if (m <= 0) return m < 0 ? DG_E_NOMEM : 0;
    const int nt = NT8, bf16 = BF16_SET && type == T_BF16, wide = bf16 ? 2 : 1; /* bytes a table or row value */
    const int64_t nkc = (vocab + KC8 - 1) / KC8, mpad = (m + RS - 1) / RS * RS;
    float **parts = calloc((size_t)nt, sizeof(float *));
    int team = 1, failed = !parts;
#pragma omp parallel num_threads(nt) if (!failed)
    {
        const int tid = TID8;
        if (tid == 0) team = TEAM8;
        float *part = parts ? parts[tid] = calloc((size_t)(m * n), sizeof(float)) : NULL;
        const size_t i8 = !bf16; /* the int8 path's own buffers: none for BF16 */
        int8_t *tq = alloc8((size_t)(n * KC8 * wide));
        float *dt = alloc8(i8 * (size_t)(n * (KC8 / 32)) * sizeof(float));
        float *tb = alloc8(i8 * (size_t)(32 * n) * sizeof(float));
        uint8_t *pq = alloc8((size_t)(mpad * KC8 * wide)), *u = alloc8(i8 * (size_t)n);
        float *dp = alloc8(i8 * (size_t)(mpad * (KC8 / 32)) * sizeof(float));
        float *s = alloc8(i8 * (size_t)(n / 16) * sizeof(float)), *o = alloc8(i8 * (size_t)(n / 16) * sizeof(float));
        if (!part || !tq || !dt || !tb || !pq || !u || !dp || !s || !o) failed = 1;
        else memset(pq, 0, (size_t)(mpad * KC8 * wide)), memset(dp, 0, i8 * (size_t)(mpad * (KC8 / 32)) * 4);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t kc = 0; kc < nkc; kc++) {
            if (failed) continue;
            const int64_t k0 = kc * KC8, kn = vocab - k0 < KC8 ? vocab - k0 : KC8, nb = (kn + 31) / 32;
            if (bf16) {
                table_pairs_bf16(t + k0 * row_bytes, row_bytes, kn, n, nb * 16, (uint16_t *)tq);
                for (int64_t i = 0; i < m; i++)
                    prob_bf16(x + dense[i] * vocab + k0, row_max[dense[i]], kn, nb * 16, (uint16_t *)pq + i * KC8);
            } else {
                /* the table's rows, decoded 32 at a time (zeros past the vocabulary) */
                for (int64_t b = 0; b < nb; b++) {
                    for (int64_t r = 0; r < 32; r++) {
                        float *y = tb + r * n;
                        if (b * 32 + r >= kn) {
                            memset(y, 0, (size_t)n * sizeof(float));
                            continue;
                        }
                        decode_codes(type, t + (k0 + b * 32 + r) * row_bytes, n, ts, u, s, o, NULL, NULL);
                        codes_to_floats(u, s, o, kind_of(type).ratio, n, y);
                    }
                    table_block8(tb, n, tq + b * 8 * 4 * n, dt + b * n);
                }
                for (int64_t i = 0; i < m; i++)
                    prob_chunk8(x + dense[i] * vocab + k0, row_max[dense[i]], kn, pq + i * KC8, dp + i * (KC8 / 32));
            }
            for (int64_t c0 = 0; c0 < n; c0 += CS)
                for (int64_t i0 = 0; i0 < m; i0 += RS) {
                    float tile[RS * CS];
                    if (bf16) {
                        const uint8_t *prow[RS];
                        for (int r = 0; r < RS; r++) prow[r] = pq + (i0 + r) * KC8 * 2;
                        dot_bf16(prow, RS, nb * 16, (const uint8_t *)tq + c0 * 4, n * 4, tile);
                    } else {
                        micro_soft8(pq + i0 * KC8, dp + i0 * (KC8 / 32), tq + 4 * c0, dt + c0, n, nb, tile);
                    }
                    for (int64_t r = 0; r < RS && i0 + r < m; r++) {
                        float *dst = part + (i0 + r) * n + c0;
                        for (int j = 0; j < CS; j++) dst[j] += tile[r * CS + j];
                    }
                }
        }
        free(tq), free(dt), free(tb), free(pq), free(u), free(dp), free(s), free(o);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
            if (failed) continue;
            const float f = scale / row_total[dense[i]];
            float *out = c + dense[i] * n;
            for (int64_t j = 0; j < n; j++) {
                float sum = 0;
                for (int q = 0; q < team; q++) sum += parts[q][i * n + j];
                out[j] = sum * f;
            }
        }
    }
    if (parts)
        for (int q = 0; q < nt; q++) free(parts[q]);
    free(parts), free(dense);
    return failed ? DG_E_NOMEM : 0;
}

const dg_int8_set SFX8(dg_int8) = {NAME8, SFX8(supports), SFX8(q8_quantize), SFX8(codes), SFX8(linear), SFX8(ffn),
                                   SFX8(soft_embed)};
