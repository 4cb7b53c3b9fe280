// dg_sampler.cu — one entropy-bound sampler step on the device (reference: dgrun/sampler.py denoise_step).
//
// Kernel 1, one block per canvas row: logits /= temperature (in place: the processed logits that
// self-conditioning reads next), argmax, entropy, and a categorical draw by inverse CDF against a Philox
// uniform. Kernel 2, one block: the entropy-bound acceptance (stable sort of the free rows' entropies,
// cumsum - sorted <= bound), renoise of the rejected rows with Philox tokens, clamps, mean entropy.
// Only the small result (canvas, argmax, accepted, mean entropy) is copied back.
#include "dg_common.cuh"

namespace {

constexpr int ROW_THREADS = 1024;
constexpr int MAX_ROWS = 4096;

// Philox counter for one canvas row at one step: word 0 of the output drives the categorical draw,
// words 1-2 the renoise token.
__device__ __forceinline__ void row_random(uint64_t seed, uint64_t step, int row, uint32_t out[4]) {
    const uint32_t ctr[4] = {(uint32_t)row, (uint32_t)step, (uint32_t)(step >> 32), 0u};
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    dg_philox4x32_10(ctr, key, out);
}

// Inclusive prefix sum over the block (blockDim.x == ROW_THREADS); `warp_totals` holds 32 floats.
__device__ __forceinline__ float block_inclusive_scan(float v, float* warp_totals) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 1; o < 32; o <<= 1) {
        float t = __shfl_up_sync(0xFFFFFFFFu, v, o);
        if (lane >= o) v += t;
    }
    __syncthreads();
    if (lane == 31) warp_totals[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = warp_totals[lane];
        for (int o = 1; o < 32; o <<= 1) {
            float u = __shfl_up_sync(0xFFFFFFFFu, t, o);
            if (lane >= o) t += u;
        }
        warp_totals[lane] = t;  // inclusive totals of warps 0..lane
    }
    __syncthreads();
    return warp > 0 ? v + warp_totals[warp - 1] : v;
}

__global__ void __launch_bounds__(ROW_THREADS) sample_rows_kernel(float* logits, int vocab, float temperature,
                                                                   uint64_t seed, uint64_t step, int32_t* sampled,
                                                                   int32_t* argmax, float* entropy) {
    __shared__ float red_v[32], totals[32];
    __shared__ int red_i[32];
    __shared__ int owner, last_nonzero;
    int row = blockIdx.x, tid = threadIdx.x;
    float* x = logits + (int64_t)row * vocab;

    // Pass 1 (coalesced): temperature, max and argmax (first index on ties, as numpy).
    float best = -INFINITY;
    int best_i = INT32_MAX;
    for (int i = tid; i < vocab; i += ROW_THREADS) {
        float v = x[i] / temperature;
        x[i] = v;
        dg_argmax_merge(best, best_i, v, i);
    }
    dg_block_argmax(best, best_i, red_v, red_i);  // its barriers make pass 1's writes visible to all
    float m = best;

    // Pass 2: each thread owns a contiguous chunk, so the inverse CDF is a prefix sum over threads.
    int chunk = (vocab + ROW_THREADS - 1) / ROW_THREADS;
    int c0 = min(vocab, tid * chunk), c1 = min(vocab, c0 + chunk);
    float z = 0.0f, s = 0.0f;
    for (int i = c0; i < c1; ++i) dg_entropy_accumulate(x[i], m, &z, &s);
    float inclusive = block_inclusive_scan(z, totals);
    float total = totals[31];
    float h = dg_entropy_finish(total, dg_block_sum(s, red_v));

    uint32_t r[4];
    row_random(seed, step, row, r);
    float target = dg_uniform01(r[0]) * total;
    if (tid == 0) {
        owner = INT32_MAX;
        last_nonzero = -1;
    }
    __syncthreads();
    if (z > 0.0f && inclusive > target) atomicMin(&owner, tid);
    if (z > 0.0f) atomicMax(&last_nonzero, tid);
    __syncthreads();
    // float rounding can leave target >= every prefix: the last nonzero chunk then takes the draw.
    int chosen = owner != INT32_MAX ? owner : last_nonzero;
    if (tid == chosen) {
        float running = inclusive - z;
        int pick = -1, last_positive = c0;
        for (int i = c0; i < c1; ++i) {
            float e = expf(x[i] - m);
            if (e > 0.0f) last_positive = i;
            running += e;
            if (running > target) {
                pick = i;
                break;
            }
        }
        sampled[row] = pick >= 0 ? pick : last_positive;
    }
    if (tid == 0) {
        if (chosen < 0) sampled[row] = best_i < vocab ? best_i : 0;  // no finite logit at all
        argmax[row] = best_i < vocab ? best_i : 0;
        entropy[row] = h;
    }
}

// Total order for the stable ascending sort of entropies: NaN last (as numpy's argsort), index breaks ties.
__device__ __forceinline__ bool sorts_before(float hj, int j, float hi, int i) {
    bool nj = hj != hj, ni = hi != hi;
    if (nj != ni) return ni;
    if (nj) return j < i;
    return hj < hi || (hj == hi && j < i);
}

__global__ void __launch_bounds__(ROW_THREADS) accept_kernel(const float* entropy, const int32_t* sampled,
                                                              const int32_t* argmax, const int32_t* canvas,
                                                              const uint8_t* clamp, int rows, int vocab,
                                                              float entropy_bound, uint64_t seed, uint64_t step,
                                                              int32_t* result) {
    extern __shared__ float shared[];
    float* sorted_h = shared;                  // [rows] entropies of the free rows, ascending
    int* order = (int*)(shared + rows);        // [rows] their row indices
    int32_t* out_canvas = result;
    int32_t* out_argmax = result + rows;
    int32_t* out_accepted = result + 2 * rows;
    int tid = threadIdx.x;

    for (int i = tid; i < rows; i += blockDim.x) {
        out_accepted[i] = 0;
        if (clamp && clamp[i]) continue;
        float hi = entropy[i];
        int rank = 0;
        for (int j = 0; j < rows; ++j)
            if (!(clamp && clamp[j]) && sorts_before(entropy[j], j, hi, i)) ++rank;
        sorted_h[rank] = hi;
        order[rank] = i;
    }
    __syncthreads();
    if (tid == 0) {
        // Sequential float32 cumsum, the same additions in the same order as numpy's.
        int n_free = 0;
        float sum = 0.0f;
        for (int i = 0; i < rows; ++i)
            if (!(clamp && clamp[i])) {
                ++n_free;
                sum += entropy[i];
            }
        float running = 0.0f;
        for (int r = 0; r < n_free; ++r) {
            running += sorted_h[r];
            out_accepted[order[r]] = (running - sorted_h[r]) <= entropy_bound;
        }
        float mean = n_free ? sum / (float)n_free : 0.0f;
        result[3 * rows] = __float_as_int(mean);
    }
    __syncthreads();
    for (int i = tid; i < rows; i += blockDim.x) {
        uint32_t r[4];
        row_random(seed, step, i, r);
        int32_t noise = (int32_t)dg_uniform_int(r[1], r[2], (uint32_t)vocab);
        bool accepted = out_accepted[i] != 0;
        int32_t token = accepted ? sampled[i] : noise, best = argmax[i];
        if (clamp && clamp[i]) {
            token = best = canvas[i];
            accepted = true;
        }
        out_canvas[i] = token;
        out_argmax[i] = best;
        out_accepted[i] = accepted;
    }
}

}  // namespace

extern "C" int dg_sample_step(float* logits, int rows, int vocab, const int32_t* canvas, const uint8_t* clamp,
                              float temperature, float entropy_bound, uint64_t seed, uint64_t step,
                              int32_t* host_out) {
    DG_ENTER();
    DG_REQUIRE(rows > 0 && rows <= MAX_ROWS, "rows must be in 1..4096");
    DG_REQUIRE(vocab > 0, "vocab must be positive");
    DgScratch scratch;  // given back however this function returns
    int32_t *ints, *result;
    float* entropy;
    DG_SCRATCH(scratch, &ints, 2 * (size_t)rows);
    DG_SCRATCH(scratch, &entropy, rows);
    DG_SCRATCH(scratch, &result, 3 * (size_t)rows + 1);
    sample_rows_kernel<<<rows, ROW_THREADS, 0, dg_stream>>>(logits, vocab, temperature, seed, step, ints,
                                                             ints + rows, entropy);
    DG_LAUNCHED(sample_rows_kernel);
    size_t shared = (size_t)rows * (sizeof(float) + sizeof(int));
    accept_kernel<<<1, ROW_THREADS, shared, dg_stream>>>(entropy, ints, ints + rows, canvas, clamp, rows, vocab,
                                                         entropy_bound, seed, step, result);
    DG_LAUNCHED(accept_kernel);
    DG_TRY(cudaMemcpyAsync(host_out, result, (3 * (size_t)rows + 1) * sizeof(int32_t), cudaMemcpyDeviceToHost,
                           dg_stream));
    DG_TRY(cudaStreamSynchronize(dg_stream));
    return 0;
}
