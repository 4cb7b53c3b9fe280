/* dg_quants_iq.h — row decoders for the types dgrun reads from llama-quantize's files: Q5_1, Q5_K and the
 * i-quants IQ4_NL, IQ4_XS, IQ3_S, IQ2_S (block layouts: dgrun/quants.py, after ggml-common.h).
 *
 * Included by dg_kernels.c, so it is compiled once per kernel set like the other decoders (and uses its vector
 * types and loaders). Bit-exact with
 * gguf-py's dequantize in any evaluation order: every product here is an fp16 scale (11 significant bits) times
 * small integers (sub-block scale, code, grid magnitude) with at most 24 significant bits in all, so it is exact
 * in float32, and the only rounding is Q5_1's and Q5_K's one addition of the min (a fused multiply-add rounds
 * the same exact product once too). Signs are sign-bit flips, exact as well. The grids are read as bytes: value
 * e of an entry is byte e on the little-endian hosts ggml supports.
 */
#ifndef DG_QUANTS_IQ_H
#define DG_QUANTS_IQ_H
#include "dg_internal.h" /* the tables and the i-quants' block fields */

/* Q5_1 (24 bytes / 32): fp16 d, fp16 m, u32 fifth bits (bit j: value j), nibbles (byte j: values j, j + 16).
 * x = d * q + m. */
static void decode_q5_1(const uint8_t *restrict row, int64_t cols, float *restrict y) {
    for (int64_t b = 0; b < cols / 32; b++, row += 24, y += 32) {
        const float d = dg_rd_fp16(row), m = dg_rd_fp16(row + 2);
        uint32_t qh;
        memcpy(&qh, row + 4, 4); /* little-endian hosts only, like ggml */
        const vi h = (vi){0} + (int32_t)qh;
        for (int c = 0; c < 16; c += VL) { /* as Q5_0 in dg_kernels.c, plus the min */
            const vi q = bytesv(row + 8 + c), lane = iota(c);
            st(y + c, __builtin_convertvector((q & 15) | (((h >> lane) & 1) << 4), vf) * d + m);
            st(y + 16 + c, __builtin_convertvector((q >> 4) | (((h >> (lane + 16)) & 1) << 4), vf) * d + m);
        }
    }
}

/* Q5_K (176 bytes / 256): fp16 d, fp16 dmin, Q4_K's 12 scale bytes, qh[32], ql[128]. Per 64 values c: ql byte
 * 32c + l holds value l of sub-block 2c (low nibble) and of 2c + 1 (high); their fifth bits are bits 2c and
 * 2c + 1 of qh[l]. x = (d * sc) * q - dmin * m. */
static void decode_q5_k(const uint8_t *restrict row, int64_t cols, float *restrict y) {
    for (int64_t b = 0; b < cols / 256; b++, row += 176) {
        const float d = dg_rd_fp16(row), dmin = dg_rd_fp16(row + 2);
        const uint8_t *qh = row + 16, *ql = row + 48;
        for (int c = 0; c < 4; c++, ql += 32, y += 64) {
            float dl[2], ml[2];
            for (int h = 0; h < 2; h++) {
                int s, m;
                dg_scale_min_k4(row + 4, 2 * c + h, &s, &m);
                dl[h] = d * (float)s;
                ml[h] = dmin * (float)m;
            }
            for (int l = 0; l < 32; l++) {
                y[l] = dl[0] * (float)((ql[l] & 15) | (((qh[l] >> (2 * c)) & 1) << 4)) - ml[0];
                y[l + 32] = dl[1] * (float)((ql[l] >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4)) - ml[1];
            }
        }
    }
}

/* 32 values from 16 nibble bytes (byte j: values j, j + 16) through the IQ4_NL table, times dl. With AVX2 the
 * table lookup is one byte shuffle per 16 values. */
static inline void decode_iq4_32(const uint8_t *restrict qs, float dl, float *restrict y) {
#if defined(__AVX2__)
    const __m128i table = _mm_loadu_si128((const __m128i *)dg_kvalues_iq4nl), low4 = _mm_set1_epi8(15);
    const __m128i q = _mm_loadu_si128((const __m128i *)qs);
    const __m128i v[2] = {_mm_shuffle_epi8(table, _mm_and_si128(q, low4)),
                          _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(q, 4), low4))};
    const __m256 d = _mm256_set1_ps(dl);
    for (int h = 0; h < 2; h++) {
        _mm256_storeu_ps(y + 16 * h, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v[h])), d));
        _mm256_storeu_ps(y + 16 * h + 8,
                         _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v[h], 8))), d));
    }
#else
    for (int j = 0; j < 16; j++) {
        y[j] = dl * (float)dg_kvalues_iq4nl[qs[j] & 15];
        y[j + 16] = dl * (float)dg_kvalues_iq4nl[qs[j] >> 4];
    }
#endif
}

/* IQ4_NL (18 bytes / 32): fp16 d, 16 nibble bytes. x = d * kvalues[q]. */
static void decode_iq4_nl(const uint8_t *restrict row, int64_t cols, float *restrict y) {
    for (int64_t b = 0; b < cols / 32; b++, row += 18, y += 32) decode_iq4_32(row + 2, dg_rd_fp16(row), y);
}

/* IQ4_XS (136 bytes / 256): fp16 d, u16 scales_h, scales_l[4], 8 x 16 nibble bytes. x = (d * (ls - 32)) *
 * kvalues[q] with the 6-bit ls of each 32 values (dg_iq4xs_ls in dg_internal.h). */
static void decode_iq4_xs(const uint8_t *restrict row, int64_t cols, float *restrict y) {
    for (int64_t b = 0; b < cols / 256; b++, row += 136) {
        const float d = dg_rd_fp16(row);
        for (int ib = 0; ib < 8; ib++, y += 32)
            decode_iq4_32(row + 8 + 16 * ib, d * (float)(dg_iq4xs_ls(row, ib) - 32), y);
    }
}

/* 8 grid magnitudes (bytes) times db, negated where bit e of `signs` is set (a sign-bit flip: exact). */
static inline void signed_group8(const uint8_t *restrict magnitude, int signs, float db, float *restrict y) {
    const i32x8 flip = ((((i32x8){0} + signs) >> (i32x8){0, 1, 2, 3, 4, 5, 6, 7}) & 1) << 31;
    const f32x8 v = __builtin_convertvector(BYTES8(magnitude), f32x8) * db;
    *(f32x8u *)y = (f32x8)((i32x8)v ^ flip);
}

/* IQ3_S (110 bytes / 256; fields: dg_iq3s_group, dg_iq3s_scale in dg_internal.h): 64 groups of 4 grid
 * magnitudes, a sign bit per value, a scale db per 32 values. x = db * magnitude * sign. */
static void decode_iq3_s(const uint8_t *restrict row, int64_t cols, float *restrict y) {
    for (int64_t b = 0; b < cols / 256; b++, row += 110) {
        const float d = dg_rd_fp16(row);
        for (int ib = 0; ib < 8; ib++) {
            const float db = dg_iq3s_scale(d, row, ib);
            for (int k = 0; k < 4; k++, y += 8) { /* groups 2k and 2k + 1: 8 values, sign byte 4 ib + k */
                const int g = 8 * ib + 2 * k;
                uint8_t pair[8];
                memcpy(pair, dg_iq3s_group(row, g), 4), memcpy(pair + 4, dg_iq3s_group(row, g + 1), 4);
                signed_group8(pair, row[74 + 4 * ib + k], db, y);
            }
        }
    }
}

/* IQ2_S (82 bytes / 256; fields: dg_iq2s_group, dg_iq2s_scale in dg_internal.h): 32 groups of 8 grid
 * magnitudes with a sign byte each, a scale db per 16 values. x = db * magnitude * sign. */
static void decode_iq2_s(const uint8_t *restrict row, int64_t cols, float *restrict y) {
    for (int64_t b = 0; b < cols / 256; b++, row += 82) {
        const float d = dg_rd_fp16(row);
        for (int g = 0; g < 32; g++, y += 8) /* 8 values, sign byte g, scale of 16 values g / 2 */
            signed_group8(dg_iq2s_group(row, g), row[34 + g], dg_iq2s_scale(d, row, g / 2), y);
    }
}

/* One row of `cols` values of any type above (the caller has checked type and size). */
static void decode_row_iq(int type, const uint8_t *restrict row, int64_t cols, float *restrict y) {
    switch (type) {
    case T_Q5_1: decode_q5_1(row, cols, y); break;
    case T_Q5_K: decode_q5_k(row, cols, y); break;
    case T_IQ4_NL: decode_iq4_nl(row, cols, y); break;
    case T_IQ4_XS: decode_iq4_xs(row, cols, y); break;
    case T_IQ3_S: decode_iq3_s(row, cols, y); break;
    case T_IQ2_S: decode_iq2_s(row, cols, y); break;
    default: break;
    }
}

#endif
