// dg_scratch.h — the scratch buffers of one dg_ call, all given back when the call returns, on success and on
// every error path (an early `return` included). Plain C++, no CUDA: the kernels instantiate it with the
// stream-ordered pool (dg_common.cuh), the host test library (dg_host.cpp) with a counting malloc, so
// tests/test_native_host.py checks that a failure at any allocation leaves nothing behind.
#pragma once

#include <stddef.h>

// Pool: static int allocate(void** out, size_t bytes) (0 on success, else an error code) and
// static void release(void* p).
template <typename Pool, int Capacity = 16>
class DgScratchSet {
   public:
    DgScratchSet() = default;
    DgScratchSet(const DgScratchSet&) = delete;
    DgScratchSet& operator=(const DgScratchSet&) = delete;
    ~DgScratchSet() {
        while (count_ > 0) Pool::release(buffers_[--count_]);
    }

    // `count` elements of T (16 spare bytes: a zero count is still a valid pointer); 0 or the pool's error.
    template <typename T>
    int get(T** out, size_t count) {
        *out = nullptr;
        if (count_ == Capacity) return -1;
        void* p = nullptr;
        int status = Pool::allocate(&p, count * sizeof(T) + 16);
        if (status) return status;
        buffers_[count_++] = p;
        *out = static_cast<T*>(p);
        return 0;
    }

   private:
    void* buffers_[Capacity] = {};
    int count_ = 0;
};
