/* dgrun CPU kernels: the C API that backends/cpu_backend.py loads with cffi (ABI mode).
 *
 * Conventions: row-major float32 arrays, int64 sizes and indices, ggml type ids (0 F32, 1 F16, 2 Q4_0,
 * 6 Q5_0, 8 Q8_0, 12 Q4_K, 14 Q6_K, 30 BF16, 39 MXFP4, 40 NVFP4). A quantized matrix is `rows` rows of
 * `row_bytes` raw ggml blocks; `tensor_scale` multiplies every decoded value (NVFP4's per-tensor scale, 1 for
 * the others). Every function returns 0, or a negative DG_E* code and writes nothing useful.
 * Weights are decoded to float32 a few rows at a time into per-thread scratch (bit-exact with ggml's
 * dequantize_row_*), and multiplied in float32: no function keeps a decoded copy of a tensor.
 *
 * This header is also the cffi cdef: the loader drops the preprocessor lines, so keep declarations plain.
 */
#ifndef DG_CPU_H
#define DG_CPU_H
#include <stdint.h>

/* Select the kernel set: "auto" (best this CPU runs), "avx512", "avx2" or "generic". 0 or DG_E_ISA. */
int dg_select_isa(const char *isa);
/* The selected kernel set's name. */
const char *dg_isa(void);
/* Hash of the sources this library was built from (build.py's source_hash). */
const char *dg_source_hash(void);
/* Integer arithmetic for quantized weights (dg_int8.c): the int8 kernel set, "auto" (the best this CPU runs),
 * "avx512bf16", "avx512vnni", "avxvnni", "avx2" (x86-64), "i8mm", "dotprod" (arm64) or "generic"; 0 or DG_E_ISA. */
int dg_select_int8(const char *isa);
const char *dg_int8_isa(void);
/* On (1): dg_linear and dg_ffn multiply weights of the types dg_int8_supports (dg_ffn: all three of its
 * matrices) on activations quantized to int8 per 32 values, and dg_soft_embed's dense rows of such a table are
 * integer products too (dg_int8.c soft_embed); BF16 weights, on the sets that take them (avx512bf16, generic),
 * multiply activations rounded to bfloat16 instead; off (0, the default): every matmul in float32. */
void dg_set_int8(int on);
int dg_int8_supports(int type);
/* The activation quantization of the int8 kernels: per 32 values d = amax / 127, q = rint(x / d). n % 32 == 0. */
int dg_q8_quantize(const float *x, int64_t n, int8_t *q, float *d);
/* The int8 kernels' view of one weight row of k values (k % 256 == 0): codes u[k] (0..255) and per 16 values a
 * scale s and an offset o, value = s * u - o. DG_E_TYPE for a type the int8 kernels do not take. */
int dg_int8_codes(int type, const uint8_t *row, int64_t k, float tensor_scale, uint8_t *u, float *s, float *o);
/* Threads for the following calls (1 when built without OpenMP). */
void dg_set_threads(int n);
int dg_threads(void);
int dg_has_openmp(void);

/* out[i, :] = decode(W[idx[i], :]) * tensor_scale * out_scale, i < n; idx NULL means rows 0..n-1. */
int dg_dequant_rows(int type, const uint8_t *w, int64_t row_bytes, int64_t cols, float tensor_scale,
                    const int64_t *idx, int64_t n, float out_scale, float *out);

/* C[M, N] = A[M, K] @ W[N, K]^T. */
int dg_linear(const float *a, int64_t m, int64_t k, int type, const uint8_t *w, int64_t row_bytes,
              float tensor_scale, int64_t n, float *c);

/* The self-conditioning soft embedding: out[i, :] = scale * softmax(x[i]) @ T for T [vocab, n] of any type, from
 * x's row statistics (dg_row_stats, or the sampler's). A row with kept_n[i] <= max_kept sums just its kept
 * tokens' rows when mass[i] * norm_bound <= rel_tol * ||that sum|| (the sparse path: path[i] = kept_n[i]);
 * the others take the dense product (path[i] = -1), in float32, or with int8 on and a quantized T (n % 32 == 0)
 * in integers. See numpy_backend.sparse_soft_embed_row for the bound. */
int dg_soft_embed(const float *x, int64_t rows, int64_t vocab, const float *row_max, const float *row_total,
                  const double *mass, const int64_t *kept_n, const int32_t *kept, int64_t max_kept, int type,
                  const uint8_t *t, int64_t row_bytes, float tensor_scale, int64_t n, float scale, double norm_bound,
                  double rel_tol, float *out, int64_t *path);
/* *out = the largest Euclidean norm of a row of W [rows, cols] (float64 sums of the decoded values). */
int dg_max_row_norm(int type, const uint8_t *w, int64_t row_bytes, int64_t cols, float tensor_scale, int64_t rows,
                    double *out);

/* Gated-GELU feed-forward over expert groups. x [n, hidden]; out [n, hidden] is overwritten with
 * sum over (token t, slot s) of weights[t, s] * down_e(gelu_tanh(gate_e(x_t)) * up_e(x_t)), e = index[t, s].
 * index/weights NULL: one expert, every token with weight 1 (the dense MLP). Each matrix is given as
 * (type, base pointer, row bytes, bytes between experts, tensor scale); gate/up are [inter, hidden],
 * down is [hidden, inter]. */
int dg_ffn(const float *x, int64_t n, int64_t hidden, int64_t inter, const int64_t *index, const float *weights,
           int64_t top_k, int64_t n_experts,
           int gate_type, const uint8_t *gate, int64_t gate_row_bytes, int64_t gate_stride, float gate_scale,
           int up_type, const uint8_t *up, int64_t up_row_bytes, int64_t up_stride, float up_scale,
           int down_type, const uint8_t *down, int64_t down_row_bytes, int64_t down_stride, float down_scale,
           float *out);

/* softmax(q k^T) v per head, scaling 1.0, grouped KV heads. q [n, hq, d], k [m, hkv, d], v [m, hkv, dv],
 * out [n, hq, dv]. Key j is visible to query i when (!causal || kpos[j] <= qpos[i]) and
 * (window <= 0 || kpos[j] > qpos[i] - window). kpos must ascend: each block of queries visits only the range of
 * keys it can see. A query that sees no key gets NaN (0/0), as the plain softmax would. */
int dg_attention(const float *q, int64_t n, int64_t hq, int64_t d, const float *k, const float *v, int64_t m,
                 int64_t hkv, int64_t dv, const int64_t *qpos, const int64_t *kpos, int causal, int64_t window,
                 float *out);

/* out = x * (mean(x^2) + eps)^-0.5 [* w] over rows of `width`. */
int dg_rms_norm(const float *x, int64_t rows, int64_t width, const float *w, float eps, float *out);
/* The mixture of experts' router, per token t of x [n, hidden] (numpy_backend.route): h = rms_norm(x_t) * scale
 * * c (no norm weight; multiplied in that order), p = softmax(proj @ h) over the experts, the top_k of them by p
 * (ties to the lower index) in index[t] and p / (their sum) * per_expert in weights[t]. proj [experts, hidden]. */
int dg_route(const float *x, int64_t n, int64_t hidden, int type, const uint8_t *proj, int64_t row_bytes,
             float tensor_scale, int64_t experts, const float *scale, float c, const float *per_expert, int64_t top_k,
             float eps, float *weights, int64_t *index);
/* out = tanh(x / cap) * cap. */
int dg_softcap(const float *x, int64_t n, float cap, float *out);
/* out = gelu_tanh(gate) * up, elementwise. */
int dg_gelu_mul(const float *gate, const float *up, int64_t n, float *out);
/* RoPE's angles a = pos[i] * inv_freq[f] (float32 product, as numpy) as cos_a, sin_a [n, half]. */
int dg_rope_table(const int64_t *pos, int64_t n, const float *inv_freq, int64_t half, float *cos_a, float *sin_a);
/* Rotate-half RoPE on x [n, heads, d], row i by the angles of row i of cos_a, sin_a [n, d / 2] (dg_rope_table). */
int dg_rope(const float *x, int64_t n, int64_t heads, int64_t d, const float *cos_a, const float *sin_a, float *out);
/* Row softmax: exp(x - max) / row_total, the probabilities every kernel below uses. */
int dg_softmax(const float *x, int64_t rows, int64_t cols, float *out);
/* Per row of x [rows, vocab]: row_max, row_total = float32(sum exp(x - max)); the sparse soft embedding's split:
 * kept_n = how many tokens have x >= max - keep_logit (the first max_kept of them listed in index order at
 * kept[i * max_kept]), mass = the softmax mass of all the others. */
int dg_row_stats(const float *x, int64_t rows, int64_t vocab, float keep_logit, int64_t max_kept, float *row_max,
                 float *row_total, double *mass, int64_t *kept_n, int32_t *kept);
/* The fused sampler step on [rows, vocab] logits, in place and one row (group) at a time: logits become the
 * processed logits logits / temp; then dg_row_stats' outputs, argmax (first maximum) and the entropy of the
 * softmax; if u is not NULL also the inverse-CDF draw sampled[i] = min(#{j : cdf[j] <= u[i] * cdf[vocab-1]},
 * vocab - 1), cdf the float64 cumulative sum of the softmax. No other canvas x vocab array is made. */
int dg_sampler(float *logits, int64_t rows, int64_t vocab, float temp, int64_t *argmax, float *entropy,
               const double *u, int64_t *sampled, float keep_logit, int64_t max_kept, float *row_max,
               float *row_total, double *mass, int64_t *kept_n, int32_t *kept);

#endif
