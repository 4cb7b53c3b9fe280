/* dgrun CPU kernels: the exported API (dg_cpu.h), dispatching to the kernel set chosen at run time.
 *
 * build.py compiles dg_kernels.c once per instruction set this compiler can target and defines DG_HAVE_<ISA> for
 * each one it built; "auto" picks the widest that this CPU supports (checked with __builtin_cpu_supports).
 */
#include <string.h>
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif
#if defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#include "dg_cpu.h"
#include "dg_internal.h"

extern const dg_kernel_set dg_kernels_generic;
#ifdef DG_HAVE_AVX2
extern const dg_kernel_set dg_kernels_avx2;
#endif
#ifdef DG_HAVE_AVX512
extern const dg_kernel_set dg_kernels_avx512;
#endif

extern const dg_int8_set dg_int8_generic;
#ifdef DG_HAVE_INT8_AVX2
extern const dg_int8_set dg_int8_avx2;
#endif
#ifdef DG_HAVE_INT8_AVXVNNI
extern const dg_int8_set dg_int8_avxvnni;
#endif
#ifdef DG_HAVE_INT8_AVX512BF16
extern const dg_int8_set dg_int8_avx512bf16;
#endif
#ifdef DG_HAVE_INT8_AVX512VNNI
extern const dg_int8_set dg_int8_avx512vnni;
#endif
#ifdef DG_HAVE_INT8_DOTPROD
extern const dg_int8_set dg_int8_dotprod;
#endif
#ifdef DG_HAVE_INT8_I8MM
extern const dg_int8_set dg_int8_i8mm;
#endif

int dg_nthreads = 1;
static const dg_kernel_set *K = &dg_kernels_generic;
static const dg_int8_set *K8 = &dg_int8_generic;
static int int8_on = 0;

static int cpu_has(const char *isa) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (!strcmp(isa, "avx512"))
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("fma");
    if (!strcmp(isa, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (!strcmp(isa, "avxvnni")) return cpu_has("avx2") && __builtin_cpu_supports("avxvnni");
    if (!strcmp(isa, "avx512vnni"))
        return cpu_has("avx2") && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
    if (!strcmp(isa, "avx512bf16")) return cpu_has("avx512vnni") && __builtin_cpu_supports("avx512bf16");
#endif
#if defined(__aarch64__) && defined(__linux__)
    if (!strcmp(isa, "dotprod")) return (getauxval(AT_HWCAP) & (1UL << 20)) != 0;  /* HWCAP_ASIMDDP */
    if (!strcmp(isa, "i8mm")) return cpu_has("dotprod") && (getauxval(AT_HWCAP2) & (1UL << 13)) != 0;  /* HWCAP2_I8MM */
#elif defined(__aarch64__) && defined(__APPLE__)
    if (!strcmp(isa, "dotprod") || !strcmp(isa, "i8mm")) {
        int on = 0;
        size_t size = sizeof(on);
        const char *key = strcmp(isa, "i8mm") ? "hw.optional.arm.FEAT_DotProd" : "hw.optional.arm.FEAT_I8MM";
        return sysctlbyname(key, &on, &size, NULL, 0) == 0 && on;
    }
#endif
    return !strcmp(isa, "generic");
}

/* The int8 kernel sets, best first; "auto" takes the best this CPU runs. */
int dg_select_int8(const char *isa) {
    const dg_int8_set *sets[] = {
#ifdef DG_HAVE_INT8_I8MM
        &dg_int8_i8mm,
#endif
#ifdef DG_HAVE_INT8_DOTPROD
        &dg_int8_dotprod,
#endif
#ifdef DG_HAVE_INT8_AVX512BF16
        &dg_int8_avx512bf16,
#endif
#ifdef DG_HAVE_INT8_AVX512VNNI
        &dg_int8_avx512vnni,
#endif
#ifdef DG_HAVE_INT8_AVXVNNI
        &dg_int8_avxvnni,
#endif
#ifdef DG_HAVE_INT8_AVX2
        &dg_int8_avx2,
#endif
        &dg_int8_generic,
    };
    for (size_t i = 0; i < sizeof(sets) / sizeof(sets[0]); i++) {
        if ((!strcmp(isa, "auto") || !strcmp(isa, sets[i]->name)) && cpu_has(sets[i]->name)) {
            K8 = sets[i];
            return 0;
        }
    }
    return DG_E_ISA;
}

const char *dg_int8_isa(void) { return K8->name; }

void dg_set_int8(int on) { int8_on = on != 0; }

int dg_int8_supports(int type) { return K8->supports(type); }

int dg_q8_quantize(const float *x, int64_t n, int8_t *q, float *d) { return K8->q8_quantize(x, n, q, d); }

int dg_int8_codes(int type, const uint8_t *row, int64_t k, float tensor_scale, uint8_t *u, float *s, float *o) {
    return K8->codes(type, row, k, tensor_scale, u, s, o);
}

int dg_select_isa(const char *isa) {
    const dg_kernel_set *sets[] = {
#ifdef DG_HAVE_AVX512
        &dg_kernels_avx512,
#endif
#ifdef DG_HAVE_AVX2
        &dg_kernels_avx2,
#endif
        &dg_kernels_generic,
    };
    for (size_t i = 0; i < sizeof(sets) / sizeof(sets[0]); i++) {
        if ((!strcmp(isa, "auto") || !strcmp(isa, sets[i]->name)) && cpu_has(sets[i]->name)) {
            K = sets[i];
            return 0;
        }
    }
    return DG_E_ISA;
}

const char *dg_isa(void) { return K->name; }

#ifndef DG_SOURCE_HASH
#define DG_SOURCE_HASH "unknown"
#endif
const char *dg_source_hash(void) { return DG_SOURCE_HASH; }

void dg_set_threads(int n) {
#ifdef _OPENMP
    dg_nthreads = n > 0 ? n : 1;
#else
    (void)n;
    dg_nthreads = 1;
#endif
}

int dg_threads(void) { return dg_nthreads; }

int dg_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int dg_dequant_rows(int type, const uint8_t *w, int64_t row_bytes, int64_t cols, float tensor_scale,
                    const int64_t *idx, int64_t n, float out_scale, float *out) {
    return K->dequant_rows(type, w, row_bytes, cols, tensor_scale, idx, n, out_scale, out);
}

int dg_linear(const float *a, int64_t m, int64_t k, int type, const uint8_t *w, int64_t row_bytes,
              float tensor_scale, int64_t n, float *c) {
    if (int8_on && K8->supports(type)) {
        const int rc = K8->linear(a, m, k, type, w, row_bytes, tensor_scale, n, c);
        if (rc != DG_E_TYPE) return rc; /* a row width it cannot block: the float kernels take it */
    }
    return K->linear(a, m, k, type, w, row_bytes, tensor_scale, n, c);
}

int dg_soft_embed(const float *x, int64_t rows, int64_t vocab, const float *row_max, const float *row_total,
                  const double *mass, const int64_t *kept_n, const int32_t *kept, int64_t max_kept, int type,
                  const uint8_t *t, int64_t row_bytes, float tensor_scale, int64_t n, float scale, double norm_bound,
                  double rel_tol, float *out, int64_t *path) {
    const int int8 = int8_on && K8->supports(type) && n % 32 == 0;
    int rc = K->soft_embed(x, rows, vocab, row_max, row_total, mass, kept_n, kept, max_kept, type, t, row_bytes,
                           tensor_scale, n, scale, norm_bound, rel_tol, !int8, out, path);
    if (rc || !int8) return rc;
    return K8->soft_embed(x, rows, vocab, row_max, row_total, path, type, t, row_bytes, tensor_scale, n, scale, out);
}

int dg_max_row_norm(int type, const uint8_t *w, int64_t row_bytes, int64_t cols, float tensor_scale, int64_t rows,
                    double *out) {
    return K->max_row_norm(type, w, row_bytes, cols, tensor_scale, rows, out);
}

int dg_ffn(const float *x, int64_t n, int64_t hidden, int64_t inter, const int64_t *index, const float *weights,
           int64_t top_k, int64_t n_experts, int gate_type, const uint8_t *gate, int64_t gate_row_bytes,
           int64_t gate_stride, float gate_scale, int up_type, const uint8_t *up, int64_t up_row_bytes,
           int64_t up_stride, float up_scale, int down_type, const uint8_t *down, int64_t down_row_bytes,
           int64_t down_stride, float down_scale, float *out) {
    if (int8_on && K8->supports(gate_type) && K8->supports(up_type) && K8->supports(down_type)) {
        const int rc = K8->ffn(x, n, hidden, inter, index, weights, top_k, n_experts, gate_type, gate, gate_row_bytes,
                               gate_stride, gate_scale, up_type, up, up_row_bytes, up_stride, up_scale, down_type, down,
                               down_row_bytes, down_stride, down_scale, out);
        if (rc != DG_E_TYPE) return rc;
    }
    return K->ffn(x, n, hidden, inter, index, weights, top_k, n_experts, gate_type, gate, gate_row_bytes, gate_stride,
                  gate_scale, up_type, up, up_row_bytes, up_stride, up_scale, down_type, down, down_row_bytes,
                  down_stride, down_scale, out);
}

int dg_attention(const float *q, int64_t n, int64_t hq, int64_t d, const float *k, const float *v, int64_t m,
                 int64_t hkv, int64_t dv, const int64_t *qpos, const int64_t *kpos, int causal, int64_t window,
                 float *out) {
    return K->attention(q, n, hq, d, k, v, m, hkv, dv, qpos, kpos, causal, window, out);
}

int dg_rms_norm(const float *x, int64_t rows, int64_t width, const float *w, float eps, float *out) {
    return K->rms_norm(x, rows, width, w, eps, out);
}

int dg_route(const float *x, int64_t n, int64_t hidden, int type, const uint8_t *proj, int64_t row_bytes,
             float tensor_scale, int64_t experts, const float *scale, float c, const float *per_expert, int64_t top_k,
             float eps, float *weights, int64_t *index) {
    return K->route(x, n, hidden, type, proj, row_bytes, tensor_scale, experts, scale, c, per_expert, top_k, eps,
                    weights, index);
}
int dg_softcap(const float *x, int64_t n, float cap, float *out) { return K->softcap(x, n, cap, out); }

int dg_gelu_mul(const float *gate, const float *up, int64_t n, float *out) { return K->gelu_mul(gate, up, n, out); }

int dg_rope_table(const int64_t *pos, int64_t n, const float *inv_freq, int64_t half, float *cos_a, float *sin_a) {
    return K->rope_table(pos, n, inv_freq, half, cos_a, sin_a);
}

int dg_rope(const float *x, int64_t n, int64_t heads, int64_t d, const float *cos_a, const float *sin_a, float *out) {
    return K->rope(x, n, heads, d, cos_a, sin_a, out);
}

int dg_softmax(const float *x, int64_t rows, int64_t cols, float *out) { return K->softmax(x, rows, cols, out); }

int dg_row_stats(const float *x, int64_t rows, int64_t vocab, float keep_logit, int64_t max_kept, float *row_max,
                 float *row_total, double *mass, int64_t *kept_n, int32_t *kept) {
    return K->row_stats(x, rows, vocab, keep_logit, max_kept, row_max, row_total, mass, kept_n, kept);
}

int dg_sampler(float *logits, int64_t rows, int64_t vocab, float temp, int64_t *argmax, float *entropy,
               const double *u, int64_t *sampled, float keep_logit, int64_t max_kept, float *row_max,
               float *row_total, double *mass, int64_t *kept_n, int32_t *kept) {
    return K->sampler(logits, rows, vocab, temp, argmax, entropy, u, sampled, keep_logit, max_kept, row_max,
                      row_total, mass, kept_n, kept);
}
