// dg_elementwise.cu — embeddings, RMSNorm, RoPE and the pointwise ops of the graph.
//
// Each kernel is the plain loop of its numpy reference (dgrun/backends/numpy_backend.py), one thread per
// output element or one block per row; the per-element math lives in dg_math.cuh.
#include "dg_common.cuh"

// Grid-stride loop over n elements.
#define DG_FOR_EACH(i, n) \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

static unsigned grid_for(int64_t n) {
    unsigned blocks = dg_blocks(n, 256);
    unsigned cap = (unsigned)dg_sm_count * 32u;  // enough blocks to fill the device; the loop does the rest
    return blocks < cap ? blocks : cap;
}

// numpy: table.rows(ids) * scale — dequantize the rows (NVFP4 tensor scale included), then scale.
__global__ void embed_kernel(const uint8_t* table, int type, int64_t row_bytes, float tensor_scale, int width,
                             const int32_t* ids, int n, float scale, float* out) {
    const uint8_t* row = table + (int64_t)ids[blockIdx.x] * row_bytes;
    for (int c = threadIdx.x; c < width; c += blockDim.x)
        out[(int64_t)blockIdx.x * width + c] = dg_mul(dg_row_value(type, row, c, tensor_scale), scale);
}

// numpy: x * (mean(x * x) + eps) ** -0.5 [* weight], one block per row.
__global__ void rms_norm_kernel(const float* x, const float* weight, int width, float eps, float* out) {
    __shared__ float partial[32];
    const float* row = x + (int64_t)blockIdx.x * width;
    float* dst = out + (int64_t)blockIdx.x * width;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < width; c += blockDim.x) ss = dg_add(ss, dg_mul(row[c], row[c]));  // no FMA
    ss = dg_block_sum(ss, partial);
    float r = powf(ss / (float)width + eps, -0.5f);
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        float v = dg_mul(row[c], r);
        dst[c] = weight ? dg_mul(v, weight[c]) : v;
    }
}

// One thread per rotated pair (i, head, j < d/2).
__global__ void rope_kernel(const float* x, const int32_t* positions, const float* inv_freq, int n, int heads,
                            int head_dim, float* out) {
    int half = head_dim / 2;
    int64_t pairs = (int64_t)n * heads * half;
    DG_FOR_EACH(p, pairs) {
        int j = (int)(p % half);
        int64_t vec = p / half;  // (i * heads + h)
        int i = (int)(vec / heads);
        float theta = dg_rope_angle(positions[i], inv_freq[j]);
        const float* src = x + vec * head_dim;
        float* dst = out + vec * head_dim;
        dg_rope_pair(src[j], src[j + half], cosf(theta), sinf(theta), &dst[j], &dst[j + half]);
    }
}

__global__ void softcap_kernel(const float* x, int64_t n, float cap, float* out) {
    DG_FOR_EACH(i, n) out[i] = dg_softcap(x[i], cap);
}

__global__ void gelu_mul_kernel(const float* gate, const float* up, int64_t n, float* out) {
    DG_FOR_EACH(i, n) out[i] = dg_mul(dg_gelu_tanh(gate[i]), up[i]);
}

__global__ void add_kernel(const float* a, const float* b, int64_t n, float* out) {
    DG_FOR_EACH(i, n) out[i] = dg_add(a[i], b[i]);
}

__global__ void mul_bcast_kernel(const float* a, const float* b, int64_t n, int64_t period, float* out) {
    DG_FOR_EACH(i, n) out[i] = dg_mul(a[i], b[i % period]);
}

__global__ void scale_kernel(const float* a, float alpha, int64_t n, float* out) {
    DG_FOR_EACH(i, n) out[i] = dg_mul(a[i], alpha);
}

extern "C" {

int dg_embed(const void* table, int type, int64_t row_bytes, float tensor_scale, int width, const int32_t* ids,
             int n, float scale, float* out) {
    DG_ENTER();
    if (n <= 0) return 0;
    embed_kernel<<<n, 256, 0, dg_stream>>>((const uint8_t*)table, type, row_bytes, tensor_scale, width, ids, n,
                                            scale, out);
    DG_LAUNCHED(embed_kernel);
    return 0;
}

int dg_rms_norm(const float* x, const float* weight, int rows, int width, float eps, float* out) {
    DG_ENTER();
    if (rows <= 0) return 0;
    rms_norm_kernel<<<rows, 256, 0, dg_stream>>>(x, weight, width, eps, out);
    DG_LAUNCHED(rms_norm_kernel);
    return 0;
}

int dg_rope(const float* x, const int32_t* positions, const float* inv_freq, int n, int heads, int head_dim,
            float* out) {
    DG_ENTER();
    DG_REQUIRE(head_dim % 2 == 0, "head_dim must be even");
    int64_t pairs = (int64_t)n * heads * (head_dim / 2);
    if (pairs <= 0) return 0;
    rope_kernel<<<grid_for(pairs), 256, 0, dg_stream>>>(x, positions, inv_freq, n, heads, head_dim, out);
    DG_LAUNCHED(rope_kernel);
    return 0;
}

int dg_softcap(const float* x, int64_t n, float cap, float* out) {
    DG_ENTER();
    if (n <= 0) return 0;
    softcap_kernel<<<grid_for(n), 256, 0, dg_stream>>>(x, n, cap, out);
    DG_LAUNCHED(softcap_kernel);
    return 0;
}

int dg_gelu_mul(const float* gate, const float* up, int64_t n, float* out) {
    DG_ENTER();
    if (n <= 0) return 0;
    gelu_mul_kernel<<<grid_for(n), 256, 0, dg_stream>>>(gate, up, n, out);
    DG_LAUNCHED(gelu_mul_kernel);
    return 0;
}

int dg_add(const float* a, const float* b, int64_t n, float* out) {
    DG_ENTER();
    if (n <= 0) return 0;
    add_kernel<<<grid_for(n), 256, 0, dg_stream>>>(a, b, n, out);
    DG_LAUNCHED(add_kernel);
    return 0;
}

int dg_mul_bcast(const float* a, const float* b, int64_t n, int64_t period, float* out) {
    DG_ENTER();
    DG_REQUIRE(period > 0, "period must be positive");
    if (n <= 0) return 0;
    mul_bcast_kernel<<<grid_for(n), 256, 0, dg_stream>>>(a, b, n, period, out);
    DG_LAUNCHED(mul_bcast_kernel);
    return 0;
}

int dg_scale(const float* a, float alpha, int64_t n, float* out) {
    DG_ENTER();
    if (n <= 0) return 0;
    scale_kernel<<<grid_for(n), 256, 0, dg_stream>>>(a, alpha, n, out);
    DG_LAUNCHED(scale_kernel);
    return 0;
}

}  // extern "C"
