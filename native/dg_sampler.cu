// dg_sampler.cu — one entropy-bound sampler step on the device (reference: dgrun/sampler.py denoise_step),
// and the row statistics the sparse soft embedding reads (dg_row_stats).
//
// Kernel 1, one block per canvas row, fused: logits /= temperature (in place: the processed logits that
// self-conditioning reads next; no other canvas x vocab array), argmax, entropy, the soft embedding's split
// (row_split) and a categorical draw by inverse CDF against a Philox uniform. Kernel 2, one block: the
// entropy-bound acceptance (stable sort of the free rows' entropies, cumsum - sorted <= bound), renoise of
// the rejected rows with Philox tokens, clamps, mean entropy. Only the small result (canvas, argmax,
// accepted, mean entropy) is copied back; the row statistics stay on the device.
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

// Where one row's statistics go (device arrays, one entry per row; kept holds max_kept entries per row).
struct RowStats {
    float* row_max;
    float* row_total;  // softmax = exp(x - row_max) / row_total
    float* mass;       // the softmax mass of the tokens outside the kept set
    int32_t* kept_n;   // tokens with x - max >= -keep_logit
    int32_t* kept;     // the first max_kept of them, in index order
    float keep_logit;
    int max_kept;
};

// The block's pass over its row once the maximum m is known; each thread owns the contiguous chunk
// [c0, c1), so per-thread prefix sums give index order. Returns this thread's z = sum exp(x - m) and sets
// *s = sum exp(x - m) (x - m) and *inclusive (z summed over threads 0..tid); writes the row's statistics.
__device__ float row_split(const float* x, int c0, int c1, float m, int row, const RowStats& st, float* s,
                           float* inclusive, float* red, float* totals) {
    float z = 0.0f, dropped = 0.0f, count = 0.0f;  // counts stay below 2^24: exact in float
    *s = 0.0f;
    for (int i = c0; i < c1; ++i) {
        float e = dg_entropy_accumulate(x[i], m, &z, s);
        if (dg_sparse_keep(x[i], m, st.keep_logit))
            count += 1.0f;
        else
            dropped += e;
    }
    float kept_before = block_inclusive_scan(count, totals) - count;
    float kept_total = totals[31];
    *inclusive = block_inclusive_scan(z, totals);
    float total = totals[31];
    float dropped_total = dg_block_sum(dropped, red);
    int at = (int)kept_before;
    for (int i = c0; i < c1 && at < st.max_kept; ++i)
        if (dg_sparse_keep(x[i], m, st.keep_logit)) st.kept[(int64_t)row * st.max_kept + at++] = i;
    if (threadIdx.x == 0) {
        st.row_max[row] = m;
        st.row_total[row] = total;
        st.mass[row] = dropped_total / total;
        st.kept_n[row] = (int32_t)kept_total;
    }
    return z;
}

__global__ void __launch_bounds__(ROW_THREADS) sample_rows_kernel(float* logits, int vocab, float temperature,
                                                                   uint64_t seed, uint64_t step, int32_t* sampled,
                                                                   int32_t* argmax, float* entropy, RowStats st) {
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
    float s, inclusive;
    float z = row_split(x, c0, c1, m, row, st, &s, &inclusive, red_v, totals);
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

// The row statistics alone (logits that did not come from this device's sampler step).
__global__ void __launch_bounds__(ROW_THREADS) row_stats_kernel(const float* logits, int vocab, RowStats st) {
    __shared__ float red[32], totals[32];
    const float* x = logits + (int64_t)blockIdx.x * vocab;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += ROW_THREADS) m = fmaxf(m, x[i]);
    m = dg_block_max(m, red);
    int chunk = (vocab + ROW_THREADS - 1) / ROW_THREADS;
    int c0 = min(vocab, (int)threadIdx.x * chunk), c1 = min(vocab, c0 + chunk);
    float s, inclusive;
    row_split(x, c0, c1, m, blockIdx.x, st, &s, &inclusive, red, totals);
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
                              float keep_logit, int max_kept, float* row_max, float* row_total, float* mass,
                              int32_t* kept_n, int32_t* kept, int32_t* host_out) {
    DG_ENTER();
    DG_REQUIRE(rows > 0 && rows <= MAX_ROWS, "rows must be in 1..4096");
    DG_REQUIRE(vocab > 0, "vocab must be positive");
    DG_REQUIRE(max_kept >= 0, "max_kept must be >= 0");
    DgScratch scratch;  // given back however this function returns
    int32_t *ints, *result;
    float* entropy;
    DG_SCRATCH(scratch, &ints, 2 * (size_t)rows);
    DG_SCRATCH(scratch, &entropy, rows);
    DG_SCRATCH(scratch, &result, 3 * (size_t)rows + 1);
    RowStats st = {row_max, row_total, mass, kept_n, kept, keep_logit, max_kept};
    sample_rows_kernel<<<rows, ROW_THREADS, 0, dg_stream>>>(logits, vocab, temperature, seed, step, ints,
                                                             ints + rows, entropy, st);
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

extern "C" int dg_row_stats(const float* logits, int rows, int vocab, float keep_logit, int max_kept,
                            float* row_max, float* row_total, float* mass, int32_t* kept_n, int32_t* kept) {
    DG_ENTER();
    DG_REQUIRE(vocab > 0 && max_kept >= 0, "vocab must be positive and max_kept >= 0");
    if (rows <= 0) return 0;
    RowStats st = {row_max, row_total, mass, kept_n, kept, keep_logit, max_kept};
    row_stats_kernel<<<rows, ROW_THREADS, 0, dg_stream>>>(logits, vocab, st);
    DG_LAUNCHED(row_stats_kernel);
    return 0;
}
