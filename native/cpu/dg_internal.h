/* Shared between the dispatcher (dg_cpu.c) and the per-ISA kernel sets (dg_kernels.c, compiled once per ISA). */
#ifndef DG_INTERNAL_H
#define DG_INTERNAL_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "dg_iq_tables.h"

#define DG_E_TYPE (-1)  /* unsupported ggml type */
#define DG_E_ISA (-2)   /* kernel set not built or not supported by this CPU */
#define DG_E_NOMEM (-3) /* allocation failed */
#define DG_E_ARG (-4)   /* bad size or shape */

enum {
    T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14,
    T_IQ4_NL = 20, T_IQ3_S = 21, T_IQ2_S = 22, T_IQ4_XS = 23, T_BF16 = 30, T_MXFP4 = 39, T_NVFP4 = 40,
};

extern int dg_nthreads; /* set by dg_set_threads */

/* One kernel set: the same entry points as dg_cpu.h, compiled for one instruction set. */
typedef struct {
    const char *name;
    int (*dequant_rows)(int, const uint8_t *, int64_t, int64_t, float, const int64_t *, int64_t, float, float *);
    int (*linear)(const float *, int64_t, int64_t, int, const uint8_t *, int64_t, float, int64_t, float *);
    int (*soft_embed)(const float *, int64_t, int64_t, const float *, const float *, const double *, const int64_t *,
                      const int32_t *, int64_t, int, const uint8_t *, int64_t, float, int64_t, float, double, double,
                      int, float *, int64_t *);
    int (*max_row_norm)(int, const uint8_t *, int64_t, int64_t, float, int64_t, double *);
    int (*ffn)(const float *, int64_t, int64_t, int64_t, const int64_t *, const float *, int64_t, int64_t, int,
               const uint8_t *, int64_t, int64_t, float, int, const uint8_t *, int64_t, int64_t, float, int,
               const uint8_t *, int64_t, int64_t, float, float *);
    int (*attention)(const float *, int64_t, int64_t, int64_t, const float *, const float *, int64_t, int64_t,
                     int64_t, const int64_t *, const int64_t *, int, int64_t, float *);
    int (*rms_norm)(const float *, int64_t, int64_t, const float *, float, float *);
    int (*route)(const float *, int64_t, int64_t, int, const uint8_t *, int64_t, float, int64_t, const float *, float,
                 const float *, int64_t, float, float *, int64_t *);
    int (*softcap)(const float *, int64_t, float, float *);
    int (*gelu_mul)(const float *, const float *, int64_t, float *);
    int (*rope_table)(const int64_t *, int64_t, const float *, int64_t, float *, float *);
    int (*rope)(const float *, int64_t, int64_t, int64_t, const float *, const float *, float *);
    int (*softmax)(const float *, int64_t, int64_t, float *);
    int (*row_stats)(const float *, int64_t, int64_t, float, int64_t, float *, float *, double *, int64_t *, int32_t *);
    int (*sampler)(float *, int64_t, int64_t, float, int64_t *, float *, const double *, int64_t *, float, int64_t,
                   float *, float *, double *, int64_t *, int32_t *);
} dg_kernel_set;

/* (token, slot) pairs of a mixture of experts grouped by expert, in token order: pairs start[e] .. start[e + 1]
 * are expert e's (count[e] of them), tok / wt their tokens and weights, and panel0[e] the first of expert e's
 * panels of `panel` tokens (panel0[ne] panels in all). index NULL: one expert, every token with weight 1. */
typedef struct {
    int64_t *count, *start, *panel0, *tok;
    float *wt;
} dg_groups;

static inline void dg_groups_free(dg_groups *g) {
    free(g->count), free(g->start), free(g->panel0), free(g->tok), free(g->wt);
}

/* 0, DG_E_NOMEM, or DG_E_ARG for an expert id outside 0..ne-1 (then nothing is left to free). */
static inline int dg_group_experts(const int64_t *index, const float *weights, int64_t n, int64_t slots, int64_t ne,
                                   int64_t panel, dg_groups *g) {
    g->count = calloc((size_t)ne + 1, sizeof(int64_t)), g->start = calloc((size_t)ne + 1, sizeof(int64_t));
    g->panel0 = calloc((size_t)ne + 1, sizeof(int64_t));
    g->tok = malloc((size_t)(n * slots + 1) * sizeof(int64_t));
    g->wt = malloc((size_t)(n * slots + 1) * sizeof(float));
    int rc = 0;
    if (!g->count || !g->start || !g->panel0 || !g->tok || !g->wt) rc = DG_E_NOMEM;
    for (int64_t i = 0; i < n * slots && !rc; i++) {
        const int64_t e = index ? index[i] : 0;
        if (e < 0 || e >= ne) rc = DG_E_ARG;
        else g->count[e]++;
    }
    if (rc) {
        dg_groups_free(g);
        return rc;
    }
    for (int64_t e = 0; e < ne; e++) {
        g->start[e + 1] = g->start[e] + g->count[e];
        g->panel0[e + 1] = g->panel0[e] + (g->count[e] + panel - 1) / panel;
        g->count[e] = 0;
    }
    for (int64_t i = 0; i < n * slots; i++) {
        const int64_t e = index ? index[i] : 0, at = g->start[e] + g->count[e]++;
        g->tok[at] = i / slots;
        g->wt[at] = weights ? weights[i] : 1.0f;
    }
    return 0;
}

/* The expert whose panels include panel p < panel0[ne]: the last e with panel0[e] <= p (experts without tokens
 * have no panels). Lets a loop run over panels rather than experts: a dense MLP is one expert, whose panels a
 * loop over experts gives to one thread while the others wait (the int8 dense MLP: 2-4% of its time). */
static inline int64_t dg_panel_expert(const dg_groups *g, int64_t ne, int64_t p) {
    int64_t lo = 0, hi = ne - 1;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo + 1) / 2;
        if (g->panel0[mid] <= p) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* The rows of a soft embedding left to the dense product (path[i] < 0), in order, into *dense (the caller frees
 * it): how many, or -1 when out of memory; none allocates nothing. */
static inline int64_t dg_dense_rows(const int64_t *path, int64_t rows, int64_t **dense) {
    int64_t m = 0;
    for (int64_t i = 0; i < rows; i++) m += path[i] < 0;
    *dense = m ? malloc((size_t)m * sizeof(int64_t)) : NULL;
    if (m && !*dense) return -1;
    for (int64_t i = 0, j = 0; i < rows && m; i++)
        if (path[i] < 0) (*dense)[j++] = i;
    return m;
}

/* One int8 kernel set (dg_int8.c, compiled once per instruction set): matmuls of quantized weights on int8
 * activations. supports(type): whether it takes that weight type; the others return DG_E_TYPE for it. */
typedef struct {
    const char *name;
    int (*supports)(int);
    int (*q8_quantize)(const float *, int64_t, int8_t *, float *);
    int (*codes)(int, const uint8_t *, int64_t, float, uint8_t *, float *, float *);
    int (*linear)(const float *, int64_t, int64_t, int, const uint8_t *, int64_t, float, int64_t, float *);
    int (*ffn)(const float *, int64_t, int64_t, int64_t, const int64_t *, const float *, int64_t, int64_t, int,
               const uint8_t *, int64_t, int64_t, float, int, const uint8_t *, int64_t, int64_t, float, int,
               const uint8_t *, int64_t, int64_t, float, float *);
    int (*soft_embed)(const float *, int64_t, int64_t, const float *, const float *, const int64_t *, int,
                      const uint8_t *, int64_t, float, int64_t, float, float *);
} dg_int8_set;

/* -- scalar decoding helpers, exact (shared by every ISA) ------------------------------------------------------ */

static inline float dg_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* IEEE half → float, exact for every input (subnormals, inf, NaN), like ggml's GGML_FP16_TO_FP32. */
static inline float dg_fp16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) return dg_bits_f32(sign | 0x7F800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return dg_bits_f32(sign);
        float v = (float)man * (1.0f / 16777216.0f); /* man * 2^-24, exact */
        return sign ? -v : v;
    }
    return dg_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

static inline float dg_rd_fp16(const uint8_t *p) { return dg_fp16((uint16_t)(p[0] | (p[1] << 8))); }

/* ggml_e8m0_to_fp32_half: 2^(e-127) / 2 (MXFP4's codes are doubled). */
static inline float dg_e8m0_half(uint8_t e) {
    return dg_bits_f32(e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23);
}

/* UE4M3 byte → half its value (NVFP4's codes are doubled); 0 and 0x7F (NaN) decode to 0, as gguf-py. */
static inline float dg_ue4m3_half(uint8_t x) {
    int exp = (x >> 3) & 0xF, man = x & 7;
    if (x == 0 || x == 0x7F) return 0.0f;
    float raw = exp == 0 ? (float)man * (1.0f / 512.0f) : (1.0f + (float)man / 8.0f) * dg_bits_f32((uint32_t)(exp - 7 + 127) << 23);
    return raw * 0.5f;
}

/* Sub-block j's 6-bit scale and min in the 12 packed bytes of Q4_K and Q5_K (ggml's get_scale_min_k4): j < 4 in
 * the low 6 bits of bytes j and j + 4; j >= 4 in the nibbles of byte j + 4 and the top 2 bits of bytes j - 4, j. */
static inline void dg_scale_min_k4(const uint8_t *sc, int j, int *s, int *m) {
    if (j < 4) {
        *s = sc[j] & 63;
        *m = sc[j + 4] & 63;
    } else {
        *s = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4);
        *m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
    }
}

/* E2M1 values doubled (ggml's kvalues_mxfp4). */
static const int8_t dg_kvalues_fp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/* The i-quants' tables and block fields (layouts: dgrun/quants.py, after ggml-common.h), read by the float
 * decoders (dg_quants_iq.h) and the int8 codes (dg_int8.c). A grid entry is read as bytes: magnitude e of a
 * group is byte e on the little-endian hosts ggml supports. */
static const int8_t dg_kvalues_iq4nl[16] = DG_KVALUES_IQ4NL_INIT;
static const uint32_t dg_iq3s_grid[512] = DG_IQ3S_GRID_INIT;
static const uint64_t dg_iq2s_grid[1024] = DG_IQ2S_GRID_INIT;

/* IQ4_XS (136 bytes / 256): the 6-bit scale ls of 32 values ib (a nibble of scales_l, 2 bits of scales_h);
 * they are multiplied by d * (ls - 32). */
static inline int dg_iq4xs_ls(const uint8_t *block, int ib) {
    const uint32_t scales_h = (uint32_t)(block[2] | (block[3] << 8));
    return ((block[4 + ib / 2] >> (4 * (ib & 1))) & 15) | (((scales_h >> (2 * ib)) & 3) << 4);
}

/* IQ3_S (110 bytes / 256: fp16 d, qs[64], qh[8], signs[32], scales[4]): the 4 magnitudes (1..15) of group g
 * (g < 64; grid entry qs[g] | bit g % 8 of qh[g / 8] << 8), and the scale of 32 values ib, d * (1 + 2 s).
 * Value j's sign is bit j % 8 of signs[j / 8]. */
static inline const uint8_t *dg_iq3s_group(const uint8_t *block, int g) {
    return (const uint8_t *)&dg_iq3s_grid[block[2 + g] | (((block[66 + g / 8] >> (g % 8)) & 1) << 8)];
}
static inline float dg_iq3s_scale(float d, const uint8_t *block, int ib) {
    return d * (float)(1 + 2 * ((block[106 + ib / 2] >> (4 * (ib & 1))) & 15));
}

/* IQ2_S (82 bytes / 256: fp16 d, qs[32], signs[32], qh[8], scales[8]): the 8 magnitudes (8, 25 or 43) of group
 * g (g < 32; grid entry qs[g] | bits 2 (g % 4) of qh[g / 4] << 8; bit e of signs[g]: value e's sign), and the
 * scale of 16 values h, d * (0.5 + s) * 0.25. */
static inline const uint8_t *dg_iq2s_group(const uint8_t *block, int g) {
    return (const uint8_t *)&dg_iq2s_grid[block[2 + g] | (((block[66 + g / 4] >> (2 * (g % 4))) & 3) << 8)];
}
static inline float dg_iq2s_scale(float d, const uint8_t *block, int h) {
    return d * (0.5f + (float)((block[74 + h / 2] >> (4 * (h & 1))) & 15)) * 0.25f;
}

static inline int dg_block_size(int type) {
    switch (type) {
    case T_F32: case T_F16: case T_BF16: return 1;
    case T_Q4_0: case T_Q5_0: case T_Q5_1: case T_Q8_0: case T_MXFP4: case T_IQ4_NL: return 32;
    case T_NVFP4: return 64;
    case T_Q4_K: case T_Q5_K: case T_Q6_K: case T_IQ4_XS: case T_IQ3_S: case T_IQ2_S: return 256;
    default: return 0;
    }
}

static inline int64_t dg_type_size(int type) {
    switch (type) {
    case T_F32: return 4;
    case T_F16: case T_BF16: return 2;
    case T_Q4_0: return 18;
    case T_Q5_0: return 22;
    case T_Q5_1: return 24;
    case T_Q8_0: return 34;
    case T_MXFP4: return 17;
    case T_NVFP4: return 36;
    case T_Q4_K: return 144;
    case T_Q5_K: return 176;
    case T_Q6_K: return 210;
    case T_IQ4_NL: return 18;
    case T_IQ4_XS: return 136;
    case T_IQ3_S: return 110;
    case T_IQ2_S: return 82;
    default: return 0;
    }
}

#endif
