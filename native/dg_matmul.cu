// dg_matmul.cu — dequantizing matmuls: linear layers, the grouped MoE GEMM, the router and the
// self-conditioning soft embedding (its sparse rows gather a few embedding rows, the rest share one GEMM).
//
// One tiled kernel serves them all. A block computes a 64 x 64 tile of Y = A @ B, stepping through K in
// slices of 32: it stages the A slice (activations, optionally gathered rows or softmax probabilities) and
// the B slice (weights, decoded from their ggml blocks by dg_row_value) as float32 in shared memory, then
// multiplies them with one of two engines:
//   - FP32: each of the 128 threads accumulates a 4 x 8 sub-tile with float32 FMAs (the reference path);
//   - TF32: each of the 4 warps accumulates a 32 x 32 sub-tile with WMMA m16n16k8 TF32 tensor-core ops.
// Weights stay in their block types in device memory; each slice is decoded once per block, into shared
// memory only. The plain reference of the whole thing is `x @ dequantize(W).T` (numpy_backend.linear).
#include <mma.h>
#include <stdlib.h>

#include "dg_common.cuh"

namespace {

constexpr int TM = 64;            // rows of A (tokens) per block
constexpr int TN = 64;            // output features per block
constexpr int TK = 32;            // K slice staged per step
constexpr int LDS = TK + 4;       // padded shared row: conflict-free reads, 16-byte multiple for WMMA
constexpr int LDC = TN + 4;       // padded row of the staged output tile
constexpr int THREADS = 128;

// Where a block's A rows come from and where its weights live.
struct GemmArgs {
    const float* a;          // activations [rows, lda]
    const int32_t* a_rows;   // optional gather: tile row r reads a[a_rows[r]] (MoE tokens sorted by expert)
    int64_t lda;
    const float* row_max;    // optional softmax on load: A = exp(a - row_max[r]) / row_sum[r]
    const float* row_sum;
    const uint8_t* w;        // weight blocks
    int w_type;
    int64_t w_row_bytes;
    float w_scale;
    int64_t w_expert_bytes;  // bytes between experts' matrices (grouped mode)
    int w_kn;                // 1: weight rows run along K ([K, N], the soft embedding); 0: [N, K]
    int k, n;                // K (multiple of TK) and N
    int k_per_split;         // split-K: blockIdx.z covers K range [z * k_per_split, ...)
    float* y;                // output [rows, n]; split z writes at y + z * y_split_stride
    int64_t y_split_stride;
    float y_scale;           // multiplies the result (after the whole sum: numpy's (p @ E) * scale)
    int m;                   // plain mode: number of rows
    const int4* tiles;       // grouped mode: per blockIdx.y (expert, first row, end row, unused)
    const int* n_tiles;      // grouped mode: how many tiles exist (blocks beyond exit)
};

// Shared staging: the A and B slices, reused for the output tile once the K loop is done.
struct SharedTiles {
    union {
        struct {
            float a[TM][LDS];
            float b[TN][LDS];
        } in;
        float c[TM][LDC];
    };
};

__device__ __forceinline__ void load_a_slice(const GemmArgs& g, SharedTiles& s, int row0, int row1, int k0) {
    int c = threadIdx.x % TK;
    for (int r = threadIdx.x / TK; r < TM; r += THREADS / TK) {
        int row = row0 + r;
        float v = 0.0f;
        if (row < row1) {
            int64_t src = g.a_rows ? g.a_rows[row] : row;
            v = g.a[src * g.lda + k0 + c];
            if (g.row_max) v = dg_softmax_prob(v, g.row_max[src], g.row_sum[src]);
        }
        s.in.a[r][c] = v;
    }
}

__device__ __forceinline__ void load_b_slice(const GemmArgs& g, SharedTiles& s, const uint8_t* w, int n0, int k0) {
    if (!g.w_kn) {  // [N, K]: consecutive threads decode consecutive k of one weight row
        int c = threadIdx.x % TK;
        for (int r = threadIdx.x / TK; r < TN; r += THREADS / TK) {
            int n = n0 + r;
            s.in.b[r][c] = n < g.n ? dg_row_value(g.w_type, w + (int64_t)n * g.w_row_bytes, k0 + c, g.w_scale) : 0.0f;
        }
    } else {  // [K, N]: consecutive threads decode consecutive n of one weight row
        int r = threadIdx.x % TN;
        int n = n0 + r;
        for (int c = threadIdx.x / TN; c < TK; c += THREADS / TN) {
            const uint8_t* row = w + (int64_t)(k0 + c) * g.w_row_bytes;
            s.in.b[r][c] = n < g.n ? dg_row_value(g.w_type, row, n, g.w_scale) : 0.0f;
        }
    }
}

// Rows [row0, row1) of the block's tile and which expert's weights it multiplies; false: nothing to do.
__device__ __forceinline__ bool block_tile(const GemmArgs& g, int* row0, int* row1, int* expert) {
    if (g.tiles) {
        if ((int)blockIdx.y >= *g.n_tiles) return false;
        int4 t = g.tiles[blockIdx.y];
        *expert = t.x;
        *row0 = t.y;
        *row1 = t.z;
    } else {
        *expert = 0;
        *row0 = blockIdx.y * TM;
        *row1 = min(g.m, *row0 + TM);
    }
    return *row0 < *row1;
}

template <bool kTensorCores>
__global__ void __launch_bounds__(THREADS) gemm_kernel(GemmArgs g) {
    __shared__ __align__(32) SharedTiles s;
    int row0, row1, expert;
    if (!block_tile(g, &row0, &row1, &expert)) return;
    int n0 = blockIdx.x * TN;
    const uint8_t* w = g.w + expert * g.w_expert_bytes;
    int k_begin = blockIdx.z * g.k_per_split, k_end = min(g.k, k_begin + g.k_per_split);
    float* y = g.y + blockIdx.z * g.y_split_stride;

    if constexpr (kTensorCores) {
#if __CUDA_ARCH__ >= 800  // TF32 WMMA exists from Ampere on; the backend never picks this engine below it
        using namespace nvcuda;
        int warp = threadIdx.x / 32, wr = (warp / 2) * 32, wc = (warp % 2) * 32;
        wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[2][2];
        for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
        for (int k0 = k_begin; k0 < k_end; k0 += TK) {
            load_a_slice(g, s, row0, row1, k0);
            load_b_slice(g, s, w, n0, k0);
            __syncthreads();
            for (int kk = 0; kk < TK; kk += 8) {
                wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa[2];
                wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fb[2];
                for (int i = 0; i < 2; ++i) {
                    wmma::load_matrix_sync(fa[i], &s.in.a[wr + 16 * i][kk], LDS);
                    for (int t = 0; t < fa[i].num_elements; ++t) fa[i].x[t] = wmma::__float_to_tf32(fa[i].x[t]);
                }
                for (int j = 0; j < 2; ++j) {
                    // B (k x n) column-major is exactly the staged [n][k] weight slice.
                    wmma::load_matrix_sync(fb[j], &s.in.b[wc + 16 * j][kk], LDS);
                    for (int t = 0; t < fb[j].num_elements; ++t) fb[j].x[t] = wmma::__float_to_tf32(fb[j].x[t]);
                }
                for (int i = 0; i < 2; ++i)
                    for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
            }
            __syncthreads();
        }
        for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 2; ++j)
                wmma::store_matrix_sync(&s.c[wr + 16 * i][wc + 16 * j], acc[i][j], LDC, wmma::mem_row_major);
        __syncthreads();
        for (int e = threadIdx.x; e < TM * TN; e += THREADS) {
            int r = e / TN, c = e % TN;
            if (row0 + r < row1 && n0 + c < g.n) y[(int64_t)(row0 + r) * g.n + n0 + c] = dg_mul(s.c[r][c], g.y_scale);
        }
#else
        __trap();
#endif
    } else {
        // Thread (ty, tx) owns rows ty + 16 i and columns tx + 8 j: strided, so shared reads never conflict.
        int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
        float acc[4][8] = {};
        for (int k0 = k_begin; k0 < k_end; k0 += TK) {
            load_a_slice(g, s, row0, row1, k0);
            load_b_slice(g, s, w, n0, k0);
            __syncthreads();
#pragma unroll 4
            for (int kk = 0; kk < TK; ++kk) {
                float av[4], bv[8];
#pragma unroll
                for (int i = 0; i < 4; ++i) av[i] = s.in.a[ty + 16 * i][kk];
#pragma unroll
                for (int j = 0; j < 8; ++j) bv[j] = s.in.b[tx + 8 * j][kk];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
            }
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int row = row0 + ty + 16 * i;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                int col = n0 + tx + 8 * j;
                if (row < row1 && col < g.n) y[(int64_t)row * g.n + col] = dg_mul(acc[i][j], g.y_scale);
            }
        }
    }
}

// out = sum over splits of partial[split] (fixed order: deterministic), times `scale`.
__global__ void sum_splits_kernel(const float* partial, int splits, int64_t count, float scale, float* out) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < count; i += (int64_t)gridDim.x * blockDim.x) {
        float v = 0.0f;
        for (int z = 0; z < splits; ++z) v += partial[z * count + i];
        out[i] = dg_mul(v, scale);
    }
}

// Split K so that small-M products still fill the device (a 256 x 2816 output is only 176 tiles), keeping
// at least 256 values of K per split. The count depends on the output width and K only, never on the rows:
// a row's sums must be the same whatever else shares the call (batch invariance), so it is sized for the rows
// of one 256-token canvas, the smallest decoder pass, whatever the call's M.
constexpr int64_t kSplitRowTiles = 256 / TM;

int choose_splits(int n, int k) {
    int64_t tiles = kSplitRowTiles * dg_blocks(n, TN), target = 4LL * dg_sm_count;
    int splits = 1;
    while (tiles * splits < target && k / (2 * splits) >= 256 && splits < 64) splits *= 2;
    return splits;
}

// Plain or grouped GEMM, result times `scale`; with splits > 1 the partial sums go to scratch and one more
// pass adds them (in split order) into g.y.
int run_gemm(GemmArgs g, unsigned grid_y, int engine, int splits, float scale) {
    g.k_per_split = ((g.k / TK + splits - 1) / splits) * TK;
    g.y_scale = splits > 1 ? 1.0f : scale;
    float* final_y = g.y;
    int64_t rows = g.tiles ? 0 : g.m;
    float* partial = nullptr;
    DgScratch scratch;
    if (splits > 1) {
        DG_REQUIRE(!g.tiles, "split-K is only for plain GEMMs");
        DG_SCRATCH(scratch, &partial, (size_t)splits * rows * g.n);
        g.y = partial;
        g.y_split_stride = rows * g.n;
    }
    dim3 grid(dg_blocks(g.n, TN), grid_y, splits);
    if (engine == DG_ENGINE_TF32) {
        gemm_kernel<true><<<grid, THREADS, 0, dg_stream>>>(g);
        DG_LAUNCHED(gemm_kernel<true>);
    } else {
        gemm_kernel<false><<<grid, THREADS, 0, dg_stream>>>(g);
        DG_LAUNCHED(gemm_kernel<false>);
    }
    if (splits > 1) {
        int64_t count = rows * g.n;
        unsigned blocks = dg_blocks(count, 256);
        sum_splits_kernel<<<blocks < 65535u ? blocks : 65535u, 256, 0, dg_stream>>>(partial, splits, count, scale,
                                                                                      final_y);
        DG_LAUNCHED(sum_splits_kernel);
    }
    return 0;
}

GemmArgs plain_args(const float* a, int m, int k, const void* w, int type, int64_t row_bytes, float tensor_scale,
                    int n, float* y) {
    GemmArgs g = {};
    g.a = a;
    g.lda = k;
    g.w = (const uint8_t*)w;
    g.w_type = type;
    g.w_row_bytes = row_bytes;
    g.w_scale = tensor_scale;
    g.k = k;
    g.n = n;
    g.y = y;
    g.m = m;
    return g;
}

// ---------------------------------------------------------------------------------------------------
// The soft embedding's sparse rows, the largest embedding row norm, and the router's top-k
// ---------------------------------------------------------------------------------------------------

constexpr int SPARSE_THREADS = 256;
constexpr int MAX_KEPT = 4096;  // shared-memory probabilities of one row's kept tokens

// Sum over the block in double, returned to every thread (blockDim.x == SPARSE_THREADS).
__device__ double block_sum_double(double v, double* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < SPARSE_THREADS / 32 ? shared[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

// One block per row: y = scale * sum over the kept tokens of p_j E_j (index order), written to out; the row
// takes this sparse path (paths[row] = kept count) when the bound holds, else paths[row] = -1 and the dense
// product overwrites it. Plain reference: numpy_backend.sparse_soft_embed_row.
__global__ void __launch_bounds__(SPARSE_THREADS) sparse_rows_kernel(
    const float* logits, int vocab, const float* row_max, const float* row_total, const float* mass,
    const int32_t* kept_n, const int32_t* kept, int max_kept, const uint8_t* table, int type, int64_t row_bytes,
    float tensor_scale, int width, float scale, double norm_bound, double rel_tol, float* out, int32_t* paths) {
    __shared__ float p[MAX_KEPT];
    __shared__ double red[32];
    int row = blockIdx.x, n = kept_n[row];
    if (n > max_kept) {
        if (threadIdx.x == 0) paths[row] = -1;
        return;
    }
    const float* x = logits + (int64_t)row * vocab;
    const int32_t* tokens = kept + (int64_t)row * max_kept;
    for (int q = threadIdx.x; q < n; q += SPARSE_THREADS) p[q] = dg_softmax_prob(x[tokens[q]], row_max[row], row_total[row]);
    __syncthreads();
    double norm2 = 0.0;
    for (int c = threadIdx.x; c < width; c += SPARSE_THREADS) {
        float acc = 0.0f;
        for (int q = 0; q < n; ++q)
            acc = dg_add(acc, dg_mul(p[q], dg_row_value(type, table + (int64_t)tokens[q] * row_bytes, c, tensor_scale)));
        float y = dg_mul(acc, scale);
        out[(int64_t)row * width + c] = y;
        norm2 += (double)y * y;
    }
    norm2 = block_sum_double(norm2, red);
    if (threadIdx.x == 0) paths[row] = dg_sparse_accept(mass[row], norm_bound, rel_tol, norm2) ? n : -1;
}

// out[dense[i], :] = compact[i, :]: the dense rows' product back in place.
__global__ void scatter_rows_kernel(const float* compact, const int32_t* dense, int width, float* out) {
    const float* src = compact + (int64_t)blockIdx.x * width;
    float* dst = out + (int64_t)dense[blockIdx.x] * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = src[c];
}

// Per row: the sum of its squared decoded values (one warp per row), then the maximum over rows.
__global__ void row_norms_kernel(const uint8_t* w, int type, int64_t row_bytes, float tensor_scale, int rows,
                                 int width, double* norm2) {
    int warp = (int)((blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (warp >= rows) return;
    double s = 0.0;
    for (int c = lane; c < width; c += 32) {
        double v = dg_row_value(type, w + (int64_t)warp * row_bytes, c, tensor_scale);
        s += v * v;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
    if (lane == 0) norm2[warp] = s;
}

__global__ void max_double_kernel(const double* v, int n, double* out) {
    __shared__ double red[32];
    double m = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmax(m, v[i]);
    for (int o = 16; o > 0; o >>= 1) m = fmax(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
        m = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.0;
        for (int o = 16; o > 0; o >>= 1) m = fmax(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
        if (threadIdx.x == 0) *out = m;
    }
}

// One warp per token: softmax over the experts (in shared memory), then top_k rounds of a warp argmax
// (lower index first on ties, like a stable argsort of -probs), renormalise, times per-expert scale.
__global__ void route_topk_kernel(const float* logits, int n_experts, int top_k, const float* per_expert_scale,
                                  float* weights, int32_t* index) {
    extern __shared__ float probs[];
    int lane = threadIdx.x;
    const float* row = logits + (int64_t)blockIdx.x * n_experts;
    float m = -INFINITY;
    for (int e = lane; e < n_experts; e += 32) m = fmaxf(m, row[e]);
    m = dg_warp_max(m);
    float z = 0.0f;
    for (int e = lane; e < n_experts; e += 32) {
        probs[e] = expf(row[e] - m);
        z += probs[e];
    }
    z = dg_warp_sum(z);
    for (int e = lane; e < n_experts; e += 32) probs[e] = probs[e] / z;
    __syncwarp();
    float chosen_sum = 0.0f, my_prob = 0.0f;
    int my_index = 0;
    for (int r = 0; r < top_k; ++r) {
        float best = -INFINITY;
        int best_i = INT32_MAX;
        for (int e = lane; e < n_experts; e += 32) dg_argmax_merge(best, best_i, probs[e], e);
        dg_warp_argmax(best, best_i);
        // Only NaN probabilities leave nothing chosen; any in-range index keeps the MoE's reads in bounds.
        if (best_i >= n_experts) best_i = r;
        if (lane == r) {
            my_prob = best;
            my_index = best_i;
        }
        if (lane == 0) probs[best_i] = -1.0f;  // probabilities are >= 0: never chosen twice
        chosen_sum += best;
        __syncwarp();
    }
    if (lane < top_k) {  // top_k <= 32 (checked by the caller)
        int64_t at = (int64_t)blockIdx.x * top_k + lane;
        index[at] = my_index;
        weights[at] = dg_mul(my_prob / chosen_sum, per_expert_scale[my_index]);
    }
}

// ---------------------------------------------------------------------------------------------------
// Mixture of experts: stable counting sort of (token, slot) items by expert, grouped GEMMs, combine
// ---------------------------------------------------------------------------------------------------

// One warp per expert counts its items (no atomics: the result is the same on every run).
__global__ void moe_count_kernel(const int32_t* index, int items, int* counts) {
    int e = blockIdx.x, lane = threadIdx.x, count = 0;
    for (int i0 = 0; i0 < items; i0 += 32) {
        int i = i0 + lane;
        count += __popc(__ballot_sync(0xFFFFFFFFu, i < items && index[i] == e));
    }
    if (lane == 0) counts[e] = count;
}

// One thread: exclusive offsets and the tile list (expert, first row, end row) of 64-row tiles per expert.
__global__ void moe_plan_kernel(const int* counts, int n_experts, int* offsets, int4* tiles, int* n_tiles) {
    int row = 0, t = 0;
    for (int e = 0; e < n_experts; ++e) {
        offsets[e] = row;
        for (int r = 0; r < counts[e]; r += TM) tiles[t++] = make_int4(e, row + r, row + min(counts[e], r + TM), 0);
        row += counts[e];
    }
    offsets[n_experts] = row;
    *n_tiles = t;
}

// One warp per expert writes its items in item order: sorted position → token, item → sorted position.
__global__ void moe_sort_kernel(const int32_t* index, int items, int top_k, const int* offsets,
                                int32_t* sorted_token, int32_t* item_pos) {
    int e = blockIdx.x, lane = threadIdx.x, base = offsets[e];
    for (int i0 = 0; i0 < items; i0 += 32) {
        int i = i0 + lane;
        bool mine = i < items && index[i] == e;
        unsigned ballot = __ballot_sync(0xFFFFFFFFu, mine);
        if (mine) {
            int pos = base + __popc(ballot & ((1u << lane) - 1u));
            sorted_token[pos] = i / top_k;
            item_pos[i] = pos;
        }
        base += __popc(ballot);
    }
}

// act[r, j] = gelu(gu[r, j]) * gu[r, inter + j]: gate is the first half of each gate_up row.
__global__ void moe_act_kernel(const float* gu, int64_t rows, int inter, float* act) {
    int64_t n = rows * inter;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / inter;
        int j = (int)(i % inter);
        act[i] = dg_mul(dg_gelu_tanh(gu[r * 2 * inter + j]), gu[r * 2 * inter + inter + j]);
    }
}

// out[t, :] = sum of weight * expert output over the token's slots, in ascending expert order (the order
// numpy_backend.experts adds them in), one block per token.
__global__ void moe_combine_kernel(const float* y, const float* weights, const int32_t* index,
                                   const int32_t* item_pos, int top_k, int n_experts, int hidden, float* out) {
    __shared__ int order[32];
    int t = blockIdx.x;
    if (threadIdx.x == 0) {
        for (int s = 0; s < top_k; ++s) order[s] = s;
        for (int a = 1; a < top_k; ++a)  // insertion sort of ≤ 32 slots by expert id
            for (int b = a; b > 0 && index[t * top_k + order[b]] < index[t * top_k + order[b - 1]]; --b) {
                int tmp = order[b];
                order[b] = order[b - 1];
                order[b - 1] = tmp;
            }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        float v = 0.0f;
        for (int s = 0; s < top_k; ++s) {
            int item = t * top_k + order[s];
            if ((unsigned)index[item] >= (unsigned)n_experts) continue;  // never sorted: no row to read
            v = dg_add(v, dg_mul(y[(int64_t)item_pos[item] * hidden + c], weights[item]));
        }
        out[(int64_t)t * hidden + c] = v;
    }
}

}  // namespace

extern "C" {

int dg_linear(const float* x, int n, int k, const void* w, int type, int64_t row_bytes, float tensor_scale,
              int out_features, float* y, int engine) {
    DG_ENTER();
    DG_REQUIRE(k % TK == 0, "k must be a multiple of 32");
    DG_REQUIRE(dg_block_size(type) > 0, "unsupported weight type");
    if (n <= 0 || out_features <= 0) return 0;
    GemmArgs g = plain_args(x, n, k, w, type, row_bytes, tensor_scale, out_features, y);
    return run_gemm(g, dg_blocks(n, TM), engine, choose_splits(out_features, k), 1.0f);
}

int dg_soft_embed(const float* logits, int rows, int vocab, const float* row_max, const float* row_total,
                  const float* mass, const int32_t* kept_n, const int32_t* kept, int max_kept, const void* table,
                  int type, int64_t row_bytes, float tensor_scale, int width, float scale, double norm_bound,
                  double rel_tol, float* out, int32_t* host_paths, int engine) {
    DG_ENTER();
    DG_REQUIRE(vocab % TK == 0, "vocab must be a multiple of 32");
    DG_REQUIRE(dg_block_size(type) > 0, "unsupported weight type");
    DG_REQUIRE(max_kept >= 0 && max_kept <= MAX_KEPT, "max_kept must be in 0..4096");
    if (rows <= 0) return 0;
    DgScratch scratch;  // given back however this function returns
    int32_t* paths;
    DG_SCRATCH(scratch, &paths, rows);
    sparse_rows_kernel<<<rows, SPARSE_THREADS, 0, dg_stream>>>(
        logits, vocab, row_max, row_total, mass, kept_n, kept, max_kept, (const uint8_t*)table, type, row_bytes,
        tensor_scale, width, scale, norm_bound, rel_tol, out, paths);
    DG_LAUNCHED(sparse_rows_kernel);
    DG_TRY(cudaMemcpyAsync(host_paths, paths, rows * sizeof(int32_t), cudaMemcpyDeviceToHost, dg_stream));
    DG_TRY(cudaStreamSynchronize(dg_stream));  // the host lists the dense rows: only they take the product
    int n_dense = 0;
    for (int i = 0; i < rows; ++i) n_dense += host_paths[i] < 0;
    if (n_dense == 0) return 0;
    int32_t* dense_host = (int32_t*)malloc(n_dense * sizeof(int32_t));
    DG_REQUIRE(dense_host, "out of host memory");
    for (int i = 0, at = 0; i < rows; ++i)
        if (host_paths[i] < 0) dense_host[at++] = i;
    int32_t* dense;
    float* compact;
    cudaError_t err = (cudaError_t)scratch.get(&dense, n_dense);
    if (err == cudaSuccess) err = cudaMemcpyAsync(dense, dense_host, n_dense * sizeof(int32_t), cudaMemcpyHostToDevice,
                                                  dg_stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(dg_stream);  // dense_host is freed next
    free(dense_host);
    DG_TRY(err);
    DG_SCRATCH(scratch, &compact, (size_t)n_dense * width);
    // softmax on load: A = exp(logits[dense[r]] - row_max) / row_total, the rows gathered through a_rows
    GemmArgs g = plain_args(logits, n_dense, vocab, table, type, row_bytes, tensor_scale, width, compact);
    g.a_rows = dense;
    g.row_max = row_max;
    g.row_sum = row_total;
    g.w_kn = 1;
    int status = run_gemm(g, dg_blocks(n_dense, TM), engine, choose_splits(width, vocab), scale);
    if (status) return status;
    scatter_rows_kernel<<<n_dense, 256, 0, dg_stream>>>(compact, dense, width, out);
    DG_LAUNCHED(scatter_rows_kernel);
    return 0;
}

int dg_max_row_norm(const void* table, int type, int64_t row_bytes, float tensor_scale, int rows, int width,
                    double* host_out) {
    DG_ENTER();
    DG_REQUIRE(dg_block_size(type) > 0, "unsupported weight type");
    DG_REQUIRE(rows > 0 && width > 0, "rows and width must be positive");
    DgScratch scratch;
    double *norm2, *best;
    DG_SCRATCH(scratch, &norm2, rows);
    DG_SCRATCH(scratch, &best, 1);
    row_norms_kernel<<<dg_blocks((int64_t)rows * 32, 256), 256, 0, dg_stream>>>((const uint8_t*)table, type,
                                                                                 row_bytes, tensor_scale, rows,
                                                                                 width, norm2);
    DG_LAUNCHED(row_norms_kernel);
    max_double_kernel<<<1, 1024, 0, dg_stream>>>(norm2, rows, best);
    DG_LAUNCHED(max_double_kernel);
    DG_TRY(cudaMemcpyAsync(host_out, best, sizeof(double), cudaMemcpyDeviceToHost, dg_stream));
    DG_TRY(cudaStreamSynchronize(dg_stream));
    *host_out = sqrt(*host_out);
    return 0;
}

int dg_route_topk(const float* logits, int n, int n_experts, int top_k, const float* per_expert_scale,
                  float* weights, int32_t* index) {
    DG_ENTER();
    DG_REQUIRE(n_experts > 0 && n_experts <= 1024, "n_experts must be in 1..1024");
    DG_REQUIRE(top_k > 0 && top_k <= 32 && top_k <= n_experts, "top_k must be in 1..min(32, n_experts)");
    if (n <= 0) return 0;
    route_topk_kernel<<<n, 32, n_experts * sizeof(float), dg_stream>>>(logits, n_experts, top_k, per_expert_scale,
                                                                       weights, index);
    DG_LAUNCHED(route_topk_kernel);
    return 0;
}

int dg_experts(const float* x, int n, int hidden, const float* weights, const int32_t* index, int top_k,
               int n_experts, const void* gate_up, int gate_up_type, int64_t gate_up_row_bytes,
               float gate_up_scale, int inter, const void* down, int down_type, int64_t down_row_bytes,
               float down_scale, float* out, int engine) {
    DG_ENTER();
    DG_REQUIRE(hidden % TK == 0 && inter % TK == 0, "hidden and inter must be multiples of 32");
    DG_REQUIRE(top_k > 0 && top_k <= 32, "top_k must be in 1..32");
    DG_REQUIRE(dg_block_size(gate_up_type) > 0 && dg_block_size(down_type) > 0, "unsupported weight type");
    if (n <= 0) return 0;
    int items = n * top_k;
    int max_tiles = items / TM + n_experts;  // sum over experts of ceil(count / 64)

    int *counts, *offsets, *n_tiles;
    int4* tiles;
    int32_t *sorted_token, *item_pos;
    float *gu, *act, *y;
    DgScratch scratch;  // every buffer goes back to the pool however this function returns
    DG_SCRATCH(scratch, &counts, n_experts);
    DG_SCRATCH(scratch, &offsets, n_experts + 1);
    DG_SCRATCH(scratch, &n_tiles, 1);
    DG_SCRATCH(scratch, &tiles, max_tiles);
    DG_SCRATCH(scratch, &sorted_token, items);
    DG_SCRATCH(scratch, &item_pos, items);
    DG_SCRATCH(scratch, &gu, (size_t)items * 2 * inter);
    DG_SCRATCH(scratch, &act, (size_t)items * inter);
    DG_SCRATCH(scratch, &y, (size_t)items * hidden);

    moe_count_kernel<<<n_experts, 32, 0, dg_stream>>>(index, items, counts);
    DG_LAUNCHED(moe_count_kernel);
    moe_plan_kernel<<<1, 1, 0, dg_stream>>>(counts, n_experts, offsets, tiles, n_tiles);
    DG_LAUNCHED(moe_plan_kernel);
    moe_sort_kernel<<<n_experts, 32, 0, dg_stream>>>(index, items, top_k, offsets, sorted_token, item_pos);
    DG_LAUNCHED(moe_sort_kernel);

    // gate_up: [items, 2 * inter] = x[sorted tokens] @ gate_up[e]^T, per expert tile.
    GemmArgs g1 = plain_args(x, 0, hidden, gate_up, gate_up_type, gate_up_row_bytes, gate_up_scale, 2 * inter, gu);
    g1.a_rows = sorted_token;
    g1.w_expert_bytes = 2LL * inter * gate_up_row_bytes;
    g1.tiles = tiles;
    g1.n_tiles = n_tiles;
    int status = run_gemm(g1, (unsigned)max_tiles, engine, 1, 1.0f);
    if (status) return status;

    moe_act_kernel<<<dg_blocks((int64_t)items * inter, 256), 256, 0, dg_stream>>>(gu, items, inter, act);
    DG_LAUNCHED(moe_act_kernel);

    // down: [items, hidden] = act @ down[e]^T, rows already in expert order.
    GemmArgs g2 = plain_args(act, 0, inter, down, down_type, down_row_bytes, down_scale, hidden, y);
    g2.w_expert_bytes = (int64_t)hidden * down_row_bytes;
    g2.tiles = tiles;
    g2.n_tiles = n_tiles;
    status = run_gemm(g2, (unsigned)max_tiles, engine, 1, 1.0f);
    if (status) return status;

    moe_combine_kernel<<<n, 256, 0, dg_stream>>>(y, weights, index, item_pos, top_k, n_experts, hidden, out);
    DG_LAUNCHED(moe_combine_kernel);
    return 0;
}

}  // extern "C"
