// dg_runtime.cu — device selection, the stream, memory, copies and error reporting.
#include <stdio.h>
#include <string.h>

#include "dg_common.cuh"

cudaStream_t dg_stream = nullptr;
int dg_sm_count = 0;

// Per host thread, like cudaGetLastError: two Python threads on two models never mix their messages.
static thread_local char dg_error_message[512] = "";

int dg_fail(int status, const char* where, const char* what) {
    snprintf(dg_error_message, sizeof dg_error_message, "%s: %s", where, what);
    return status ? status : 1;
}

int dg_check_cuda(cudaError_t err, const char* where) {
    if (err == cudaSuccess) return 0;
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    return dg_fail((int)err, where, cudaGetErrorString(err));
}

__global__ void fill_f32_kernel(float* dst, float value, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = value;
}

extern "C" {

const char* dg_last_error(void) { return dg_error_message; }

int dg_init(int device) {
    if (dg_stream) return 0;
    int count = 0;
    DG_TRY(cudaGetDeviceCount(&count));
    DG_REQUIRE(device >= 0 && device < count, "no such CUDA device");
    DG_TRY(cudaSetDevice(device));
    DG_TRY(cudaDeviceGetAttribute(&dg_sm_count, cudaDevAttrMultiProcessorCount, device));
    // Keep freed blocks in the pool: every op allocates its output, and a decoder step makes hundreds.
    cudaMemPool_t pool;
    DG_TRY(cudaDeviceGetDefaultMemPool(&pool, device));
    uint64_t keep = UINT64_MAX;
    DG_TRY(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    DG_TRY(cudaStreamCreateWithFlags(&dg_stream, cudaStreamNonBlocking));
    return 0;
}

int dg_device_info(char* name, int name_len, int* cc_major, int* cc_minor, int* sm_count, int64_t* total_bytes) {
    int device = 0;
    DG_TRY(cudaGetDevice(&device));
    cudaDeviceProp prop;
    DG_TRY(cudaGetDeviceProperties(&prop, device));
    snprintf(name, (size_t)name_len, "%s", prop.name);
    *cc_major = prop.major;
    *cc_minor = prop.minor;
    *sm_count = prop.multiProcessorCount;
    *total_bytes = (int64_t)prop.totalGlobalMem;
    return 0;
}

int dg_malloc(void** out, size_t bytes) {
    DG_TRY(cudaMallocAsync(out, bytes ? bytes : 16, dg_stream));
    return 0;
}

int dg_free(void* ptr) {
    DG_TRY(cudaFreeAsync(ptr, dg_stream));
    return 0;
}

int dg_upload(void* dst, const void* host_src, size_t bytes) {
    DG_TRY(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, dg_stream));
    // Pageable sources are staged by the driver; waiting here lets the caller free or reuse them at once.
    DG_TRY(cudaStreamSynchronize(dg_stream));
    return 0;
}

int dg_download(void* host_dst, const void* src, size_t bytes) {
    DG_TRY(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, dg_stream));
    DG_TRY(cudaStreamSynchronize(dg_stream));
    return 0;
}

int dg_copy(void* dst, const void* src, size_t bytes) {
    DG_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, dg_stream));
    return 0;
}

int dg_fill_f32(float* dst, float value, int64_t n) {
    if (n <= 0) return 0;
    unsigned blocks = dg_blocks(n, 256);
    fill_f32_kernel<<<blocks < 4096u ? blocks : 4096u, 256, 0, dg_stream>>>(dst, value, n);
    DG_LAUNCHED(fill_f32_kernel);
    return 0;
}

int dg_synchronize(void) {
    DG_TRY(cudaStreamSynchronize(dg_stream));
    return 0;
}

}  // extern "C"
