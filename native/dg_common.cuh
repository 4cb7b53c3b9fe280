// dg_common.cuh — what every .cu file of libdgcuda shares: the stream, error reporting, block reductions.
#pragma once

#include <cuda_runtime.h>
#include <float.h>
#include <stdint.h>

#include "dg_cuda.h"
#include "dg_math.cuh"
#include "dg_scratch.h"

// The one stream every kernel and copy is queued on (created by dg_init), the device it belongs to, and device
// facts kernels size by.
extern cudaStream_t dg_stream;
extern int dg_device;
extern int dg_sm_count;
// Nonzero under DGRUN_CUDA_SYNC=1 (dg_set_launch_sync): wait after every launch, so a fault names its kernel.
extern int dg_launch_sync;

// Record a message for dg_last_error() and return a nonzero status (defined in dg_runtime.cu).
int dg_fail(int status, const char* where, const char* what);
int dg_check_cuda(cudaError_t err, const char* where);
// After a launch or copy named `what`: its configuration error, or under dg_launch_sync its execution error.
int dg_after_launch(const char* what);

// Return early from a dg_ function when a CUDA call fails.
#define DG_TRY(call)                                             \
    do {                                                         \
        int dg_status_ = dg_check_cuda((call), #call);           \
        if (dg_status_) return dg_status_;                       \
    } while (0)

// After a launch: configuration errors surface here (execution errors at the next wait, or here under
// DGRUN_CUDA_SYNC=1).
#define DG_LAUNCHED(kernel)                                      \
    do {                                                         \
        int dg_status_ = dg_after_launch("launch " #kernel);     \
        if (dg_status_) return dg_status_;                       \
    } while (0)

#define DG_REQUIRE(cond, what)                                   \
    do {                                                         \
        if (!(cond)) return dg_fail(1, __func__, what);          \
    } while (0)

// The calling host thread on dgrun's device for one dg_ call, then back on the device it had: cudaSetDevice is
// per host thread, and a Model may be used (and its buffers freed) from any thread.
class DgDeviceScope {
   public:
    DgDeviceScope() {
        if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
        if (previous_ == dg_device) previous_ = -1;  // already there: nothing to switch or restore
        else status_ = cudaSetDevice(dg_device);
    }
    DgDeviceScope(const DgDeviceScope&) = delete;
    DgDeviceScope& operator=(const DgDeviceScope&) = delete;
    ~DgDeviceScope() {
        if (previous_ >= 0) cudaSetDevice(previous_);
    }
    cudaError_t status() const { return status_; }

   private:
    int previous_ = -1;
    cudaError_t status_ = cudaSuccess;
};

// First statement of every dg_ function that touches the device (tests/test_cuda.py checks that each has it).
#define DG_ENTER()                                                                 \
    if (!dg_stream) return dg_fail(1, __func__, "dg_init has not been called");    \
    DgDeviceScope dg_device_scope_;                                                \
    DG_TRY(dg_device_scope_.status())

// Stream-ordered scratch from the caching pool, counted (dg_scratch_live) so tests see leaks; a test can make
// the n-th allocation fail (dg_debug_fail_scratch) to walk the error paths.
struct DgDevicePool {
    static int allocate(void** out, size_t bytes);
    static void release(void* p);
};
using DgScratch = DgScratchSet<DgDevicePool>;

// Return early when a scratch allocation fails.
#define DG_SCRATCH(set, out, count) DG_TRY((cudaError_t)(set).get((out), (count)))

inline unsigned dg_blocks(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

// ---------------------------------------------------------------------------------------------------
// Warp and block reductions (blockDim.x a multiple of 32, at most 1024)
// ---------------------------------------------------------------------------------------------------

__device__ __forceinline__ float dg_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

__device__ __forceinline__ float dg_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    return v;
}

// Sum over the block, returned to every thread. `shared` holds 32 floats; safe to call repeatedly.
__device__ __forceinline__ float dg_block_sum(float v, float* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = dg_warp_sum(v);
    __syncthreads();  // a previous call may still be reading `shared`
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : 0.0f;
    return dg_warp_sum(v);
}

// Maximum over the block, returned to every thread. `shared` holds 32 floats.
__device__ __forceinline__ float dg_block_max(float v, float* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = dg_warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : -INFINITY;
    return dg_warp_max(v);
}

// (value, index) maximum with the lower index winning ties: numpy's argmax and a stable descending sort.
__device__ __forceinline__ void dg_argmax_merge(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

__device__ __forceinline__ void dg_warp_argmax(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xFFFFFFFFu, v, o);
        int oi = __shfl_xor_sync(0xFFFFFFFFu, i, o);
        dg_argmax_merge(v, i, ov, oi);
    }
}

// Block argmax returned to every thread; `sv`/`si` hold 32 entries each.
__device__ __forceinline__ void dg_block_argmax(float& v, int& i, float* sv, int* si) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    dg_warp_argmax(v, i);
    __syncthreads();
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = i;
    }
    __syncthreads();
    v = lane < warps ? sv[lane] : -INFINITY;
    i = lane < warps ? si[lane] : INT32_MAX;
    dg_warp_argmax(v, i);
}
