// dg_math.cuh — the per-element math of every dgrun CUDA kernel, as inline functions that compile both
// for the GPU (nvcc, __host__ __device__) and for the host (plain g++, __CUDACC__ undefined).
//
// Why one header for both: the host build (dg_host.cpp → libdghost.so) is tested bit-exact against
// gguf-py / numpy in CI, where there is no GPU. The kernels call exactly these functions, so a test that
// passes on the host pins the device arithmetic too (products that could be fused into an FMA are
// written with dg_mul/dg_add, which the device compiles to __fmul_rn/__fadd_rn: never contracted).
//
// Block layouts follow ggml (ggml-common.h); gguf-py's dequantize is the reference for every decoder.
#pragma once

#include <stdint.h>
#include <math.h>
#include <string.h>

#include "cpu/dg_iq_tables.h"  // the i-quant tables, generated from gguf-py (shared with the cpu kernels)

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define DG_HD __host__ __device__ __forceinline__
#else
#define DG_HD inline
#endif

// ggml type ids (gguf GGMLQuantizationType).
enum {
    DG_F32 = 0, DG_F16 = 1, DG_Q4_0 = 2, DG_Q5_0 = 6, DG_Q5_1 = 7, DG_Q8_0 = 8, DG_Q4_K = 12, DG_Q5_K = 13,
    DG_Q6_K = 14, DG_IQ4_NL = 20, DG_IQ3_S = 21, DG_IQ2_S = 22, DG_IQ4_XS = 23, DG_BF16 = 30, DG_MXFP4 = 39,
    DG_NVFP4 = 40,
};

// ---------------------------------------------------------------------------------------------------
// Scalar helpers
// ---------------------------------------------------------------------------------------------------

DG_HD float dg_bits_to_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(bits);
#else
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

// Products and sums that must round exactly like numpy's separate float32 operations.
DG_HD float dg_mul(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

DG_HD float dg_add(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

// Little-endian loads byte by byte: block fields are not aligned (a Q5_0 block is 22 bytes).
DG_HD uint32_t dg_load_u16(const uint8_t* p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }

DG_HD uint32_t dg_load_u32(const uint8_t* p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

// IEEE half → float (exact). The device uses the hardware conversion; the host spells it out.
DG_HD float dg_f16_to_f32(uint32_t h) {
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half((unsigned short)h));
#else
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    if (exp == 0) {  // zero or subnormal: man * 2^-24 is exact in float32
        float v = (float)man * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    if (exp == 31) return dg_bits_to_float(sign | 0x7F800000u | (man << 13));
    return dg_bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
#endif
}

DG_HD float dg_bf16_to_f32(uint32_t b) { return dg_bits_to_float(b << 16); }

// 2^e as a float for -126 <= e <= 127 (built from bits: exact, no libm).
DG_HD float dg_pow2(int e) { return dg_bits_to_float((uint32_t)(e + 127) << 23); }

// E2M1 code (4 bits) → its value doubled, as ggml's kvalues_mxfp4 {0,1,2,3,4,6,8,12, 0,-1,...,-12}.
// Doubled so that every value is an integer; the block scales carry the matching factor 1/2.
DG_HD int dg_e2m1_doubled(uint32_t code) {
    int mag = (int)(code & 7u);
    int v = mag < 4 ? mag : (2 + (mag & 1)) << ((mag >> 1) - 1);
    return (code & 8u) ? -v : v;
}

// E8M0 scale byte → 2^(e-127) / 2 (ggml_e8m0_to_fp32_half): e < 2 are float32 subnormals.
DG_HD float dg_e8m0_half(uint32_t e) {
    return dg_bits_to_float(e < 2 ? 0x00200000u << e : (e - 1) << 23);
}

// UE4M3 scale byte → its value / 2 (gguf-py's NVFP4.ue4m3_to_fp32). Only 0x00 and 0x7F decode to zero;
// bit 7 is ignored otherwise (as gguf-py does), so 0xFF decodes like 0x7F would have without the NaN rule.
DG_HD float dg_ue4m3_half(uint32_t x) {
    if (x == 0u || x == 0x7Fu) return 0.0f;
    int exp = (int)((x >> 3) & 0xFu), man = (int)(x & 7u);
    if (exp == 0) return (float)man * dg_pow2(-10);   // subnormal: man * 2^-9, halved
    return (float)(8 + man) * dg_pow2(exp - 11);      // (1 + man/8) * 2^(exp-7), halved
}

// ---------------------------------------------------------------------------------------------------
// Block decoders: value j of one block, exactly as gguf-py's dequantize_blocks computes it
// ---------------------------------------------------------------------------------------------------

// Q8_0 (34 bytes): fp16 d, int8 q[32]. x = d * q.
DG_HD float dg_q8_0_value(const uint8_t* b, int j) {
    return dg_mul(dg_f16_to_f32(dg_load_u16(b)), (float)(int8_t)b[2 + j]);
}

// Q4_0 (18 bytes): fp16 d, 16 bytes: value j < 16 in the low nibble of byte j, j >= 16 in the high
// nibble of byte j - 16. x = d * (q - 8).
DG_HD float dg_q4_0_value(const uint8_t* b, int j) {
    int q = (b[2 + (j & 15)] >> ((j >> 4) * 4)) & 0xF;
    return dg_mul(dg_f16_to_f32(dg_load_u16(b)), (float)(q - 8));
}

// Q5_0 (22 bytes): fp16 d, u32 high bits (bit j for value j), nibbles as Q4_0. x = d * (q - 16).
DG_HD float dg_q5_0_value(const uint8_t* b, int j) {
    int lo = (b[6 + (j & 15)] >> ((j >> 4) * 4)) & 0xF;
    int hi = (int)((dg_load_u32(b + 2) >> j) & 1u);
    return dg_mul(dg_f16_to_f32(dg_load_u16(b)), (float)((lo | (hi << 4)) - 16));
}

// Q4_K sub-block scale and min (6 bits each) for sub-block s of 8 (ggml's get_scale_min_k4).
DG_HD void dg_q4_k_scale_min(const uint8_t* scales, int s, int* sc, int* mn) {
    if (s < 4) {
        *sc = scales[s] & 63;
        *mn = scales[s + 4] & 63;
    } else {
        *sc = (scales[s + 4] & 0xF) | ((scales[s - 4] >> 6) << 4);
        *mn = (scales[s + 4] >> 4) | ((scales[s] >> 6) << 4);
    }
}

// Q4_K (144 bytes): fp16 d, fp16 dmin, 12 scale bytes, 128 nibble bytes. Value j is in sub-block
// s = j / 32; byte (j / 64) * 32 + j % 32, high nibble for odd s. x = (d * sc) * q - dmin * mn.
DG_HD float dg_q4_k_value(const uint8_t* b, int j) {
    int s = j >> 5, sc, mn;
    dg_q4_k_scale_min(b + 4, s, &sc, &mn);
    int q = (b[16 + (j >> 6) * 32 + (j & 31)] >> ((s & 1) * 4)) & 0xF;
    float d = dg_mul(dg_f16_to_f32(dg_load_u16(b)), (float)sc);
    float m = dg_mul(dg_f16_to_f32(dg_load_u16(b + 2)), (float)mn);
    return dg_add(dg_mul(d, (float)q), -m);
}

// Q6_K (210 bytes): ql[128], qh[64], int8 scales[16], fp16 d. Per 128-value half h: the low nibbles of
// ql[h*64 + t] hold values t (low) and t + 64 (high); qh[h*32 + u] holds the top 2 bits of u, u + 32,
// u + 64, u + 96. x = (d * scale[j / 16]) * (q - 32).
DG_HD float dg_q6_k_value(const uint8_t* b, int j) {
    int h = j >> 7, w = j & 127;
    int lo = (b[h * 64 + (w & 63)] >> ((w >> 6) * 4)) & 0xF;
    int hi = (b[128 + h * 32 + (w & 31)] >> ((w >> 5) * 2)) & 3;
    float d = dg_mul(dg_f16_to_f32(dg_load_u16(b + 208)), (float)(int8_t)b[192 + (j >> 4)]);
    return dg_mul(d, (float)((lo | (hi << 4)) - 32));
}

// MXFP4 (17 bytes): E8M0 scale, 16 bytes of E2M1 codes (value j < 16 low nibble of byte j, else high
// nibble of byte j - 16). x = e8m0_half(e) * kvalue.
DG_HD float dg_mxfp4_value(const uint8_t* b, int j) {
    uint32_t code = (b[1 + (j & 15)] >> ((j >> 4) * 4)) & 0xFu;
    return dg_mul(dg_e8m0_half(b[0]), (float)dg_e2m1_doubled(code));
}

// NVFP4 (36 bytes): 4 UE4M3 scales (one per 16 values), then per sub-block s 8 bytes: value t < 8 in the
// low nibble of byte t, t >= 8 in the high nibble of byte t - 8. x = ue4m3_half(scale) * kvalue; the
// per-tensor scale is applied by the caller (dg_row_value).
DG_HD float dg_nvfp4_value(const uint8_t* b, int j) {
    int s = j >> 4, t = j & 15;
    uint32_t code = (b[4 + s * 8 + (t & 7)] >> ((t >> 3) * 4)) & 0xFu;
    return dg_mul(dg_ue4m3_half(b[s]), (float)dg_e2m1_doubled(code));
}

// Q5_1 (24 bytes): fp16 d, fp16 m, u32 high bits (bit j for value j), nibbles as Q4_0. x = d * q + m.
DG_HD float dg_q5_1_value(const uint8_t* b, int j) {
    int lo = (b[8 + (j & 15)] >> ((j >> 4) * 4)) & 0xF;
    int hi = (int)((dg_load_u32(b + 4) >> j) & 1u);
    return dg_add(dg_mul(dg_f16_to_f32(dg_load_u16(b)), (float)(lo | (hi << 4))), dg_f16_to_f32(dg_load_u16(b + 2)));
}

// Q5_K (176 bytes): fp16 d, fp16 dmin, Q4_K's 12 scale bytes, qh[32], ql[128]. Value j is in sub-block
// s = j / 32: its low 4 bits are Q4_K's nibble (ql byte (j / 64) * 32 + j % 32, high nibble for odd s), its
// fifth bit is bit s of qh[j % 32]. x = (d * sc) * q - dmin * mn.
DG_HD float dg_q5_k_value(const uint8_t* b, int j) {
    int s = j >> 5, sc, mn;
    dg_q4_k_scale_min(b + 4, s, &sc, &mn);
    int lo = (b[48 + (j >> 6) * 32 + (j & 31)] >> ((s & 1) * 4)) & 0xF;
    int hi = (b[16 + (j & 31)] >> s) & 1;
    float d = dg_mul(dg_f16_to_f32(dg_load_u16(b)), (float)sc);
    float m = dg_mul(dg_f16_to_f32(dg_load_u16(b + 2)), (float)mn);
    return dg_add(dg_mul(d, (float)(lo | (hi << 4))), -m);
}

// The i-quant tables (cpu/dg_iq_tables.h) in the memory of whichever side runs the code.
#ifdef __CUDACC__
static __device__ const int8_t dg_kvalues_iq4nl_dev[16] = DG_KVALUES_IQ4NL_INIT;
static __device__ const uint32_t dg_iq3s_grid_dev[512] = DG_IQ3S_GRID_INIT;
static __device__ const uint64_t dg_iq2s_grid_dev[1024] = DG_IQ2S_GRID_INIT;
#endif
static const int8_t dg_kvalues_iq4nl_host[16] = DG_KVALUES_IQ4NL_INIT;
static const uint32_t dg_iq3s_grid_host[512] = DG_IQ3S_GRID_INIT;
static const uint64_t dg_iq2s_grid_host[1024] = DG_IQ2S_GRID_INIT;

#ifdef __CUDA_ARCH__
#define DG_IQ_TABLE(name) name##_dev
#else
#define DG_IQ_TABLE(name) name##_host
#endif

// IQ4_NL's non-uniform value of a 4-bit code (also IQ4_XS's).
DG_HD int dg_kvalue_iq4nl(int code) { return DG_IQ_TABLE(dg_kvalues_iq4nl)[code]; }

// Magnitude e of IQ3_S grid entry i (4 per entry) and of IQ2_S grid entry i (8 per entry).
DG_HD int dg_iq3s_magnitude(int i, int e) { return (int)((DG_IQ_TABLE(dg_iq3s_grid)[i] >> (8 * e)) & 0xFFu); }
DG_HD int dg_iq2s_magnitude(int i, int e) { return (int)((DG_IQ_TABLE(dg_iq2s_grid)[i] >> (8 * e)) & 0xFFu); }

// IQ4_NL (18 bytes): fp16 d, nibbles as Q4_0. x = d * kvalues[q].
DG_HD float dg_iq4_nl_value(const uint8_t* b, int j) {
    int q = (b[2 + (j & 15)] >> ((j >> 4) * 4)) & 0xF;
    return dg_mul(dg_f16_to_f32(dg_load_u16(b)), (float)dg_kvalue_iq4nl(q));
}

// IQ4_XS (136 bytes): fp16 d, u16 scales_h (2 bits per 32 values), scales_l[4] (a nibble per 32 values), then
// 16 nibble bytes per 32 values in IQ4_NL's order. x = (d * (ls - 32)) * kvalues[q], ls the 6-bit scale.
DG_HD float dg_iq4_xs_value(const uint8_t* b, int j) {
    int ib = j >> 5, t = j & 31;
    int ls = ((b[4 + (ib >> 1)] >> ((ib & 1) * 4)) & 0xF) | (((int)(dg_load_u16(b + 2) >> (2 * ib)) & 3) << 4);
    int q = (b[8 + 16 * ib + (t & 15)] >> ((t >> 4) * 4)) & 0xF;
    float dl = dg_mul(dg_f16_to_f32(dg_load_u16(b)), (float)(ls - 32));
    return dg_mul(dl, (float)dg_kvalue_iq4nl(q));
}

// IQ3_S (110 bytes): fp16 d, qs[64], qh[8], signs[32], scales[4]. Value j is magnitude j % 4 of grid entry
// qs[g] | (bit g % 8 of qh[g / 8]) << 8 with g = j / 4; its sign is bit j % 8 of signs[j / 8]; the 4-bit
// scale s of its 32 values gives db = d * (1 + 2 s). x = (db * magnitude) * sign.
DG_HD float dg_iq3_s_value(const uint8_t* b, int j) {
    int g = j >> 2, ib = j >> 5;
    int index = b[2 + g] | (((b[66 + ib] >> (g & 7)) & 1) << 8);
    float db = dg_mul(dg_f16_to_f32(dg_load_u16(b)), (float)(1 + 2 * ((b[106 + (ib >> 1)] >> ((ib & 1) * 4)) & 0xF)));
    float v = dg_mul(db, (float)dg_iq3s_magnitude(index, j & 3));
    return ((b[74 + (j >> 3)] >> (j & 7)) & 1) ? -v : v;
}

// IQ2_S (82 bytes): fp16 d, qs[32], signs[32], qh[8], scales[8]. Value j is magnitude j % 8 of grid entry
// qs[g] | (bits 2 (g % 4) of qh[g / 4]) << 8 with g = j / 8; its sign is bit j % 8 of signs[g]; the 4-bit
// scale s of its 16 values gives db = d * (0.5 + s) * 0.25. x = (db * magnitude) * sign.
DG_HD float dg_iq2_s_value(const uint8_t* b, int j) {
    int g = j >> 3;
    int index = b[2 + g] | (((b[66 + (g >> 2)] >> (2 * (g & 3))) & 3) << 8);
    int s = (b[74 + (j >> 5)] >> (((j >> 4) & 1) * 4)) & 0xF;
    float db = dg_mul(dg_mul(dg_f16_to_f32(dg_load_u16(b)), dg_add(0.5f, (float)s)), 0.25f);
    float v = dg_mul(db, (float)dg_iq2s_magnitude(index, j & 7));
    return ((b[34 + g] >> (j & 7)) & 1) ? -v : v;
}

// Values per block and bytes per block; 0 for a type the kernels do not know.
DG_HD int dg_block_size(int type) {
    switch (type) {
        case DG_F32: case DG_F16: case DG_BF16: return 1;
        case DG_Q8_0: case DG_Q4_0: case DG_Q5_0: case DG_Q5_1: case DG_MXFP4: case DG_IQ4_NL: return 32;
        case DG_NVFP4: return 64;
        case DG_Q4_K: case DG_Q5_K: case DG_Q6_K: case DG_IQ4_XS: case DG_IQ3_S: case DG_IQ2_S: return 256;
        default: return 0;
    }
}

DG_HD int dg_type_size(int type) {
    switch (type) {
        case DG_F32: return 4;
        case DG_F16: case DG_BF16: return 2;
        case DG_Q8_0: return 34;
        case DG_Q4_0: return 18;
        case DG_Q5_0: return 22;
        case DG_Q5_1: return 24;
        case DG_MXFP4: return 17;
        case DG_NVFP4: return 36;
        case DG_Q4_K: return 144;
        case DG_Q5_K: return 176;
        case DG_Q6_K: return 210;
        case DG_IQ4_NL: return 18;
        case DG_IQ4_XS: return 136;
        case DG_IQ3_S: return 110;
        case DG_IQ2_S: return 82;
        default: return 0;
    }
}

// Element k of one row of a tensor stored as `type`; `tensor_scale` multiplies NVFP4 values only (as
// dgrun.quants.dequantize_tensor does, after the block decode). The switch is uniform across a warp.
DG_HD float dg_row_value(int type, const uint8_t* row, int k, float tensor_scale) {
    switch (type) {
        case DG_F32: return dg_bits_to_float(dg_load_u32(row + 4 * k));
        case DG_F16: return dg_f16_to_f32(dg_load_u16(row + 2 * k));
        case DG_BF16: return dg_bf16_to_f32(dg_load_u16(row + 2 * k));
        case DG_Q8_0: return dg_q8_0_value(row + (k >> 5) * 34, k & 31);
        case DG_Q4_0: return dg_q4_0_value(row + (k >> 5) * 18, k & 31);
        case DG_Q5_0: return dg_q5_0_value(row + (k >> 5) * 22, k & 31);
        case DG_MXFP4: return dg_mxfp4_value(row + (k >> 5) * 17, k & 31);
        case DG_NVFP4: return dg_mul(dg_nvfp4_value(row + (k >> 6) * 36, k & 63), tensor_scale);
        case DG_Q4_K: return dg_q4_k_value(row + (k >> 8) * 144, k & 255);
        case DG_Q6_K: return dg_q6_k_value(row + (k >> 8) * 210, k & 255);
        case DG_Q5_1: return dg_q5_1_value(row + (k >> 5) * 24, k & 31);
        case DG_Q5_K: return dg_q5_k_value(row + (k >> 8) * 176, k & 255);
        case DG_IQ4_NL: return dg_iq4_nl_value(row + (k >> 5) * 18, k & 31);
        case DG_IQ4_XS: return dg_iq4_xs_value(row + (k >> 8) * 136, k & 255);
        case DG_IQ3_S: return dg_iq3_s_value(row + (k >> 8) * 110, k & 255);
        case DG_IQ2_S: return dg_iq2_s_value(row + (k >> 8) * 82, k & 255);
        default: return 0.0f;  // unreachable: the Python side refuses unknown types before any call
    }
}

// ---------------------------------------------------------------------------------------------------
// Activations, RoPE, attention masks
// ---------------------------------------------------------------------------------------------------

// tanh(x / cap) * cap, in numpy's operation order.
DG_HD float dg_softcap(float x, float cap) { return dg_mul(tanhf(x / cap), cap); }

// GELU, tanh approximation (transformers' gelu_pytorch_tanh): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
DG_HD float dg_gelu_tanh(float x) {
    float x3 = dg_mul(dg_mul(x, x), x);
    float inner = dg_mul(0.7978845608028654f, dg_add(x, dg_mul(0.044715f, x3)));
    return dg_mul(dg_mul(0.5f, x), dg_add(1.0f, tanhf(inner)));
}

// Rotate-half RoPE on one pair (x[j], x[j + d/2]) by angle theta with c = cos, s = sin:
// y[j] = x[j] c - x[j + d/2] s, y[j + d/2] = x[j + d/2] c + x[j] s. A zero frequency gives c = 1, s = 0:
// the pair passes through unchanged (proportional RoPE's unrotated tail).
DG_HD void dg_rope_pair(float x0, float x1, float c, float s, float* y0, float* y1) {
    *y0 = dg_add(dg_mul(x0, c), -dg_mul(x1, s));
    *y1 = dg_add(dg_mul(x1, c), dg_mul(x0, s));
}

// The angle as numpy computes it: float32(position) * inv_freq, one float32 rounding.
DG_HD float dg_rope_angle(int position, float inv_freq) { return dg_mul((float)position, inv_freq); }

// Whether a query at q_pos sees a key at k_pos (window 0 = no sliding window).
DG_HD bool dg_visible(int q_pos, int k_pos, int causal, int window) {
    return (!causal || k_pos <= q_pos) && (window <= 0 || k_pos > q_pos - window);
}

// First index j < m with k_pos[j] > x (m when none), k_pos ascending.
DG_HD int dg_upper_bound(const int32_t* k_pos, int m, int64_t x) {
    int lo = 0, hi = m;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (k_pos[mid] <= x) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

// [*lo, *hi): the keys (positions ascending) some query with a position in [q_min, q_max] may see — causal: none
// after q_max; a window: none at or before q_min - window (numpy_backend.visible_key_range).
DG_HD void dg_key_range(const int32_t* k_pos, int m, int q_min, int q_max, int causal, int window, int* lo,
                        int* hi) {
    *lo = window > 0 ? dg_upper_bound(k_pos, m, (int64_t)q_min - window) : 0;
    *hi = causal ? dg_upper_bound(k_pos, m, q_max) : m;
    if (*hi < *lo) *hi = *lo;
}

// ---------------------------------------------------------------------------------------------------
// Softmax statistics and entropy
// ---------------------------------------------------------------------------------------------------

// With m = max(x): z = sum exp(x - m), s = sum exp(x - m) (x - m); the entropy of softmax(x) is
// log z - s / z. One pass once m is known, and the partial (z, s) of disjoint ranges simply add.
// Returns exp(x - m), the term added to z.
DG_HD float dg_entropy_accumulate(float x, float m, float* z, float* s) {
    float t = x - m;
    float e = expf(t);
    *z = dg_add(*z, e);
    *s = dg_add(*s, dg_mul(e, t));  // not e * t + s: nvcc would fuse it, the host twin (-ffp-contract=off) not
    return e;
}

DG_HD float dg_entropy_finish(float z, float s) { return logf(z) - s / z; }

// ---------------------------------------------------------------------------------------------------
// The sparse soft embedding (reference: dgrun/backends/numpy_backend.py, sparse_soft_embed_row)
// ---------------------------------------------------------------------------------------------------

// Token x of a row whose maximum is m is kept (gathered) when x - m >= -keep_logit: one float32
// subtraction, so every backend keeps exactly the same tokens.
DG_HD bool dg_sparse_keep(float x, float m, float keep_logit) { return x - m >= -keep_logit; }

// softmax(x)_j from the row's statistics, as the soft embedding's products take it.
DG_HD float dg_softmax_prob(float x, float m, float total) { return expf(x - m) / total; }

// The sparse path's result y (squared norm norm2) stands for the row when the softmax mass it leaves out
// times the largest scaled embedding row norm is at most rel_tol ||y|| (rel_tol = 2^-25 / margin).
DG_HD bool dg_sparse_accept(double mass, double norm_bound, double rel_tol, double norm2) {
    return mass * norm_bound <= rel_tol * sqrt(norm2);
}

// ---------------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11; Random123's philox4x32 with 10 rounds)
// ---------------------------------------------------------------------------------------------------

DG_HD void dg_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3], k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {  // the key schedule bumps the key before every round but the first
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c0 = n0;
        c1 = (uint32_t)p1;
        c2 = n2;
        c3 = (uint32_t)p0;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

// A uniform float in [0, 1) from the top 24 bits of a Philox word (every value exactly representable).
DG_HD float dg_uniform01(uint32_t r) { return (float)(r >> 8) * 5.9604644775390625e-08f; }

// An integer in [0, n) from 64 random bits: floor(((hi << 32) | lo) * n / 2^64), bias below n / 2^64.
// Split so no 128-bit product is needed; exact for n <= 2^32.
DG_HD uint32_t dg_uniform_int(uint32_t hi, uint32_t lo, uint32_t n) {
    uint64_t low = ((uint64_t)lo * n) >> 32;
    return (uint32_t)(((uint64_t)hi * n + low) >> 32);
}
