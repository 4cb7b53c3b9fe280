#!/usr/bin/env bash
# Compile every CUDA source in native/ for every target architecture with this machine's nvcc (no GPU
# needed), and the host build of the kernels' math with the C++ compiler; then check the PTX for multiply-adds
# nvcc contracted into FMAs (tools/check_ptx_fma.py). Fails on any error or warning.
#
#   bash tools/check_cuda_compile.sh            # sm_80 sm_86 sm_89 sm_90 sm_120, 2 parallel jobs
#   DGRUN_CUDA_ARCH=90 JOBS=1 bash tools/check_cuda_compile.sh
#
# Object files only (-c): linking adds nothing a compile error would not already show, and `python
# native/build.py` links the real library. Each (source, arch) pair is its own job, so 2 cores stay busy.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
JOBS=${JOBS:-2}
IFS=',' read -r -a ARCHES <<< "${DGRUN_CUDA_ARCH:-80,86,89,90,120}"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

command -v "$NVCC" >/dev/null || { echo "nvcc not found (set NVCC or put it on PATH)" >&2; exit 1; }
"$NVCC" --version | tail -n 1

jobs_list() {
    for src in native/*.cu; do
        for arch in "${ARCHES[@]}"; do
            echo "$src ${arch#sm_}"
        done
    done
}

compile_one() {
    local src=$1 arch=$2 start obj
    # Same flags as native/build.py, plus warnings as errors.
    local flags=(-std=c++17 -O3 -Xcompiler -fPIC -Xcompiler -Wall -Xcompiler -Wextra -Werror all-warnings)
    start=$(date +%s%N)
    obj="$OUT/$(basename "$src" .cu).sm_$arch.o"
    if ! "$NVCC" "${flags[@]}" -gencode "arch=compute_$arch,code=sm_$arch" -c "$src" -o "$obj" \
        >"$obj.log" 2>&1; then
        echo "FAIL $src sm_$arch"
        cat "$obj.log"
        return 1
    fi
    printf 'ok   %-24s sm_%-4s %6d ms\n' "$src" "$arch" $(( ($(date +%s%N) - start) / 1000000 ))
}
export -f compile_one
export NVCC OUT

start=$(date +%s)
status=0
jobs_list | xargs -P "$JOBS" -L 1 bash -c 'compile_one "$0" "$1"' || status=1

CXX=${CXX:-g++}
if command -v "$CXX" >/dev/null; then
    if "$CXX" -std=c++17 -O2 -Wall -Wextra -Werror -ffp-contract=off -fPIC -shared native/dg_host.cpp \
        -o "$OUT/libdghost.so"; then
        echo "ok   native/dg_host.cpp (host build of dg_math.cuh)"
    else
        echo "FAIL native/dg_host.cpp"
        status=1
    fi
fi

"${PYTHON:-python3}" tools/check_ptx_fma.py || status=1

echo "compiled ${#ARCHES[@]} architecture(s) in $(( $(date +%s) - start ))s"
exit "$status"
