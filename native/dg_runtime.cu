// dg_runtime.cu — device selection, the stream, memory, copies and error reporting.
#include <stdio.h>
#include <string.h>

#include <atomic>
#include <mutex>

#include "dg_common.cuh"

cudaStream_t dg_stream = nullptr;
int dg_device = -1;
int dg_sm_count = 0;
int dg_launch_sync = 0;

static std::mutex dg_init_mutex;
static std::atomic<int64_t> dg_scratch_count{0};  // scratch buffers allocated and not yet released
static std::atomic<int64_t> dg_scratch_fail_in{0};  // > 0: the allocation this many from now fails (tests)

// Per host thread, like cudaGetLastError: two Python threads on two models never mix their messages.
static thread_local char dg_error_message[512] = "";

int dg_fail(int status, const char* where, const char* what) {
    snprintf(dg_error_message, sizeof dg_error_message, "%s: %s", where, what);
    return status ? status : 1;
}

// Errors a kernel leaves behind (they surface at whatever call comes next, under that call's name).
static bool asynchronous_fault(cudaError_t err) {
    return err == cudaErrorIllegalAddress || err == cudaErrorLaunchFailure || err == cudaErrorMisalignedAddress ||
           err == cudaErrorIllegalInstruction || err == cudaErrorInvalidPc || err == cudaErrorHardwareStackError ||
           err == cudaErrorAssert || err == cudaErrorLaunchTimeout;
}

int dg_check_cuda(cudaError_t err, const char* where) {
    if (err == cudaSuccess) return 0;
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    if (asynchronous_fault(err) && !dg_launch_sync) {
        char what[400];
        snprintf(what, sizeof what, "%s (a kernel queued earlier may have caused it: rerun with DGRUN_CUDA_SYNC=1 "
                 "to name it)", cudaGetErrorString(err));
        return dg_fail((int)err, where, what);
    }
    return dg_fail((int)err, where, cudaGetErrorString(err));
}

int dg_after_launch(const char* what) {
    int status = dg_check_cuda(cudaGetLastError(), what);
    if (status || !dg_launch_sync) return status;
    return dg_check_cuda(cudaStreamSynchronize(dg_stream), what);
}

int DgDevicePool::allocate(void** out, size_t bytes) {
    if (dg_scratch_fail_in.load() > 0 && dg_scratch_fail_in.fetch_sub(1) == 1) return (int)cudaErrorMemoryAllocation;
    cudaError_t err = cudaMallocAsync(out, bytes, dg_stream);
    if (err == cudaSuccess) ++dg_scratch_count;
    return (int)err;
}

void DgDevicePool::release(void* p) {
    // Stream-ordered: the memory returns to the pool after the kernels queued before it have run.
    if (cudaFreeAsync(p, dg_stream) == cudaSuccess) --dg_scratch_count;
    else cudaGetLastError();  // a destructor cannot report; the next call's check would misattribute it
}

// "12.4" from cudaDriverGetVersion / cudaRuntimeGetVersion's 12040 (0.0 when there is no driver).
static void format_version(int version, char* out, size_t size) {
    snprintf(out, size, "%d.%d", version / 1000, (version % 1000) / 10);
}

// dg_init's failures carry the versions: a driver too old for this runtime is the commonest cause.
static int init_fail(cudaError_t err, const char* where, const char* what) {
    int driver = 0, runtime = 0;
    cudaDriverGetVersion(&driver);
    cudaRuntimeGetVersion(&runtime);
    cudaGetLastError();
    char dv[16], rv[16], message[400];
    format_version(driver, dv, sizeof dv);
    format_version(runtime, rv, sizeof rv);
    snprintf(message, sizeof message, "%s (NVIDIA driver supports CUDA %s; dgrun's CUDA runtime is %s and needs a "
             "driver that supports at least that)", what ? what : cudaGetErrorString(err), driver ? dv : "none",
             rv);
    return dg_fail(err == cudaSuccess ? 1 : (int)err, where, message);
}

#define DG_INIT_TRY(call)                                                    \
    do {                                                                     \
        cudaError_t dg_err_ = (call);                                        \
        if (dg_err_ != cudaSuccess) return init_fail(dg_err_, #call, nullptr); \
    } while (0)

__global__ void fill_f32_kernel(float* dst, float value, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = value;
}

extern "C" {

const char* dg_last_error(void) { return dg_error_message; }

int dg_init(int device) {
    std::lock_guard<std::mutex> lock(dg_init_mutex);  // two threads' first use must not both initialise
    if (dg_stream) return device == dg_device ? 0 : dg_fail(1, "dg_init", "already initialised on another device");
    int count = 0;
    DG_INIT_TRY(cudaGetDeviceCount(&count));
    if (device < 0 || device >= count) return init_fail(cudaSuccess, "dg_init", "no such CUDA device");
    DG_INIT_TRY(cudaSetDevice(device));
    int pools = 0;
    DG_INIT_TRY(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device));
    if (!pools)
        return init_fail(cudaSuccess, "dg_init", "this device or platform has no stream-ordered memory pools "
                         "(cudaMallocAsync), which dgrun allocates from");
    DG_INIT_TRY(cudaDeviceGetAttribute(&dg_sm_count, cudaDevAttrMultiProcessorCount, device));
    // Keep freed blocks in the pool: every op allocates its output, and a decoder step makes hundreds.
    cudaMemPool_t pool;
    DG_INIT_TRY(cudaDeviceGetDefaultMemPool(&pool, device));
    uint64_t keep = UINT64_MAX;
    DG_INIT_TRY(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    cudaStream_t stream;
    DG_INIT_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    dg_device = device;
    dg_stream = stream;  // last: DG_ENTER treats a set stream as "initialised"
    return 0;
}

void dg_set_launch_sync(int on) { dg_launch_sync = on != 0; }

int dg_scratch_live(int64_t* count) {
    *count = dg_scratch_count.load();
    return 0;
}

void dg_debug_fail_scratch(int64_t nth) { dg_scratch_fail_in.store(nth > 0 ? nth : 0); }

int dg_release_pool(void) {
    DG_ENTER();
    DG_TRY(cudaStreamSynchronize(dg_stream));
    cudaMemPool_t pool;
    DG_TRY(cudaDeviceGetDefaultMemPool(&pool, dg_device));
    DG_TRY(cudaMemPoolTrimTo(pool, 0));
    return 0;
}

int dg_device_info(char* name, int name_len, int* cc_major, int* cc_minor, int* sm_count, int64_t* total_bytes) {
    DG_ENTER();
    cudaDeviceProp prop;
    DG_TRY(cudaGetDeviceProperties(&prop, dg_device));
    snprintf(name, (size_t)name_len, "%s", prop.name);
    *cc_major = prop.major;
    *cc_minor = prop.minor;
    *sm_count = prop.multiProcessorCount;
    *total_bytes = (int64_t)prop.totalGlobalMem;
    return 0;
}

int dg_malloc(void** out, size_t bytes) {
    DG_ENTER();
    DG_TRY(cudaMallocAsync(out, bytes ? bytes : 16, dg_stream));
    return 0;
}

int dg_free(void* ptr) {
    DG_ENTER();
    DG_TRY(cudaFreeAsync(ptr, dg_stream));
    return 0;
}

int dg_upload(void* dst, const void* host_src, size_t bytes) {
    DG_ENTER();
    DG_TRY(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, dg_stream));
    // From pageable memory (numpy's) the copy returns once the source is staged: the caller may free or reuse it
    // at once, and waiting would only drain the queue. From page-locked memory it is a DMA that reads the source
    // later, so then we wait.
    cudaPointerAttributes attributes;
    if (cudaPointerGetAttributes(&attributes, host_src) != cudaSuccess) cudaGetLastError();
    else if (attributes.type == cudaMemoryTypeHost) DG_TRY(cudaStreamSynchronize(dg_stream));
    return dg_after_launch("upload");
}

int dg_download(void* host_dst, const void* src, size_t bytes) {
    DG_ENTER();
    DG_TRY(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, dg_stream));
    DG_TRY(cudaStreamSynchronize(dg_stream));
    return 0;
}

int dg_copy(void* dst, const void* src, size_t bytes) {
    DG_ENTER();
    DG_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, dg_stream));
    return dg_after_launch("device copy");
}

int dg_fill_f32(float* dst, float value, int64_t n) {
    DG_ENTER();
    if (n <= 0) return 0;
    unsigned blocks = dg_blocks(n, 256);
    fill_f32_kernel<<<blocks < 4096u ? blocks : 4096u, 256, 0, dg_stream>>>(dst, value, n);
    DG_LAUNCHED(fill_f32_kernel);
    return 0;
}

int dg_synchronize(void) {
    DG_ENTER();
    DG_TRY(cudaStreamSynchronize(dg_stream));
    return 0;
}

}  // extern "C"
