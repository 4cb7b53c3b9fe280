// dg_host.cpp — array wrappers over dg_math.cuh for the host test library (see dg_host.h).
// Built with g++ -ffp-contract=off so the host never fuses what numpy rounds separately.
#include "dg_host.h"

#include <stdlib.h>

#include "dg_math.cuh"
#include "dg_scratch.h"

namespace {

// A malloc that counts what is live and fails the nth allocation, for DgScratchSet's error paths.
struct CountingPool {
    static int live, fail_at, calls;
    static int allocate(void** out, size_t bytes) {
        if (++calls == fail_at) return 2;  // cudaErrorMemoryAllocation's value; any nonzero would do
        *out = malloc(bytes);
        if (!*out) return 2;
        ++live;
        return 0;
    }
    static void release(void* p) {
        free(p);
        --live;
    }
};
int CountingPool::live = 0, CountingPool::fail_at = 0, CountingPool::calls = 0;

// The shape of every kernel entry point that takes scratch: allocate `count` buffers, return at the first
// failure, else "launch" and return.
int uses_scratch(int count) {
    DgScratchSet<CountingPool> scratch;
    for (int i = 0; i < count; ++i) {
        float* p;
        int status = scratch.get(&p, 1000);
        if (status) return status;
        p[0] = 1.0f;
    }
    return 0;
}

}  // namespace

extern "C" {

int dg_host_dequant_row(int type, const uint8_t* row, float* out, int64_t n, float tensor_scale) {
    int block = dg_block_size(type);
    if (block == 0 || n % block || n > INT32_MAX) return 1;
    for (int64_t k = 0; k < n; ++k) out[k] = dg_row_value(type, row, (int)k, tensor_scale);
    return 0;
}

void dg_host_e2m1(const uint8_t* codes, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = (float)dg_e2m1_doubled(codes[i]);
}

void dg_host_e8m0_half(const uint8_t* codes, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = dg_e8m0_half(codes[i]);
}

void dg_host_ue4m3_half(const uint8_t* codes, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = dg_ue4m3_half(codes[i]);
}

void dg_host_softcap(const float* x, float* out, int64_t n, float cap) {
    for (int64_t i = 0; i < n; ++i) out[i] = dg_softcap(x[i], cap);
}

void dg_host_gelu_tanh(const float* x, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = dg_gelu_tanh(x[i]);
}

void dg_host_rope_pairs(const float* x0, const float* x1, const float* c, const float* s, float* y0, float* y1,
                        int64_t n) {
    for (int64_t i = 0; i < n; ++i) dg_rope_pair(x0[i], x1[i], c[i], s[i], &y0[i], &y1[i]);
}

void dg_host_rope_angles(const int32_t* positions, const float* inv_freq, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = dg_rope_angle(positions[i], inv_freq[i]);
}

void dg_host_entropy_rows(const float* x, float* out, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* row = x + r * cols;
        float m = row[0];
        for (int64_t i = 1; i < cols; ++i) m = row[i] > m ? row[i] : m;
        float z = 0.0f, s = 0.0f;
        for (int64_t i = 0; i < cols; ++i) dg_entropy_accumulate(row[i], m, &z, &s);
        out[r] = dg_entropy_finish(z, s);
    }
}

void dg_host_sparse_keep(const float* x, const float* m, float keep_logit, uint8_t* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = dg_sparse_keep(x[i], m[i], keep_logit) ? 1 : 0;
}

void dg_host_softmax_prob(const float* x, const float* m, const float* total, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = dg_softmax_prob(x[i], m[i], total[i]);
}

void dg_host_sparse_accept(const double* mass, const double* norm2, double norm_bound, double rel_tol, uint8_t* out,
                           int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = dg_sparse_accept(mass[i], norm_bound, rel_tol, norm2[i]) ? 1 : 0;
}

void dg_host_philox(const uint32_t* counters, const uint32_t* key, uint32_t* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dg_philox4x32_10(counters + 4 * i, key, out + 4 * i);
}

void dg_host_uniform01(const uint32_t* r, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = dg_uniform01(r[i]);
}

void dg_host_uniform_int(const uint32_t* hi, const uint32_t* lo, uint32_t bound, uint32_t* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = dg_uniform_int(hi[i], lo[i], bound);
}

void dg_host_key_range(const int32_t* k_pos, int m, const int32_t* q_min, const int32_t* q_max, int causal,
                       int window, int32_t* lo, int32_t* hi, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dg_key_range(k_pos, m, q_min[i], q_max[i], causal, window, &lo[i], &hi[i]);
}

int dg_host_scratch_run(int count, int fail_at, int* live_after) {
    CountingPool::live = 0;
    CountingPool::calls = 0;
    CountingPool::fail_at = fail_at;
    int status = uses_scratch(count);
    *live_after = CountingPool::live;
    return status;
}

void dg_host_visible(const int32_t* q_pos, const int32_t* k_pos, int causal, int window, uint8_t* out,
                     int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = dg_visible(q_pos[i], k_pos[i], causal, window) ? 1 : 0;
}

}  // extern "C"
