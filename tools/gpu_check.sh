#!/usr/bin/env bash
# One-shot check of the CUDA backend on a machine with an NVIDIA GPU (about 6-8 minutes on an H100):
#   1. builds libdgcuda.so for this GPU only (DGRUN_CUDA_ARCH=native) and the host test library;
#   2. runs tests/test_native_host.py and tests/test_cuda.py (kernels vs numpy, generation parity);
#   2b. runs the cpu backend's int8 / bfloat16 kernel tests on the host's CPU: a GPU host's Xeon or EPYC has the
#      AVX512-VNNI, AVX-VNNI and AVX512-BF16 sets that no development machine here can execute;
#   3. writes a released-shape random q4_k_m model and runs tools/bench_gpu.py on it (with transformers);
#   4. prints a short summary table last.
# Logs go to $OUT when it is set (else a temporary folder). Python packages missing on the machine can be
# carried as wheels in .whl/ (installed to /tmp/site). dgrun itself is used from this checkout, uninstalled.
#
#   bash tools/gpu_check.sh                  # everything
#   SKIP_BENCH=1 bash tools/gpu_check.sh     # build and tests only
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
MODEL=${DGRUN_BENCH_MODEL:-/tmp/dgrun-random-q4_k_m.dgf}
started=$SECONDS
phase() { printf '\n== %s (%ds)\n' "$1" $((SECONDS - started)); }

if compgen -G ".whl/*.whl" >/dev/null; then
    phase "installing carried wheels"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# The package as pyproject.toml maps it (runtime/ -> dgrun, backends/ -> dgrun.backends, ...), as symlinks.
PKG=$(mktemp -d)
mkdir "$PKG/dgrun"
for f in "$REPO"/runtime/*; do ln -s "$f" "$PKG/dgrun/"; done
ln -s "$REPO/backends" "$PKG/dgrun/backends"
ln -s "$REPO/converters" "$PKG/dgrun/converters"
export PYTHONPATH=$PKG${PYTHONPATH:+:$PYTHONPATH}

phase "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee "$OUT/gpu.txt"

phase "build (this GPU's architecture only)"
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ')
arch=${arch:-native}
build_start=$SECONDS
if DGRUN_CUDA_ARCH=$arch "$PY" native/build.py --jobs 8 >"$OUT/build.log" 2>&1; then
    build="ok for sm_$arch in $((SECONDS - build_start))s"
else
    build="FAILED (see build.log)"
fi
tail -n 20 "$OUT/build.log"

phase "tests"
# 15 minutes: the suite builds its fixtures and runs every kernel per weight type; 5 proved tight.
# DGRUN_CUDA_SYNC=1: a first run on this GPU and driver, so a kernel's fault is reported under its own name.
DGRUN_CUDA_SYNC=1 timeout 900 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_native_host.py tests/test_cuda.py \
    >"$OUT/tests.log" 2>&1
tests_rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 40
tests=$(tail -n 1 "$OUT/tests.log")

phase "host CPU: the int8 and bfloat16 kernel sets it runs"
grep -m 1 "model name" /proc/cpuinfo
grep -o -w -E "avx512_bf16|avx512_vnni|avx_vnni|avx512f|avx2" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_int8.py tests/test_batch.py -k "int8 or bf16" \
    >"$OUT/cpu_sets.log" 2>&1
cpu_rc=$?
grep -E "^(FAILED|ERROR)" "$OUT/cpu_sets.log" | head -n 40
"$PY" -c "from dgrun.backends.cpu_backend import CpuBackend; print('int8 kernel set:', CpuBackend(int8=True).int8_isa)" \
    2>&1 | tee -a "$OUT/cpu_sets.log"
cpu_sets=$(grep -E "passed|failed|error" "$OUT/cpu_sets.log" | tail -n 1)

bench="skipped"
if [ -z "${SKIP_BENCH:-}" ]; then
    phase "random released-shape model"
    if [ ! -f "$MODEL" ]; then
        "$PY" tools/make_random_dgf.py "$MODEL" --preset q4_k_m >"$OUT/make_model.log" 2>&1 || cat "$OUT/make_model.log"
    fi
    phase "benchmark"
    if timeout 360 "$PY" tools/bench_gpu.py "$MODEL" --json "$OUT/bench.json" --hf-timeout 200 >"$OUT/bench.log" 2>&1
    then
        bench="ok"
    else
        bench="FAILED (rc $?, see bench.log)"
        tail -n 20 "$OUT/bench.log"
    fi
fi

phase "summary"
{
    echo "gpu:    $(cat "$OUT/gpu.txt")"
    echo "build:  $build"
    echo "tests:  $tests"
    echo "cpu:    $cpu_sets (int8 / bf16 sets on the host CPU)"
    echo "bench:  $bench"
    if [ -f "$OUT/bench.log" ]; then
        sed -n '/^device /,$p' "$OUT/bench.log"
    fi
    echo "logs:   $OUT ($((SECONDS - started))s in all)"
} | tee "$OUT/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$cpu_rc" -eq 0 ] && [[ $build == ok* ]]
