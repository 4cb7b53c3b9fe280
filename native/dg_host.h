/* dg_host.h — the host build of dg_math.cuh (libdghost.so), for CI tests without a GPU.
 *
 * Every function runs the exact inline code the CUDA kernels run, over arrays, so tests/test_native_host.py
 * can compare it with gguf-py and numpy. The declarations between the cdef markers are read by cffi.
 */
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif
/* <cdef> */
/* Decode n values of one row stored as ggml `type` (n a multiple of the block size); 0 on success. */
int dg_host_dequant_row(int type, const uint8_t* row, float* out, int64_t n, float tensor_scale);
void dg_host_e2m1(const uint8_t* codes, float* out, int64_t n);
void dg_host_e8m0_half(const uint8_t* codes, float* out, int64_t n);
void dg_host_ue4m3_half(const uint8_t* codes, float* out, int64_t n);
void dg_host_softcap(const float* x, float* out, int64_t n, float cap);
void dg_host_gelu_tanh(const float* x, float* out, int64_t n);
/* RoPE of one pair per element: (x0, x1) rotated by (c, s) into (y0, y1). */
void dg_host_rope_pairs(const float* x0, const float* x1, const float* c, const float* s, float* y0, float* y1,
                        int64_t n);
void dg_host_rope_angles(const int32_t* positions, const float* inv_freq, float* out, int64_t n);
/* Entropy of softmax over each of `rows` rows of `cols` values. */
void dg_host_entropy_rows(const float* x, float* out, int64_t rows, int64_t cols);
/* The sparse soft embedding's rules, elementwise: is token x kept for a row of maximum m; its softmax
 * probability from the row's statistics; does a sparse row's result (squared norm norm2) pass the bound. */
void dg_host_sparse_keep(const float* x, const float* m, float keep_logit, uint8_t* out, int64_t n);
void dg_host_softmax_prob(const float* x, const float* m, const float* total, float* out, int64_t n);
void dg_host_sparse_accept(const double* mass, const double* norm2, double norm_bound, double rel_tol, uint8_t* out,
                           int64_t n);
/* Philox4x32-10 of n counters (4 words each) under one key (2 words). */
void dg_host_philox(const uint32_t* counters, const uint32_t* key, uint32_t* out, int64_t n);
void dg_host_uniform01(const uint32_t* r, float* out, int64_t n);
void dg_host_uniform_int(const uint32_t* hi, const uint32_t* lo, uint32_t bound, uint32_t* out, int64_t n);
void dg_host_visible(const int32_t* q_pos, const int32_t* k_pos, int causal, int window, uint8_t* out,
                     int64_t n);
/* dg_key_range for n query blocks given by their smallest and largest positions, over one key array. */
void dg_host_key_range(const int32_t* k_pos, int m, const int32_t* q_min, const int32_t* q_max, int causal,
                       int window, int32_t* lo, int32_t* hi, int64_t n);
/* A function holding `count` DgScratchSet buffers from a counting malloc whose fail_at-th allocation fails (0:
 * none): returns its status and sets *live_after to the buffers still allocated once it has returned. */
int dg_host_scratch_run(int count, int fail_at, int* live_after);
/* </cdef> */
#ifdef __cplusplus
}
#endif
