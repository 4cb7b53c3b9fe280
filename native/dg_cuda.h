/* dg_cuda.h — the C API of libdgcuda.so, the CUDA kernels behind dgrun's "cuda" backend.
 *
 * Conventions:
 * - every function returns 0 on success or a nonzero status; dg_last_error() then says what failed;
 * - all work is queued on one stream in order; only dg_upload, dg_download, dg_sample_step and dg_synchronize
 *   wait for it;
 * - pointers are device pointers unless the name says host; activations are float32, row-major, contiguous;
 * - weights are raw ggml blocks (`type` is the ggml type id, `row_bytes` the bytes of one row, `tensor_scale`
 *   the NVFP4 per-tensor scale, 1 for other types);
 * - sizes are trusted: the Python caller (dgrun/backends/cuda_backend.py) validates every shape first.
 *
 * The declarations between the cdef markers are what Python's cffi reads (ABI mode, no compiler needed).
 */
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif
/* <cdef> */
/* Matmul engines: DG_ENGINE_FP32 computes in float32 on CUDA cores (exact up to summation order);
 * DG_ENGINE_TF32 uses tensor cores with inputs rounded to TF32 (10-bit mantissa), float32 accumulation. */
enum { DG_ENGINE_FP32 = 0, DG_ENGINE_TF32 = 1 };

const char* dg_last_error(void);
/* Select the device, create the stream and the caching memory pool. Idempotent and thread-safe; fails (with the
 * driver's and the runtime's CUDA versions in the message) when the device or the driver cannot run dgrun, e.g.
 * without stream-ordered memory pools. Every other dg_ function runs on this device whatever host thread calls
 * it (the thread's own current device is restored on return). */
int dg_init(int device);
/* Nonzero: wait for every kernel and copy right after queueing it and report its execution error under its own
 * name (DGRUN_CUDA_SYNC=1; slow, for a first run on a new GPU or driver). */
void dg_set_launch_sync(int on);
/* How many scratch buffers dg_ calls hold right now (0 between calls: every path gives them back). */
int dg_scratch_live(int64_t* count);
/* Tests: make the nth scratch allocation from now fail as out of memory (0 turns it off). */
void dg_debug_fail_scratch(int64_t nth);
/* Wait for the queue, then return every freed block of the memory pool to the driver (for other processes). */
int dg_release_pool(void);
int dg_device_info(char* name, int name_len, int* cc_major, int* cc_minor, int* sm_count, int64_t* total_bytes);
int dg_malloc(void** out, size_t bytes);
int dg_free(void* ptr);
int dg_upload(void* dst, const void* host_src, size_t bytes);
int dg_download(void* host_dst, const void* src, size_t bytes);
int dg_copy(void* dst, const void* src, size_t bytes);
int dg_fill_f32(float* dst, float value, int64_t n);
int dg_synchronize(void);

/* out[i, :] = table[ids[i], :] * scale (rows dequantized), i < n, table rows of `width` values. */
int dg_embed(const void* table, int type, int64_t row_bytes, float tensor_scale, int width, const int32_t* ids,
             int n, float scale, float* out);
/* y[n, out_features] = x[n, k] @ W^T for W [out_features, k]; k a multiple of 32. */
int dg_linear(const float* x, int n, int k, const void* w, int type, int64_t row_bytes, float tensor_scale,
              int out_features, float* y, int engine);
/* Per row of logits [rows, vocab]: row_max, row_total (softmax = exp(x - row_max) / row_total) and the sparse soft
 * embedding's split: kept_n = tokens with x - max >= -keep_logit, the first max_kept of them in index order at
 * kept[row * max_kept], mass = the softmax mass of the others (see dgrun/backends/numpy_backend.py). */
int dg_row_stats(const float* logits, int rows, int vocab, float keep_logit, int max_kept, float* row_max,
                 float* row_total, float* mass, int32_t* kept_n, int32_t* kept);
/* out[rows, width] = softmax(logits[rows, vocab]) @ table[vocab, width] * scale (self-conditioning), from the
 * logits' row statistics (dg_row_stats or dg_sample_step). A row with kept_n <= max_kept (<= 4096) gathers its
 * kept tokens' rows when mass * norm_bound <= rel_tol * ||result|| (host_paths[row] = kept_n); the other rows
 * share one GEMM (host_paths[row] = -1). Waits (the host lists the dense rows). vocab a multiple of 32. */
int dg_soft_embed(const float* logits, int rows, int vocab, const float* row_max, const float* row_total,
                  const float* mass, const int32_t* kept_n, const int32_t* kept, int max_kept, const void* table,
                  int type, int64_t row_bytes, float tensor_scale, int width, float scale, double norm_bound,
                  double rel_tol, float* out, int32_t* host_paths, int engine);
/* *host_out = the largest Euclidean norm of a row of table [rows, width] (float64 sums). Waits. */
int dg_max_row_norm(const void* table, int type, int64_t row_bytes, float tensor_scale, int rows, int width,
                    double* host_out);
/* Router: softmax over n_experts logits, top_k (stable: lower index first on ties), renormalised, times
 * per_expert_scale. weights/index are [n, top_k]. n_experts <= 1024. */
int dg_route_topk(const float* logits, int n, int n_experts, int top_k, const float* per_expert_scale,
                  float* weights, int32_t* index);
/* Mixture of experts over tokens sorted by expert: out[n, hidden] = sum over each token's top_k experts of
 * weight * down_e(gelu(gate_e(x)) * up_e(x)). gate_up [n_experts, 2 * inter, hidden] (gate rows first),
 * down [n_experts, hidden, inter]. index values must be < n_experts (they come from dg_route_topk). */
int dg_experts(const float* x, int n, int hidden, const float* weights, const int32_t* index, int top_k,
               int n_experts, const void* gate_up, int gate_up_type, int64_t gate_up_row_bytes,
               float gate_up_scale, int inter, const void* down, int down_type, int64_t down_row_bytes,
               float down_scale, float* out, int engine);
/* out = x * (mean(x^2) + eps)^-0.5 [* weight], per row of `width`; weight may be NULL. */
int dg_rms_norm(const float* x, const float* weight, int rows, int width, float eps, float* out);
/* Rotate-half RoPE on x [n, heads, head_dim] with angle positions[i] * inv_freq[j]. */
int dg_rope(const float* x, const int32_t* positions, const float* inv_freq, int n, int heads, int head_dim,
            float* out);
/* Softmax(q k^T) v with scaling 1.0, grouped KV heads and position masks (window 0 = none), never
 * materialising scores: q [n, q_heads, d], k/v [m, kv_heads, d], out [n, q_heads, d]; d <= 512. k_pos must
 * ascend: each block of queries visits only the keys it can see. */
int dg_attention(const float* q, const float* k, const float* v, const int32_t* q_pos, const int32_t* k_pos,
                 int n, int m, int q_heads, int kv_heads, int head_dim, int causal, int window, float* out);
int dg_softcap(const float* x, int64_t n, float cap, float* out);
/* out = gelu_tanh(gate) * up, elementwise. */
int dg_gelu_mul(const float* gate, const float* up, int64_t n, float* out);
int dg_add(const float* a, const float* b, int64_t n, float* out);
/* out[i] = a[i] * b[i % period] (period 1: a scalar on the device). */
int dg_mul_bcast(const float* a, const float* b, int64_t n, int64_t period, float* out);
int dg_scale(const float* a, float alpha, int64_t n, float* out);
/* One entropy-bound sampler step on logits [rows, vocab], fused and in place: logits become logits / temperature
 * (the processed logits that self-conditioning reads), and their dg_row_stats outputs are written (device
 * arrays). Categorical draws and renoise tokens come from Philox4x32-10 keyed by `seed`, counter (row, step).
 * clamp (rows bytes, may be NULL) marks fixed positions. Waits, then writes to host_out: int32 canvas[rows],
 * argmax[rows], accepted[rows], then the float32 mean entropy of the free positions (as its bits), so host_out
 * holds 3 * rows + 1 words. rows <= 4096. */
int dg_sample_step(float* logits, int rows, int vocab, const int32_t* canvas, const uint8_t* clamp,
                   float temperature, float entropy_bound, uint64_t seed, uint64_t step, float keep_logit,
                   int max_kept, float* row_max, float* row_total, float* mass, int32_t* kept_n, int32_t* kept,
                   int32_t* host_out);
/* </cdef> */
#ifdef __cplusplus
}
#endif
