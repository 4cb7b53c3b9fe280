/* dgrun CPU kernels, one instruction set per compilation: build.py compiles this file once per kernel set
 * (-DDG_ISA_AVX512 with -mavx512f..., -DDG_ISA_AVX2 with -mavx2 -mfma, and plain for "generic"), and
 * dg_cpu.c picks one at run time, so the library runs on any CPU of its architecture.
 *
 * The code is written with GCC/Clang vector extensions (`vf` is VL floats), so one source serves every width.
 * Everything that multiplies matrices goes through one register-tiled microkernel:
 *
 *     tile[r][c] = sum_k s[r * ls + k] * v[k * lv + c]        r < R rows, c < TW = 2 * VL columns
 *
 * `s` is read one scalar at a time (broadcast), `v` one vector at a time, so both are plain strided arrays:
 *   linear      s = weight rows (decoded to float32 in scratch, or the mmap itself for F32), v = activations
 *               packed transposed ([K][TW] per 2-vector panel of tokens): no weight is ever transposed;
 *   soft embed  s = probability rows, v = embedding rows (decoded) — the natural layout of both;
 *   attention   s = query rows / probability rows, v = transposed keys / value rows.
 * Drivers split the work over OpenMP threads by output panels, so no two threads write the same element.
 *
 * Each optimised kernel has its plain definition in the comment above it; the numpy backend is the oracle
 * (tests/test_cpu_backend.py checks every entry point against it, for every kernel set this CPU runs).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "dg_internal.h"
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#if defined(DG_ISA_AVX512)
#define VL 16
#define R 12 /* 12 x 2 zmm accumulators + 2 loads + 1 broadcast of 32 registers */
#define SFX(x) x##_avx512
#elif defined(DG_ISA_AVX2)
#define VL 8
#define R 6 /* 6 x 2 ymm accumulators of 16 registers */
#define SFX(x) x##_avx2
#else
#define VL 4
#if defined(__aarch64__)
#define R 12 /* NEON has 32 vector registers */
#else
#define R 6
#endif
#define SFX(x) x##_generic
#endif
#define TW (2 * VL) /* microkernel tile width */
#define KC 256      /* soft-embedding rows decoded at once: each output tile is added to its partial once per KC
                     * (against 128, tools/kernel_ab.py on the bench model: f32 table 2-3% faster, q4_k_m the same) */
#define ALIGN 64
/* Elementwise work below this many values runs on the calling thread: a parallel region costs more than it
 * saves there, and far more when another process holds a core (every thread must be scheduled to finish). */
#define SMALL (1 << 20)

#include "dg_vmath.h"

static inline float hsum(vf x) { float s = 0; for (int i = 0; i < VL; i++) s += x[i]; return s; }

#ifdef _OPENMP
#define NT (dg_nthreads > 0 ? dg_nthreads : 1)
#define TID omp_get_thread_num()
#define TEAM omp_get_num_threads() /* may be fewer than NT asked: OMP_THREAD_LIMIT, nested regions */
#else
#define NT 1
#define TID 0
#define TEAM 1
#endif

/* ---------------------------------------------------------------------------------------------------------------
 * Scratch memory: per-thread buffers that grow and are kept (OpenMP reuses its threads), so the hot loops never
 * allocate. Slot i of the calling thread holds at least `n` floats, 64-byte aligned.
 * ------------------------------------------------------------------------------------------------------------- */

enum { S_W0, S_W1, S_W2, S_TILE, S_PAD, S_SCORES, N_SLOTS };
static __thread float *scratch_ptr[N_SLOTS];
static __thread size_t scratch_cap[N_SLOTS];

static float *scratch(int slot, size_t n) {
    if (scratch_cap[slot] < n) {
        free(scratch_ptr[slot]);
        size_t bytes = (n * sizeof(float) + ALIGN - 1) / ALIGN * ALIGN;
        scratch_ptr[slot] = aligned_alloc(ALIGN, bytes);
        scratch_cap[slot] = scratch_ptr[slot] ? n : 0;
    }
    return scratch_ptr[slot];
}

static float *alloc_floats(size_t n) {
    size_t bytes = (n * sizeof(float) + ALIGN - 1) / ALIGN * ALIGN;
    return aligned_alloc(ALIGN, bytes ? bytes : ALIGN);
}

/* ---------------------------------------------------------------------------------------------------------------
 * Decoding one row of any supported type to float32. Bit-exact with gguf-py's dequantize (which mirrors ggml's
 * dequantize_row_*): every value is the same product, rounded once. In Q4_K the products d*sc, dmin*m and
 * d*sc*q are exact in float32, so even a fused multiply-add gives the same single rounding.
 * The block loops run on this kernel set's vectors (NVFP4's 8-value halves on 8-lane ones).
 * ------------------------------------------------------------------------------------------------------------- */

typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x8u __attribute__((vector_size(32), aligned(4)));

/* VL bytes widened to int32 lanes (compilers lower __builtin_convertvector from bytes poorly: intrinsics). */
static inline vi bytesv(const uint8_t *p) {
#if VL == 16
    return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif VL == 8 && defined(__AVX2__)
    return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    vi v;
    for (int i = 0; i < VL; i++) v[i] = p[i];
    return v;
#endif
}

/* 8 bytes widened to int32 lanes (a macro: an 8-lane value returned without AVX would change the ABI). */
#if defined(__AVX2__)
#define BYTES8(p) ((i32x8)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#else
#define BYTES8(p)                                                                                                   \
    ({                                                                                                              \
        i32x8 v_;                                                                                                   \
        for (int i_ = 0; i_ < 8; i_++) v_[i_] = (p)[i_];                                                            \
        v_;                                                                                                         \
    })
#endif

static inline void putv(float *y, vi q, float d) { st(y, __builtin_convertvector(q, vf) * d); }

static inline vi iota(int start) {
    vi v;
    for (int i = 0; i < VL; i++) v[i] = start + i;
    return v;
}

/* E2M1 code 0..15 → ggml's doubled value (kvalues_mxfp4: 0 1 2 3 4 6 8 12, codes 8-15 negative), arithmetically:
 * magnitude m < 4 is m, else (4 + 2 (m & 1)) << ((m >> 1) - 2). */
#define E2M1X2(T, q)                                                                                                \
    ({                                                                                                              \
        T m_ = (q) & 7, small_ = m_ < 4, sh_ = ((m_ >> 1) - 2) & ~small_;                                           \
        T v_ = (m_ & small_) | (((4 + 2 * (m_ & 1)) << sh_) & ~small_), neg_ = -(((q) >> 3) & 1);                   \
        (v_ ^ neg_) - neg_;                                                                                         \
    })

#include "dg_quants_iq.h"

static void decode_row(int type, const uint8_t *restrict row, int64_t cols, float ts, float *restrict y) {
    switch (type) {
    case T_F32:
        memcpy(y, row, (size_t)cols * 4);
        break;
    case T_F16: {
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= cols; i += 16) _mm512_storeu_ps(y + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 2 * i))));
#elif defined(__F16C__)
        for (; i + 8 <= cols; i += 8) _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i))));
#endif
        for (; i < cols; i++) y[i] = dg_fp16((uint16_t)(row[2 * i] | (row[2 * i + 1] << 8)));
        break;
    }
    case T_BF16:
        for (int64_t i = 0; i < cols; i++) y[i] = dg_bits_f32((uint32_t)(row[2 * i] | (row[2 * i + 1] << 8)) << 16);
        break;
    case T_Q8_0:
        for (int64_t b = 0; b < cols / 32; b++, row += 34, y += 32) {
            const float d = dg_rd_fp16(row);
            const int8_t *q = (const int8_t *)(row + 2);
            for (int j = 0; j < 32; j++) y[j] = (float)q[j] * d;
        }
        break;
    case T_Q4_0:
        for (int64_t b = 0; b < cols / 32; b++, row += 18, y += 32) {
            const float d = dg_rd_fp16(row);
            for (int c = 0; c < 16; c += VL) {
                const vi q = bytesv(row + 2 + c);
                putv(y + c, (q & 15) - 8, d);
                putv(y + 16 + c, (q >> 4) - 8, d);
            }
        }
        break;
    case T_Q5_0:
        for (int64_t b = 0; b < cols / 32; b++, row += 22, y += 32) {
            const float d = dg_rd_fp16(row);
            uint32_t qh;
            memcpy(&qh, row + 2, 4); /* little-endian hosts only, like ggml; bit j is the fifth bit of value j */
            const vi h = (vi){0} + (int32_t)qh;
            for (int c = 0; c < 16; c += VL) {
                const vi q = bytesv(row + 6 + c), lane = iota(c);
                putv(y + c, ((q & 15) | (((h >> lane) & 1) << 4)) - 16, d);
                putv(y + 16 + c, ((q >> 4) | (((h >> (lane + 16)) & 1) << 4)) - 16, d);
            }
        }
        break;
    case T_MXFP4:
        for (int64_t b = 0; b < cols / 32; b++, row += 17, y += 32) {
            const float d = dg_e8m0_half(row[0]);
            for (int c = 0; c < 16; c += VL) {
                const vi q = bytesv(row + 1 + c);
                putv(y + c, E2M1X2(vi, q & 15), d);
                putv(y + 16 + c, E2M1X2(vi, q >> 4), d);
            }
        }
        break;
    case T_NVFP4: /* the tensor scale multiplies each decoded value, as quants.dequantize_tensor does */
        for (int64_t b = 0; b < cols / 64; b++, row += 36, y += 64) {
            for (int s = 0; s < 4; s++) {
                const float d = dg_ue4m3_half(row[s]);
                const i32x8 q = BYTES8(row + 4 + 8 * s);
                *(f32x8u *)(y + 16 * s) = __builtin_convertvector(E2M1X2(i32x8, q & 15), f32x8) * d * ts;
                *(f32x8u *)(y + 16 * s + 8) = __builtin_convertvector(E2M1X2(i32x8, q >> 4), f32x8) * d * ts;
            }
        }
        break;
    case T_Q4_K:
        for (int64_t b = 0; b < cols / 256; b++, row += 144) {
            const float d = dg_rd_fp16(row), dmin = dg_rd_fp16(row + 2);
            const uint8_t *sc = row + 4, *q = row + 16;
            for (int is = 0; is < 8; is += 2, q += 32) {
                float dl[2], ml[2];
                for (int h = 0; h < 2; h++) {
                    int s, m;
                    dg_scale_min_k4(sc, is + h, &s, &m);
                    dl[h] = d * (float)s;
                    ml[h] = dmin * (float)m;
                }
                for (int l = 0; l < 32; l++) y[l] = dl[0] * (float)(q[l] & 0xF) - ml[0];
                for (int l = 0; l < 32; l++) y[l + 32] = dl[1] * (float)(q[l] >> 4) - ml[1];
                y += 64;
            }
        }
        break;
    case T_Q6_K:
        for (int64_t b = 0; b < cols / 256; b++, row += 210) {
            const float d = dg_rd_fp16(row + 208);
            const uint8_t *ql = row, *qh = row + 128;
            const int8_t *sc = (const int8_t *)(row + 192);
            for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8, y += 128) {
                for (int l = 0; l < 32; l += VL) { /* values l..l+15 of each quarter share one scale */
                    const int is = l / 16;
                    const vi a = bytesv(ql + l), c = bytesv(ql + l + 32), h = bytesv(qh + l);
                    putv(y + l, ((a & 15) | ((h & 3) << 4)) - 32, d * (float)sc[is]);
                    putv(y + l + 32, ((c & 15) | (((h >> 2) & 3) << 4)) - 32, d * (float)sc[is + 2]);
                    putv(y + l + 64, ((a >> 4) | (((h >> 4) & 3) << 4)) - 32, d * (float)sc[is + 4]);
                    putv(y + l + 96, ((c >> 4) | (((h >> 6) & 3) << 4)) - 32, d * (float)sc[is + 6]);
                }
            }
        }
        break;
    default: /* the types read from llama-quantize's files */
        decode_row_iq(type, row, cols, y);
        break;
    }
}

static int type_ok(int type, int64_t cols, int64_t row_bytes) {
    int bs = dg_block_size(type);
    return bs > 0 && cols % bs == 0 && row_bytes == cols / bs * dg_type_size(type);
}

/* Rows [r0, r0 + nrows) of W (any type) as R float32 rows of `cols` values (zero rows after nrows) for the
 * microkernel: decoded into `buf`, or straight from W when it is F32 and needs no padding. */
static const float *weight_rows(int type, const uint8_t *w, int64_t row_bytes, int64_t cols, float ts, int64_t r0,
                                int64_t nrows, float *buf, int64_t *ls) {
    if (type == T_F32 && nrows == R) {
        *ls = cols;
        return (const float *)(w + r0 * row_bytes);
    }
    for (int64_t r = 0; r < nrows; r++) decode_row(type, w + (r0 + r) * row_bytes, cols, ts, buf + r * cols);
    memset(buf + nrows * cols, 0, (size_t)((R - nrows) * cols) * sizeof(float));
    *ls = cols;
    return buf;
}

/* ---------------------------------------------------------------------------------------------------------------
 * The microkernel. Plain definition:
 *     for r < R, c < TW:  tile[r * TW + c] = sum_{k < K} s[r * ls + k] * v[k * lv + c]
 * R x 2 vector accumulators stay in registers; per k: two vector loads of v, R broadcasts of s.
 * ------------------------------------------------------------------------------------------------------------- */

static void micro(const float *restrict s, int64_t ls, const float *restrict v, int64_t lv, int64_t K,
                  float *restrict tile) {
    vf acc[R][2];
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = (vf){0};
    for (int64_t k = 0; k < K; k++) {
        const vf v0 = ld(v + k * lv), v1 = ld(v + k * lv + VL);
#pragma GCC unroll 16
        for (int r = 0; r < R; r++) {
            const vf a = splat(s[r * ls + k]);
            acc[r][0] += a * v0;
            acc[r][1] += a * v1;
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) {
        st(tile + r * TW, acc[r][0]);
        st(tile + r * TW + VL, acc[r][1]);
    }
}

/* The same with one vector of v (columns c < VL of the tile): for a last panel of at most VL valid columns. */
static void micro1(const float *restrict s, int64_t ls, const float *restrict v, int64_t lv, int64_t K,
                   float *restrict tile) {
    vf acc[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) acc[r] = (vf){0};
    for (int64_t k = 0; k < K; k++) {
        const vf v0 = ld(v + k * lv);
#pragma GCC unroll 16
        for (int r = 0; r < R; r++) acc[r] += splat(s[r * ls + k]) * v0;
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) st(tile + r * TW, acc[r]);
}

/* micro or micro1, by how many of the tile's columns are wanted. */
static inline void micro_cols(const float *restrict s, int64_t ls, const float *restrict v, int64_t lv, int64_t K,
                              float *restrict tile, int64_t cols) {
    if (cols <= VL)
        micro1(s, ls, v, lv, K, tile);
    else
        micro(s, ls, v, lv, K, tile);
}

/* Activations a [m, k] packed for the microkernel: panel p holds rows p*TW.. as [k][TW], zero-padded. */
static void pack_panel(const float *a, int64_t m, int64_t k, int64_t p, float *restrict dst) {
    int64_t r0 = p * TW, rows = m - r0 < TW ? m - r0 : TW;
    if (rows < TW) memset(dst, 0, (size_t)(k * TW) * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
        const float *src = a + (r0 + r) * k;
        for (int64_t j = 0; j < k; j++) dst[j * TW + r] = src[j];
    }
}

/* ---------------------------------------------------------------------------------------------------------------
 * dequant_rows — plain definition: out[i, :] = decode(w[idx[i], :]) * out_scale
 * ------------------------------------------------------------------------------------------------------------- */

static int SFX(dequant_rows)(int type, const uint8_t *w, int64_t row_bytes, int64_t cols, float ts,
                             const int64_t *idx, int64_t n, float out_scale, float *out) {
    if (!type_ok(type, cols, row_bytes)) return DG_E_TYPE;
#pragma omp parallel for num_threads(NT) schedule(static) if (n * cols > SMALL)
    for (int64_t i = 0; i < n; i++) {
        float *y = out + i * cols;
        decode_row(type, w + (idx ? idx[i] : i) * row_bytes, cols, ts, y);
        if (out_scale != 1.0f)
            for (int64_t j = 0; j < cols; j++) y[j] *= out_scale;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * linear — plain definition: c[i, j] = sum_k a[i, k] * w[j, k]
 * Threads take panels of R weight rows; each decodes its panel once and runs it against every token panel.
 * ------------------------------------------------------------------------------------------------------------- */

static int SFX(linear)(const float *a, int64_t m, int64_t k, int type, const uint8_t *w, int64_t row_bytes,
                       float ts, int64_t n, float *c) {
    if (!type_ok(type, k, row_bytes)) return DG_E_TYPE;
    if (m <= 0 || n <= 0) return 0;
    const int64_t mp = (m + TW - 1) / TW, np_ = (n + R - 1) / R;
    float *at = alloc_floats((size_t)(mp * TW * k));
    if (!at) return DG_E_NOMEM;
    int failed = 0;
#pragma omp parallel num_threads(NT)
    {
#pragma omp for schedule(static)
        for (int64_t p = 0; p < mp; p++) pack_panel(a, m, k, p, at + p * TW * k);
        float *buf = scratch(S_W0, (size_t)(R * k)), *tile = scratch(S_TILE, R * TW);
        if (!buf || !tile) failed = 1;
#pragma omp barrier
#pragma omp for schedule(dynamic, 2)
        for (int64_t jp = 0; jp < np_; jp++) {
            if (failed) continue;
            int64_t j0 = jp * R, rows = n - j0 < R ? n - j0 : R, ls;
            const float *s = weight_rows(type, w, row_bytes, k, ts, j0, rows, buf, &ls);
            for (int64_t p = 0; p < mp; p++) {
                const int64_t i0 = p * TW, cols = m - i0 < TW ? m - i0 : TW;
                micro_cols(s, ls, at + p * TW * k, TW, k, tile, cols);
                for (int64_t i = 0; i < cols; i++)
                    for (int64_t r = 0; r < rows; r++) c[(i0 + i) * n + j0 + r] = tile[r * TW + i];
            }
        }
    }
    free(at);
    return failed ? DG_E_NOMEM : 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * soft_embed — plain definition, per row i:  c[i, :] = scale * sum_j p[i, j] t[j, :],  p[i, j] = softmax(x[i])_j
 * = exp(x[i, j] - row_max[i]) / row_total[i], from the row statistics of row_stats (or the sampler step).
 * A row whose kept tokens (x >= max - keep_logit, at most max_kept) carry all but `mass` of it gathers just their
 * rows of t when mass * norm_bound <= rel_tol * ||result|| (numpy_backend.sparse_soft_embed_row proves why that
 * is exact to float32); each such row is one thread's. The other rows' contraction runs over t's rows (the
 * vocabulary), so threads split that: each decodes KC rows of t at a time into scratch, turns the dense rows'
 * logits into probabilities as it copies them, accumulates a private [rows, n] partial, and the partials are
 * summed at the end in thread order (results repeat bit for bit for a given thread count).
 * ------------------------------------------------------------------------------------------------------------- */

static inline float prob(const float *x, int64_t j, float mx, float total) {
    return vexp(splat(x[j] - mx))[0] / total;
}

/* One sparse row: y = sum over kept tokens of p_j t[j, :] (index order), scaled; 1 when it passes the bound. */
static int sparse_row(const float *x, float mx, float total, const int32_t *kept, int64_t kept_n, double mass,
                      int type, const uint8_t *t, int64_t row_bytes, float ts, int64_t n, float scale,
                      double norm_bound, double rel_tol, float *buf, float *y) {
    memset(y, 0, (size_t)n * sizeof(float));
    for (int64_t q = 0; q < kept_n; q++) {
        const int64_t j = kept[q];
        const float pj = prob(x, j, mx, total);
        decode_row(type, t + j * row_bytes, n, ts, buf);
        int64_t c = 0;
        for (; c + VL <= n; c += VL) st(y + c, ld(y + c) + splat(pj) * ld(buf + c));
        for (; c < n; c++) y[c] += pj * buf[c];
    }
    double norm2 = 0;
    for (int64_t c = 0; c < n; c++) {
        y[c] *= scale;
        norm2 += (double)y[c] * y[c];
    }
    return mass * norm_bound <= rel_tol * sqrt(norm2);
}

static int SFX(soft_embed)(const float *x, int64_t rows, int64_t vocab, const float *row_max, const float *row_total,
                           const double *mass, const int64_t *kept_n, const int32_t *kept, int64_t max_kept, int type,
                           const uint8_t *t, int64_t row_bytes, float ts, int64_t n, float scale, double norm_bound,
                           double rel_tol, int dense_rows, float *c, int64_t *path) {
    if (!type_ok(type, n, row_bytes)) return DG_E_TYPE;
    if (rows <= 0 || n <= 0) return 0;
    int failed = 0;
    /* sparse candidates first, a row per thread */
#pragma omp parallel for num_threads(NT) schedule(dynamic, 1)
    for (int64_t i = 0; i < rows; i++) {
        path[i] = -1;
        if (failed || kept_n[i] > max_kept) continue;
        float *buf = scratch(S_W0, (size_t)n);
        if (!buf) {
            failed = 1;
            continue;
        }
        if (sparse_row(x + i * vocab, row_max[i], row_total[i], kept + i * max_kept, kept_n[i], mass[i], type, t,
                       row_bytes, ts, n, scale, norm_bound, rel_tol, buf, c + i * n))
            path[i] = kept_n[i];
    }
    if (failed) return DG_E_NOMEM;
    if (!dense_rows) return 0; /* the int8 kernels take them */
    int64_t *dense;
    const int64_t m = dg_dense_rows(path, rows, &dense);
    if (m <= 0) return m < 0 ? DG_E_NOMEM : 0;
    const int nt = NT;
    int team = 1; /* the threads OpenMP gave the region: each has a partial, and only those are summed */
    const int64_t k = vocab, nkc = (k + KC - 1) / KC;
    float **parts = calloc((size_t)nt, sizeof(float *)); /* each thread's partial, in its scratch */
    if (!parts) {
        free(dense);
        return DG_E_NOMEM;
    }
#pragma omp parallel num_threads(nt)
    {
        if (TID == 0) team = TEAM;
        float *part = parts[TID] = scratch(S_W2, (size_t)(m * n));
        if (part) memset(part, 0, (size_t)(m * n) * sizeof(float));
        const int64_t npan = (n + TW - 1) / TW, mpad = (m + R - 1) / R * R;
        float *tbuf = scratch(S_W0, (size_t)(KC * npan * TW)), *pbuf = scratch(S_PAD, (size_t)(mpad * KC));
        float *tile = scratch(S_TILE, R * TW), *rowbuf = scratch(S_W1, (size_t)(npan * TW));
        if (!part || !tbuf || !pbuf || !tile || !rowbuf) failed = 1;
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t kc = 0; kc < nkc; kc++) {
            if (failed) continue;
            const int64_t k0 = kc * KC, kn = k - k0 < KC ? k - k0 : KC;
            /* decode, laid out as column panels of TW ([panel][row][TW], the last one zero-padded), so the
             * microkernel reads each panel's rows one after another instead of a row length apart */
            memset(rowbuf + n, 0, (size_t)(npan * TW - n) * sizeof(float));
            for (int64_t r = 0; r < kn; r++) {
                decode_row(type, t + (k0 + r) * row_bytes, n, ts, rowbuf);
                for (int64_t p = 0; p < npan; p++) st(tbuf + (p * KC + r) * TW, ld(rowbuf + p * TW)),
                    st(tbuf + (p * KC + r) * TW + VL, ld(rowbuf + p * TW + VL));
            }
            /* every dense row's probabilities for this slice of the vocabulary, side by side (zero-padded to
             * whole groups of R rows and to KC columns): rows a whole vocabulary apart would all fall into the
             * same few L1 sets */
            for (int64_t r = 0; r < mpad; r++) {
                float *dst = pbuf + r * KC;
                int64_t j = 0;
                if (r < m) {
                    const int64_t row = dense[r];
                    const float *src = x + row * k + k0, mx = row_max[row], tot = row_total[row];
                    for (; j + VL <= kn; j += VL) st(dst + j, vexp(ld(src + j) - mx) / tot);
                    for (; j < kn; j++) dst[j] = prob(src, j, mx, tot);
                }
                memset(dst + j, 0, (size_t)(KC - j) * sizeof(float));
            }
            /* panel-major: one panel of the decoded slice (KC x TW floats) stays in L1 while every row group
             * passes over it, instead of the whole slice streaming from L2/L3 once per row group */
            for (int64_t j0 = 0; j0 < n; j0 += TW) {
                const int64_t cols = n - j0 < TW ? n - j0 : TW;
                for (int64_t i0 = 0; i0 < m; i0 += R) {
                    const int64_t nr = m - i0 < R ? m - i0 : R;
                    micro(pbuf + i0 * KC, KC, tbuf + j0 * KC, TW, kn, tile);
                    for (int64_t r = 0; r < nr; r++) {
                        float *dst = part + (i0 + r) * n + j0;
                        for (int64_t j = 0; j < cols; j++) dst[j] += tile[r * TW + j];
                    }
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
            float *out = c + dense[i] * n;
            for (int64_t j = 0; j < n; j++) {
                float sum = 0;
                for (int p = 0; p < team; p++) sum += parts[p][i * n + j];
                out[j] = sum * scale;
            }
        }
    }
    free(parts), free(dense);
    return failed ? DG_E_NOMEM : 0;
}

/* max_row_norm — the largest Euclidean norm of a row of W (float64 sums of the decoded float32 values). */
static int SFX(max_row_norm)(int type, const uint8_t *w, int64_t row_bytes, int64_t cols, float ts, int64_t rows,
                             double *out) {
    if (!type_ok(type, cols, row_bytes)) return DG_E_TYPE;
    double best = 0;
    int failed = 0;
#pragma omp parallel num_threads(NT) reduction(max : best)
    {
        float *buf = scratch(S_W0, (size_t)cols);
        if (!buf) failed = 1;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            if (failed) continue;
            decode_row(type, w + i * row_bytes, cols, ts, buf);
            double s = 0;
            for (int64_t j = 0; j < cols; j++) s += (double)buf[j] * buf[j];
            best = s > best ? s : best;
        }
    }
    *out = sqrt(best);
    return failed ? DG_E_NOMEM : 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * ffn (dense gated MLP and mixture of experts) — plain definition, per (token t, slot s), e = index[t, s]:
 *     h = gelu_tanh(gate_e @ x_t) * (up_e @ x_t);   out[t] += weights[t, s] * (down_e @ h)
 * Tokens are grouped per expert, so each expert's weights are decoded once and multiplied as one GEMM; the
 * hidden activations stay in the microkernel's transposed layout between the two GEMMs. Phase 1 splits
 * (expert, panel of R gate/up rows) over threads; phase 2 splits panels of R output columns (each thread then
 * owns those columns of `out` for every expert, which keeps the additions race-free and in expert order).
 * ------------------------------------------------------------------------------------------------------------- */

static int SFX(ffn)(const float *x, int64_t n, int64_t hidden, int64_t inter, const int64_t *index,
                    const float *weights, int64_t top_k, int64_t n_experts, int gt, const uint8_t *gw, int64_t grb,
                    int64_t gstride, float gts, int ut, const uint8_t *uw, int64_t urb, int64_t ustride, float uts,
                    int dt, const uint8_t *dw, int64_t drb, int64_t dstride, float dts, float *out) {
    if (!type_ok(gt, hidden, grb) || !type_ok(ut, hidden, urb) || !type_ok(dt, inter, drb)) return DG_E_TYPE;
    memset(out, 0, (size_t)(n * hidden) * sizeof(float));
    if (n <= 0) return 0;
    const int64_t ne = index ? n_experts : 1, slots = index ? top_k : 1;
    /* Group (token, weight) pairs by expert, in token order; each group padded to whole panels of TW. */
    dg_groups grp;
    int rc = dg_group_experts(index, weights, n, slots, ne, TW, &grp);
    if (rc) return rc;
    const int64_t *count = grp.count, *start = grp.start, *panel0 = grp.panel0, *tok = grp.tok;
    const float *wt = grp.wt;
    float *xt = NULL, *ht = NULL;
    const int64_t npanels = panel0[ne];
    /* (expert, token panel) → [hidden][TW] gathered inputs and [inter][TW] hidden activations */
    xt = alloc_floats((size_t)(npanels * TW * hidden));
    ht = alloc_floats((size_t)(npanels * TW * inter));
    if (!xt || !ht) { rc = DG_E_NOMEM; goto done; }
    const int64_t ip = (inter + R - 1) / R, hp = (hidden + R - 1) / R;
    int failed = 0;
#pragma omp parallel num_threads(NT)
    {
        float *gbuf = scratch(S_W0, (size_t)(R * hidden)), *ubuf = scratch(S_W1, (size_t)(R * hidden));
        float *dbuf = scratch(S_W2, (size_t)(R * inter)), *tile = scratch(S_TILE, 2 * R * TW);
        if (!gbuf || !ubuf || !dbuf || !tile) failed = 1;
        /* gather + transpose the inputs of every expert panel */
#pragma omp for schedule(static)
        for (int64_t e = 0; e < ne; e++) {
            for (int64_t p = panel0[e]; p < panel0[e + 1]; p++) {
                float *dst = xt + p * TW * hidden;
                int64_t c0 = (p - panel0[e]) * TW, cols = count[e] - c0 < TW ? count[e] - c0 : TW;
                if (cols < TW) memset(dst, 0, (size_t)(TW * hidden) * sizeof(float));
                for (int64_t c = 0; c < cols; c++) {
                    const float *src = x + tok[start[e] + c0 + c] * hidden;
                    for (int64_t j = 0; j < hidden; j++) dst[j * TW + c] = src[j];
                }
            }
        }
#pragma omp barrier
        /* phase 1: ht = gelu(gate @ x) * (up @ x) per expert and panel of R hidden units */
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < ne * ip; item++) {
            int64_t e = item / ip, j0 = (item % ip) * R, rows = inter - j0 < R ? inter - j0 : R, lg, lu;
            if (failed || count[e] == 0) continue;
            const float *g = weight_rows(gt, gw + e * gstride, grb, hidden, gts, j0, rows, gbuf, &lg);
            const float *u = weight_rows(ut, uw + e * ustride, urb, hidden, uts, j0, rows, ubuf, &lu);
            for (int64_t p = panel0[e]; p < panel0[e + 1]; p++) {
                const float *xp = xt + p * TW * hidden;
                const int64_t c0 = (p - panel0[e]) * TW, cols = count[e] - c0 < TW ? count[e] - c0 : TW;
                micro_cols(g, lg, xp, TW, hidden, tile, cols);
                micro_cols(u, lu, xp, TW, hidden, tile + R * TW, cols);
                float *hrow = ht + p * TW * inter + j0 * TW;
                for (int64_t r = 0; r < rows; r++)
                    for (int h = 0; h < (cols > VL ? 2 : 1); h++)
                        st(hrow + r * TW + h * VL, vgelu_mul(ld(tile + r * TW + h * VL), ld(tile + (R + r) * TW + h * VL)));
            }
        }
        /* phase 2: out[t, j0:j0+R] += w * (down @ h), experts in ascending order */
#pragma omp for schedule(dynamic, 1)
        for (int64_t jp = 0; jp < hp; jp++) {
            if (failed) continue;
            int64_t j0 = jp * R, rows = hidden - j0 < R ? hidden - j0 : R, ld_;
            for (int64_t e = 0; e < ne; e++) {
                if (count[e] == 0) continue;
                const float *dwr = weight_rows(dt, dw + e * dstride, drb, inter, dts, j0, rows, dbuf, &ld_);
                for (int64_t p = panel0[e]; p < panel0[e + 1]; p++) {
                    const int64_t c0 = (p - panel0[e]) * TW, cols = count[e] - c0 < TW ? count[e] - c0 : TW;
                    micro_cols(dwr, ld_, ht + p * TW * inter, TW, inter, tile, cols);
                    for (int64_t c = 0; c < cols; c++) {
                        float *dst = out + tok[start[e] + c0 + c] * hidden + j0;
                        const float wc = wt[start[e] + c0 + c];
                        for (int64_t r = 0; r < rows; r++) dst[r] += tile[r * TW + c] * wc;
                    }
                }
            }
        }
    }
    if (failed) rc = DG_E_NOMEM;
done:
    dg_groups_free(&grp), free(xt), free(ht);
    return rc;
}

/* ---------------------------------------------------------------------------------------------------------------
 * attention — plain definition, per head h (kv head h / (hq / hkv)) and query i:
 *     p = softmax_j(visible(i, j) ? q[i, h] . k[j, kvh] : -inf);   out[i, h] = sum_j p[j] v[j, kvh]
 * Threads take (head, block of R queries). Keys are packed transposed per kv head ([d][m] padded to TW), so
 * scores are one microkernel call per TW keys and the value product one per TW output dims.
 * Key positions ascend, so the keys any query of a block can see are one range (numpy_backend's
 * visible_key_range, found by binary search); a block computes scores, softmax and values over that range only,
 * widened to whole TW panels. Keys skipped that way have probability exactly 0, so the result is the same.
 * ------------------------------------------------------------------------------------------------------------- */

/* First index j < m with kpos[j] > x (m when none): kpos ascending. */
static int64_t upper_bound(const int64_t *kpos, int64_t m, int64_t x) {
    int64_t lo = 0, hi = m;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (kpos[mid] <= x) lo = mid + 1; else hi = mid;
    }
    return lo;
}

static int SFX(attention)(const float *q, int64_t n, int64_t hq, int64_t d, const float *k, const float *v,
                          int64_t m, int64_t hkv, int64_t dv, const int64_t *qpos, const int64_t *kpos, int causal,
                          int64_t window, float *out) {
    if (n <= 0) return 0;
    if (hkv <= 0 || hq % hkv || m <= 0) return DG_E_ARG;
    const int64_t mpad = (m + TW - 1) / TW * TW, dvp = (dv + TW - 1) / TW * TW, groups = hq / hkv;
    const int64_t nb = (n + R - 1) / R;
    float *kt = alloc_floats((size_t)(hkv * d * mpad)), *vp = alloc_floats((size_t)(hkv * m * dvp));
    int failed = !kt || !vp;
#pragma omp parallel num_threads(NT) if (!failed)
    {
        /* keys transposed per kv head ([d][mpad], zero-padded); values per kv head ([m][dvp], zero-padded) */
#pragma omp for schedule(static)
        for (int64_t h = 0; h < hkv; h++) {
            float *dst = kt + h * d * mpad, *vd = vp + h * m * dvp;
            for (int64_t j = 0; j < d; j++) {
                for (int64_t i = 0; i < m; i++) dst[j * mpad + i] = k[(i * hkv + h) * d + j];
                for (int64_t i = m; i < mpad; i++) dst[j * mpad + i] = 0.0f;
            }
            for (int64_t i = 0; i < m; i++) {
                memcpy(vd + i * dvp, v + (i * hkv + h) * dv, (size_t)dv * sizeof(float));
                memset(vd + i * dvp + dv, 0, (size_t)(dvp - dv) * sizeof(float));
            }
        }
        float *scores = scratch(S_SCORES, (size_t)(R * mpad)), *qpad = scratch(S_PAD, (size_t)(R * d));
        float *tile = scratch(S_TILE, R * TW);
        if (!scores || !qpad || !tile) failed = 1;
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < hq * nb; item++) {
            if (failed) continue;
            const int64_t h = item / nb, i0 = (item % nb) * R, rows = n - i0 < R ? n - i0 : R, kvh = h / groups;
            int64_t qmin = qpos[i0], qmax = qpos[i0];
            for (int64_t r = 1; r < rows; r++) {
                qmin = qpos[i0 + r] < qmin ? qpos[i0 + r] : qmin;
                qmax = qpos[i0 + r] > qmax ? qpos[i0 + r] : qmax;
            }
            const int64_t lo = window > 0 ? upper_bound(kpos, m, qmin - window) : 0;
            const int64_t hi = causal ? upper_bound(kpos, m, qmax) : m;
            if (hi <= lo) { /* no visible key: the 0/0 of the plain definition */
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t c = 0; c < dv; c++) out[((i0 + r) * hq + h) * dv + c] = NAN;
                continue;
            }
            const int64_t j_lo = lo / TW * TW, j_hi = (hi + TW - 1) / TW * TW, j_end = j_hi < m ? j_hi : m;
            const float *s = q + (i0 * hq + h) * d;
            int64_t ls = hq * d;
            if (rows < R) {
                memset(qpad, 0, (size_t)(R * d) * sizeof(float));
                for (int64_t r = 0; r < rows; r++) memcpy(qpad + r * d, s + r * ls, (size_t)d * sizeof(float));
                s = qpad, ls = d;
            }
            for (int64_t j0 = j_lo; j0 < j_hi; j0 += TW) {
                micro_cols(s, ls, kt + kvh * d * mpad + j0, mpad, d, tile, m - j0);
                for (int64_t r = 0; r < R; r++) {
                    float *dst = scores + r * mpad + j0;
                    st(dst, ld(tile + r * TW)), st(dst + VL, ld(tile + r * TW + VL));
                }
            }
            for (int64_t r = 0; r < rows; r++) { /* mask, softmax; padded keys get probability 0 */
                float *sr = scores + r * mpad, mx = -INFINITY;
                const int64_t qp = qpos[i0 + r];
                /* the keys this query sees are one range [a, b) (key positions ascend); the rest of the block's
                 * range masked, then the maximum a vector at a time (a scalar chain of compares was an eighth
                 * of the decoder's attention in perf; the maximum is the same in any order) */
                const int64_t a = window > 0 ? upper_bound(kpos, m, qp - window) : 0;
                const int64_t b = causal ? upper_bound(kpos, m, qp) : m;
                for (int64_t j = j_lo; j < j_hi; j++)
                    if (j < a || j >= b) sr[j] = -INFINITY;
                vf vm = splat(-INFINITY);
                for (int64_t j = j_lo; j < j_hi; j += VL) vm = sel(ld(sr + j) > vm, ld(sr + j), vm);
                for (int l = 0; l < VL; l++) mx = vm[l] > mx ? vm[l] : mx;
                vf vs = (vf){0};
                for (int64_t j = j_lo; j < j_hi; j += VL) {
                    vf e = vexp(ld(sr + j) - mx);
                    st(sr + j, e);
                    vs += e;
                }
                const float inv = 1.0f / hsum(vs);
                for (int64_t j = j_lo; j < j_hi; j += VL) st(sr + j, ld(sr + j) * inv);
            }
            for (int64_t r = rows; r < R; r++) memset(scores + r * mpad + j_lo, 0, (size_t)(j_hi - j_lo) * sizeof(float));
            for (int64_t c0 = 0; c0 < dv; c0 += TW) {
                const int64_t cols = dv - c0 < TW ? dv - c0 : TW;
                micro_cols(scores + j_lo, mpad, vp + (kvh * m + j_lo) * dvp + c0, dvp, j_end - j_lo, tile, cols);
                for (int64_t r = 0; r < rows; r++) {
                    float *o = out + ((i0 + r) * hq + h) * dv + c0;
                    if (cols == TW) /* whole panels inline: a variable-size copy became rep movsq, 4% of the op */
                        st(o, ld(tile + r * TW)), st(o + VL, ld(tile + r * TW + VL));
                    else
                        memcpy(o, tile + r * TW, (size_t)cols * sizeof(float));
                }
            }
        }
    }
    free(kt), free(vp);
    return failed ? DG_E_NOMEM : 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Elementwise and row kernels.
 * ------------------------------------------------------------------------------------------------------------- */

/* rms_norm — out = x * (mean(x^2) + eps)^-0.5 [* w] (the sum of squares in double, then one float32 rounding):
 * per row, ss = the sum over its vectors v, in order, of double(hsum(v * v)) (hsum adds the lanes in order), then
 * of its tail elements' squares. */
static double sum_squares(const float *xr, int64_t width) {
    double ss = 0;
    int64_t j = 0;
    for (; j + VL <= width; j += VL) {
        vf a = ld(xr + j);
        ss += (double)hsum(a * a);
    }
    for (; j < width; j++) ss += (double)xr[j] * xr[j];
    return ss;
}

#if VL == 8 && defined(__AVX2__)
/* sum_squares of 8 rows (row stride width) at once, the same additions in the same order: the 8 rows' v * v
 * transposed, lane r holding row r's, so hsum's lane-by-lane sum is seven vector additions and the double sums
 * run 8 rows wide. With hsum's chain of dependent scalar additions a 256 x 512 call took 93 us, 50 now. */
static void sum_squares8(const float *x, int64_t width, double *ss) {
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    int64_t j = 0;
    for (; j + 8 <= width; j += 8) {
        __m256 v[8], s = _mm256_setzero_ps();
        for (int r = 0; r < 8; r++) {
            const __m256 a = _mm256_loadu_ps(x + r * width + j);
            v[r] = _mm256_mul_ps(a, a);
        }
        transpose8(v); /* v[l]: lane l of the 8 rows */
        for (int l = 0; l < 8; l++) s = _mm256_add_ps(s, v[l]);
        lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(s)));
        hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(s, 1)));
    }
    _mm256_storeu_pd(ss, lo), _mm256_storeu_pd(ss + 4, hi);
    for (int r = 0; r < 8; r++)
        for (int64_t jj = j; jj < width; jj++) ss[r] += (double)x[r * width + jj] * x[r * width + jj];
}
#endif

static int SFX(rms_norm)(const float *x, int64_t rows, int64_t width, const float *w, float eps, float *out) {
#pragma omp parallel for num_threads(NT) schedule(static) if (rows * width > SMALL)
    for (int64_t i0 = 0; i0 < rows; i0 += 8) {
        double ss[8];
        const int64_t n = rows - i0 < 8 ? rows - i0 : 8;
#if VL == 8 && defined(__AVX2__)
        if (n == 8) sum_squares8(x + i0 * width, width, ss);
        else
#endif
            for (int64_t r = 0; r < n; r++) ss[r] = sum_squares(x + (i0 + r) * width, width);
        for (int64_t r = 0; r < n; r++) {
            const float *xr = x + (i0 + r) * width;
            float *o = out + (i0 + r) * width;
            const float scale = 1.0f / sqrtf((float)(ss[r] / (double)width) + eps);
            if (w)
                for (int64_t j = 0; j < width; j++) o[j] = xr[j] * scale * w[j];
            else
                for (int64_t j = 0; j < width; j++) o[j] = xr[j] * scale;
        }
    }
    return 0;
}

/* route — the mixture of experts' router (numpy_backend.route, in this file's arithmetic), per token t:
 *     h = x_t * r_t * scale * c     (r_t as rms_norm's, no norm weight; c = hidden^-0.5; in that order)
 *     z = proj @ h                  (linear's arithmetic: its panels, weight rows and microkernel)
 *     p = softmax(z);  the top_k experts by p, ties to the lower index (numpy's stable descending argsort);
 *     weights = p_top / (p_top summed in order) * per_expert_top
 * Threads take panels of TW tokens. In Python the same took ~0.6 ms per layer on the bench model (a dozen small
 * numpy calls around a linear of 16 rows). */
static int SFX(route)(const float *x, int64_t n, int64_t hidden, int type, const uint8_t *proj, int64_t row_bytes,
                      float ts, int64_t experts, const float *scale, float c, const float *per_expert, int64_t top_k,
                      float eps, float *weights, int64_t *index) {
    if (!type_ok(type, hidden, row_bytes)) return DG_E_TYPE;
    if (experts <= 0 || top_k <= 0 || top_k > experts) return DG_E_ARG;
    const int64_t np_ = (n + TW - 1) / TW;
    int failed = 0;
#pragma omp parallel num_threads(NT) if (n * hidden * experts > SMALL)
    {
        float *h = scratch(S_W1, (size_t)(TW * hidden)), *panel = scratch(S_PAD, (size_t)(hidden * TW));
        float *buf = scratch(S_W0, (size_t)(R * hidden)), *tile = scratch(S_TILE, R * TW);
        float *z = scratch(S_SCORES, (size_t)(TW * experts));
        if (!h || !panel || !buf || !tile || !z) failed = 1;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < np_; p++) {
            if (failed) continue;
            const int64_t t0 = p * TW, cols = n - t0 < TW ? n - t0 : TW;
            for (int64_t t = 0; t < cols; t++) {
                const float *xr = x + (t0 + t) * hidden;
                const float r = 1.0f / sqrtf((float)(sum_squares(xr, hidden) / (double)hidden) + eps);
                for (int64_t j = 0; j < hidden; j++) h[t * hidden + j] = xr[j] * r * scale[j] * c;
            }
            pack_panel(h, cols, hidden, 0, panel);
            for (int64_t e0 = 0; e0 < experts; e0 += R) {
                const int64_t rows = experts - e0 < R ? experts - e0 : R;
                int64_t ls;
                const float *s = weight_rows(type, proj, row_bytes, hidden, ts, e0, rows, buf, &ls);
                micro_cols(s, ls, panel, TW, hidden, tile, cols);
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t t = 0; t < cols; t++) z[t * experts + e0 + r] = tile[r * TW + t];
            }
            for (int64_t t = 0; t < cols; t++) {
                float *zt = z + t * experts, mx = -INFINITY, total = 0.0f, picked = 0.0f;
                for (int64_t e = 0; e < experts; e++) mx = zt[e] > mx ? zt[e] : mx;
                for (int64_t e = 0; e < experts; e++) total += zt[e] = vexp(splat(zt[e] - mx))[0];
                for (int64_t e = 0; e < experts; e++) zt[e] = zt[e] / total;
                int64_t *it = index + (t0 + t) * top_k;
                float *wt = weights + (t0 + t) * top_k;
                for (int64_t k = 0; k < top_k; k++) { /* the largest not yet taken (-1), the lower index on ties */
                    int64_t best = 0;
                    for (int64_t e = 1; e < experts; e++) best = zt[e] > zt[best] ? e : best;
                    it[k] = best, wt[k] = zt[best], zt[best] = -1.0f;
                    picked += wt[k];
                }
                for (int64_t k = 0; k < top_k; k++) wt[k] = wt[k] / picked * per_expert[it[k]];
            }
        }
    }
    return failed ? DG_E_NOMEM : 0;
}

static int SFX(softcap)(const float *x, int64_t n, float cap, float *out) {
    const int64_t nv = n / VL;
#pragma omp parallel for num_threads(NT) schedule(dynamic, 4096) if (n > SMALL)
    for (int64_t i = 0; i < nv; i++) st(out + i * VL, vtanh(ld(x + i * VL) / cap) * cap);
    for (int64_t i = nv * VL; i < n; i++) {
        vf t = vtanh(splat(x[i] / cap));
        out[i] = t[0] * cap;
    }
    return 0;
}

static int SFX(gelu_mul)(const float *g, const float *u, int64_t n, float *out) {
    const int64_t nv = n / VL;
#pragma omp parallel for num_threads(NT) schedule(static) if (n > SMALL)
    for (int64_t i = 0; i < nv; i++) st(out + i * VL, vgelu_mul(ld(g + i * VL), ld(u + i * VL)));
    for (int64_t i = nv * VL; i < n; i++) out[i] = vgelu_mul(splat(g[i]), splat(u[i]))[0];
    return 0;
}

/* rope_table — cs[i, f] = cos(a), sn[i, f] = sin(a), a = pos[i] * inv_freq[f] (the float32 product, as numpy):
 * the angles rope turns row i by. The backend keeps a table while its positions recur (every layer's q and k, and
 * every step of a canvas turn by the same angles), so libm's cosf / sinf, the cost of the op, run once a canvas. */
static int SFX(rope_table)(const int64_t *pos, int64_t n, const float *inv_freq, int64_t half, float *cs, float *sn) {
#pragma omp parallel for num_threads(NT) schedule(static) if (n * half * 32 > SMALL) /* a cosf + sinf: ~30 adds */
    for (int64_t i = 0; i < n; i++)
        for (int64_t f = 0; f < half; f++) {
            const float ang = (float)pos[i] * inv_freq[f];
            cs[i * half + f] = cosf(ang), sn[i * half + f] = sinf(ang);
        }
    return 0;
}

/* rope — out[..., f] = x[f] cos - x[f + d/2] sin, out[..., f + d/2] = x[f + d/2] cos + x[f] sin, row i's cos and
 * sin of its angles in cs / sn [n, d/2] (rope_table) */
static int SFX(rope)(const float *x, int64_t n, int64_t heads, int64_t d, const float *cs, const float *sn,
                     float *out) {
    const int64_t half = d / 2;
#pragma omp parallel for num_threads(NT) schedule(static) if (n * heads * d > SMALL)
    for (int64_t i = 0; i < n; i++) {
        const float *c = cs + i * half, *s = sn + i * half;
        for (int64_t h = 0; h < heads; h++) {
            const float *xr = x + (i * heads + h) * d;
            float *o = out + (i * heads + h) * d;
            for (int64_t f = 0; f < half; f++) {
                const float a = xr[f], b = xr[f + half];
                o[f] = a * c[f] - b * s[f];
                o[f + half] = b * c[f] + a * s[f];
            }
        }
    }
    return 0;
}

/* How many lanes of a compare mask are set. */
static inline int lanes_set(vi mask) {
#if VL == 16
    return __builtin_popcount(_mm512_movepi32_mask((__m512i)mask));
#elif VL == 8 && defined(__AVX2__)
    return __builtin_popcount(_mm256_movemask_ps((__m256)mask));
#else
    int n = 0;
    for (int i = 0; i < VL; i++) n -= mask[i];
    return n;
#endif
}

/* The largest value of a row and the first index holding it (numpy's argmax). */
static float row_max(const float *restrict x, int64_t cols, int64_t *arg) {
    vf vm = splat(-INFINITY);
    int64_t j = 0;
    for (; j + VL <= cols; j += VL) vm = vmax(vm, ld(x + j));
    float m = hmax(vm);
    for (; j < cols; j++) m = x[j] > m ? x[j] : m;
    int64_t a = 0; /* the first index holding the maximum, a vector at a time up to the one that holds it */
    while (a + VL <= cols && !lanes_set(ld(x + a) == splat(m))) a += VL;
    while (a < cols && x[a] != m) a++;
    *arg = a;
    return m;
}

/* What one pass over a row (its maximum m known) yields: S = sum exp(x - m) and D = sum exp(x - m) (x - m),
 * both in double, accumulated per 256 values in float vectors (so every caller's S is the same bits); with
 * e not NULL, exp(x - m) itself. The sparse soft embedding's split comes with it: tokens with x - m >=
 * -keep_logit are counted in *kept_n and the first max_kept of them listed in `kept`; the others' exp sum is
 * *dropped. (keep_logit = INFINITY keeps nothing and costs one compare per vector.) */
typedef struct {
    double sum, dot, dropped;
    int64_t kept_n;
} row_scan_t;

static row_scan_t scan_row(const float *restrict x, int64_t cols, float m, float *restrict e, float keep_logit,
                           int64_t max_kept, int32_t *restrict kept) {
    row_scan_t r = {0, 0, 0, 0};
    const vf cut = splat(-keep_logit);
    int64_t j = 0;
    for (; j < cols; j += 256) {
        const int64_t stop = cols - j < 256 ? cols : j + 256;
        vf s = (vf){0}, sdot = (vf){0}, sdrop = (vf){0};
        int64_t t = j;
        for (; t + VL <= stop; t += VL) {
            const vf sh = ld(x + t) - m, ev = vexp(sh);
            const vi in = sh >= cut;
            if (e) st(e + t, ev);
            s += ev;
            sdot += ev * sh;
            sdrop += sel(in, splat(0.0f), ev);
            const int n_in = lanes_set(in);
            if (n_in && r.kept_n < max_kept) {
                for (int l = 0; l < VL; l++)
                    if (in[l] && r.kept_n++ < max_kept) kept[r.kept_n - 1] = (int32_t)(t + l);
            } else {
                r.kept_n += n_in; /* past the cap: only counted (a flat row keeps nearly everything) */
            }
        }
        float fs = hsum(s), fdot = hsum(sdot), fdrop = hsum(sdrop);
        for (; t < stop; t++) { /* a row's tail: the same exp, one lane at a time */
            const float sh = x[t] - m, ev = vexp(splat(sh))[0];
            if (e) e[t] = ev;
            fs += ev, fdot += ev * sh;
            if (sh >= -keep_logit) {
                if (r.kept_n++ < max_kept) kept[r.kept_n - 1] = (int32_t)t;
            } else {
                fdrop += ev;
            }
        }
        r.sum += fs, r.dot += fdot, r.dropped += fdrop;
    }
    return r;
}

static int SFX(softmax)(const float *x, int64_t rows, int64_t cols, float *out) {
#pragma omp parallel for num_threads(NT) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        int64_t arg;
        float *o = out + i * cols;
        const float mx = row_max(x + i * cols, cols, &arg);
        const float total = (float)scan_row(x + i * cols, cols, mx, o, INFINITY, 0, NULL).sum;
        for (int64_t j = 0; j < cols; j++) o[j] = o[j] / total;
    }
    return 0;
}

/* row_stats — per row: row_max, row_total = float32(sum exp(x - max)) (softmax = exp(x - max) / row_total),
 * the soft embedding's split (kept tokens, and mass = the softmax mass of the others); entropy when not NULL;
 * exp(x - max) itself in e when not NULL. */
static void stats_row(const float *x, int64_t vocab, float keep_logit, int64_t max_kept, int64_t i, float *rmax,
                      float *rtotal, double *mass, int64_t *kept_n, int32_t *kept, float *entropy, int64_t *argmax,
                      float *e) {
    int64_t arg;
    const float mx = row_max(x, vocab, &arg);
    const row_scan_t r = scan_row(x, vocab, mx, e, keep_logit, max_kept, kept + i * max_kept);
    rmax[i] = mx, rtotal[i] = (float)r.sum, mass[i] = r.dropped / r.sum, kept_n[i] = r.kept_n;
    if (entropy) entropy[i] = (float)(log(r.sum) - r.dot / r.sum); /* H = log S - sum(e (x - m)) / S */
    if (argmax) argmax[i] = arg;
}

static int SFX(row_stats)(const float *x, int64_t rows, int64_t vocab, float keep_logit, int64_t max_kept,
                          float *rmax, float *rtotal, double *mass, int64_t *kept_n, int32_t *kept) {
#pragma omp parallel for num_threads(NT) schedule(dynamic, 1)
    for (int64_t i = 0; i < rows; i++)
        stats_row(x + i * vocab, vocab, keep_logit, max_kept, i, rmax, rtotal, mass, kept_n, kept, NULL, NULL, NULL);
    return 0;
}

/* DefaultRng.categorical for G rows at once, with p = e / total from the rows' e = exp(x - max) (as scan_row
 * stores them: the bits softmax above writes) — plain definition, per row:
 *     cdf = cumsum(float64(p)); out = min(#{j : cdf[j] <= u * cdf[-1]}, vocab - 1)
 * The float64 running sums are sequential, exactly as numpy's cumsum, so the draw is numpy's given the same
 * probabilities; interleaving G independent rows hides the latency of each row's chain of additions. The first
 * pass, for the total, also keeps the running sum at the start of every `chunk` values (marks); the cdf only
 * grows, so the draw lies at or after the last mark <= the target, and the second pass resumes the same sums
 * there, for at most a chunk and the tail, and stops at the draw (the first index past the target). */
#define G 4
#define MARKS 64 /* marks per row: the second pass reads at most vocab / MARKS values (rounded up to VL) */
static void inverse_cdf(const float *const *e, const float *tot, int64_t vocab, const double *u, int64_t *out) {
    double total[G] = {0}, cdf[G], target[G], marks[G][MARKS];
    const int64_t nv = vocab / VL * VL, chunk = ((vocab + MARKS - 1) / MARKS + VL - 1) / VL * VL;
    for (int64_t j = 0, mark = 0; j < nv; j += VL) {
        if (j == mark * chunk) {
            for (int r = 0; r < G; r++) marks[r][mark] = total[r];
            mark++;
        }
        for (int r = 0; r < G; r++) {
            const vf p = ld(e[r] + j) / tot[r];
            for (int l = 0; l < VL; l++) total[r] += (double)p[l];
        }
    }
    for (int64_t j = nv; j < vocab; j++)
        for (int r = 0; r < G; r++) total[r] += (double)(e[r][j] / tot[r]);
    int left = 0;
    int64_t from[G];
    for (int r = 0; r < G; r++) {
        target[r] = u[r] * total[r];
        out[r] = -1, left++;
        int64_t c = 0; /* the last mark <= target (marks[r][0] = 0 <= target) */
        while ((c + 1) * chunk < nv && marks[r][c + 1] <= target[r]) c++;
        from[r] = nv ? c * chunk : 0, cdf[r] = nv ? marks[r][c] : 0.0;
    }
    for (int r = 0; r < G; r++)
        for (int64_t j = from[r]; j < nv; j += VL) {
            const vf p = ld(e[r] + j) / tot[r];
            for (int l = 0; l < VL; l++) {
                cdf[r] += (double)p[l];
                if (cdf[r] > target[r]) {
                    out[r] = j + l, left--;
                    break;
                }
            }
            if (out[r] >= 0) break;
        }
    for (int64_t j = nv; j < vocab && left; j++)
        for (int r = 0; r < G; r++) {
            if (out[r] >= 0) continue;
            cdf[r] += (double)(e[r][j] / tot[r]);
            if (cdf[r] > target[r]) out[r] = j, left--;
        }
    for (int r = 0; r < G; r++) out[r] = out[r] < 0 || out[r] > vocab - 1 ? vocab - 1 : out[r];
}

/* sampler — the fused step, per row and in place: x = logits / temp (the processed logits), then the row
 * statistics above (max, total, argmax, entropy H = log S - sum(e (x - max)) / S, the soft embedding's split)
 * and, given uniforms, the inverse-CDF draw from the exp(x - max) that the statistics made, kept for the G rows
 * of a group in scratch (recomputing them took a quarter of the step: 16 -> 12 ms on the bench model's canvas):
 * no canvas x vocab array besides x itself. */
static int SFX(sampler)(float *x, int64_t rows, int64_t vocab, float temp, int64_t *argmax, float *entropy,
                        const double *u, int64_t *sampled, float keep_logit, int64_t max_kept, float *rmax,
                        float *rtotal, double *mass, int64_t *kept_n, int32_t *kept) {
    const int64_t groups = (rows + G - 1) / G;
    int failed = 0;
#pragma omp parallel for num_threads(NT) schedule(dynamic, 1)
    for (int64_t grp = 0; grp < groups; grp++) {
        const int64_t i0 = grp * G, n = rows - i0 < G ? rows - i0 : G;
        float *e = u ? scratch(S_W0, (size_t)(G * vocab)) : NULL; /* the group's exp(x - max), for the draw */
        if (failed || (u && !e)) {
            failed = 1;
            continue;
        }
        for (int64_t i = i0; i < i0 + n; i++) {
            float *xr = x + i * vocab;
            int64_t j = 0;
            for (; j + VL <= vocab; j += VL) st(xr + j, ld(xr + j) / temp);
            for (; j < vocab; j++) xr[j] = xr[j] / temp;
            stats_row(xr, vocab, keep_logit, max_kept, i, rmax, rtotal, mass, kept_n, kept, entropy, argmax,
                      e ? e + (i - i0) * vocab : NULL);
        }
        if (u) {
            const float *rowe[G];
            float tg[G];
            double ug[G];
            int64_t out[G];
            for (int r = 0; r < G; r++) { /* a short last group repeats its first row */
                const int64_t i = i0 + (r < n ? r : 0);
                rowe[r] = e + (r < n ? r : 0) * vocab, tg[r] = rtotal[i], ug[r] = u[i];
            }
            inverse_cdf(rowe, tg, vocab, ug, out);
            for (int r = 0; r < n; r++) sampled[i0 + r] = out[r];
        }
    }
    return failed ? DG_E_NOMEM : 0;
}

const dg_kernel_set SFX(dg_kernels) = {
#if defined(DG_ISA_AVX512)
    "avx512",
#elif defined(DG_ISA_AVX2)
    "avx2",
#else
    "generic",
#endif
    SFX(dequant_rows), SFX(linear), SFX(soft_embed), SFX(max_row_norm), SFX(ffn), SFX(attention), SFX(rms_norm),
    SFX(route), SFX(softcap), SFX(gelu_mul), SFX(rope_table), SFX(rope), SFX(softmax), SFX(row_stats), SFX(sampler),
};
