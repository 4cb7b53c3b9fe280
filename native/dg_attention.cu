// dg_attention.cu — flash-style attention: softmax(q k^T) v over [KV cache | new tokens], scaling 1.0.
//
// Reference: numpy_backend.attention (scores masked by positions, softmax, @ v). Here no score matrix
// exists: one warp owns one (query, head) and walks the keys in tiles with an online softmax (running
// max m, running sum l, running output acc rescaled whenever m grows). The warps of a block share the
// query head, so each K/V tile is staged in shared memory once for all of them. Key positions ascend, so a
// block walks only the range of keys its queries can see (dg_key_range: the window's start to the last query),
// not the whole prompt; tiles outside it would contribute exactly nothing.
#include "dg_common.cuh"

namespace {

constexpr int WARPS = 8;  // queries per block

// Keys per staged tile: K and V tiles of KT x d floats stay within 32 KiB whatever d (<= 512).
template <int DPL>
__host__ __device__ constexpr int keys_per_tile() { return DPL >= 16 ? 8 : DPL >= 8 ? 16 : 32; }

// DPL: head values per lane (head_dim <= 32 * DPL); lane owns values t * 32 + lane.
template <int DPL>
__global__ void __launch_bounds__(WARPS * 32) attention_kernel(const float* q, const float* k, const float* v,
                                                                const int32_t* q_pos, const int32_t* k_pos, int n,
                                                                int m, int q_heads, int kv_heads, int d, int causal,
                                                                int window, float* out) {
    constexpr int KT = keys_per_tile<DPL>();
    extern __shared__ float tiles[];
    float* ks = tiles;            // [KT][d]
    float* vs = tiles + KT * d;   // [KT][d]
    __shared__ int kp[KT];

    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int query = blockIdx.x * WARPS + warp, head = blockIdx.y;
    int kv_head = head / (q_heads / kv_heads);
    bool active = query < n;

    float qv[DPL], acc[DPL];
    const float* qrow = q + ((int64_t)(active ? query : 0) * q_heads + head) * d;
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
        int e = t * 32 + lane;
        qv[t] = active && e < d ? qrow[e] : 0.0f;
        acc[t] = 0.0f;
    }
    int qp = active ? q_pos[query] : 0;
    float run_max = -INFINITY, run_sum = 0.0f;

    // The block's key range, from its queries' smallest and largest positions (every thread, same answer).
    int first = blockIdx.x * WARPS, last = min(n, first + WARPS) - 1;
    int q_min = q_pos[first], q_max = q_min;
    for (int i = first + 1; i <= last; ++i) {
        q_min = min(q_min, q_pos[i]);
        q_max = max(q_max, q_pos[i]);
    }
    int key_lo, key_hi;
    dg_key_range(k_pos, m, q_min, q_max, causal, window, &key_lo, &key_hi);

    for (int key0 = key_lo; key0 < key_hi; key0 += KT) {
        __syncthreads();  // every warp is done with the previous tile
        for (int idx = threadIdx.x; idx < KT * d; idx += blockDim.x) {
            int j = idx / d, e = idx % d, key = key0 + j;
            int64_t src = ((int64_t)key * kv_heads + kv_head) * d + e;
            ks[idx] = key < key_hi ? k[src] : 0.0f;
            vs[idx] = key < key_hi ? v[src] : 0.0f;
        }
        if (threadIdx.x < KT) kp[threadIdx.x] = key0 + (int)threadIdx.x < key_hi ? k_pos[key0 + threadIdx.x] : 0;
        __syncthreads();
        if (!active) continue;

        float score[KT];
        float tile_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < KT; ++j) {
            float dot = 0.0f;
#pragma unroll
            for (int t = 0; t < DPL; ++t) {
                int e = t * 32 + lane;
                if (e < d) dot = fmaf(qv[t], ks[j * d + e], dot);
            }
            dot = dg_warp_sum(dot);
            bool visible = key0 + j < key_hi && dg_visible(qp, kp[j], causal, window);
            score[j] = visible ? dot : -INFINITY;
            tile_max = fmaxf(tile_max, score[j]);
        }
        float new_max = fmaxf(run_max, tile_max);
        if (new_max == -INFINITY) continue;  // nothing visible yet
        float correction = expf(run_max - new_max);  // 0 on the first visible tile
        run_sum = dg_mul(run_sum, correction);  // not fused with the "+= p" below
#pragma unroll
        for (int t = 0; t < DPL; ++t) acc[t] *= correction;
#pragma unroll
        for (int j = 0; j < KT; ++j) {
            float p = expf(score[j] - new_max);
            run_sum += p;
#pragma unroll
            for (int t = 0; t < DPL; ++t) {
                int e = t * 32 + lane;
                if (e < d) acc[t] = fmaf(p, vs[j * d + e], acc[t]);
            }
        }
        run_max = new_max;
    }
    if (!active) return;
    float* orow = out + ((int64_t)query * q_heads + head) * d;
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
        int e = t * 32 + lane;
        if (e < d) orow[e] = acc[t] / run_sum;  // 0/0 = NaN when no key is visible, as numpy's softmax gives
    }
}

template <int DPL>
int launch(const float* q, const float* k, const float* v, const int32_t* q_pos, const int32_t* k_pos, int n,
           int m, int q_heads, int kv_heads, int d, int causal, int window, float* out) {
    size_t shared = 2 * (size_t)keys_per_tile<DPL>() * d * sizeof(float);
    dim3 grid(dg_blocks(n, WARPS), q_heads);
    attention_kernel<DPL><<<grid, WARPS * 32, shared, dg_stream>>>(q, k, v, q_pos, k_pos, n, m, q_heads, kv_heads, d,
                                                                   causal, window, out);
    DG_LAUNCHED(attention_kernel);
    return 0;
}

}  // namespace

extern "C" int dg_attention(const float* q, const float* k, const float* v, const int32_t* q_pos,
                            const int32_t* k_pos, int n, int m, int q_heads, int kv_heads, int head_dim, int causal,
                            int window, float* out) {
    DG_ENTER();
    DG_REQUIRE(head_dim > 0 && head_dim <= 512, "head_dim must be in 1..512");
    DG_REQUIRE(kv_heads > 0 && q_heads % kv_heads == 0, "q_heads must be a multiple of kv_heads");
    DG_REQUIRE(q_heads <= 65535, "too many heads");
    if (n <= 0) return 0;
    int dpl = (head_dim + 31) / 32;
    if (dpl <= 1) return launch<1>(q, k, v, q_pos, k_pos, n, m, q_heads, kv_heads, head_dim, causal, window, out);
    if (dpl <= 2) return launch<2>(q, k, v, q_pos, k_pos, n, m, q_heads, kv_heads, head_dim, causal, window, out);
    if (dpl <= 4) return launch<4>(q, k, v, q_pos, k_pos, n, m, q_heads, kv_heads, head_dim, causal, window, out);
    if (dpl <= 8) return launch<8>(q, k, v, q_pos, k_pos, n, m, q_heads, kv_heads, head_dim, causal, window, out);
    return launch<16>(q, k, v, q_pos, k_pos, n, m, q_heads, kv_heads, head_dim, causal, window, out);
}
