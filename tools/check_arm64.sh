#!/usr/bin/env bash
# Cross-compile the cpu kernels for arm64 (every kernel set: generic floats, int8 generic / dotprod / i8mm) with
# warnings as errors, then, where qemu-aarch64 is installed, run tools/int8_sets_check.c: the dotprod and
# i8mm int8 kernels against the portable int8 kernels on every type they take.
#
#   apt install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user    # Debian / Ubuntu
#   bash tools/check_arm64.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CC=${CC:-aarch64-linux-gnu-gcc}
command -v "$CC" >/dev/null || { echo "$CC not found (set CC to an arm64 cross compiler)" >&2; exit 1; }
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
SRC=native/cpu
FLAGS=(-O2 -std=gnu11 -fPIC -fno-math-errno -ffp-contract=fast -Wall -Werror -Wno-unknown-pragmas -fopenmp -I"$SRC")
"$CC" "${FLAGS[@]}" -c "$SRC/dg_kernels.c" -o "$OUT/kernels.o"
"$CC" "${FLAGS[@]}" -DDG_HAVE_INT8_I8MM -DDG_HAVE_INT8_DOTPROD -c "$SRC/dg_cpu.c" -o "$OUT/cpu.o"
"$CC" "${FLAGS[@]}" -c "$SRC/dg_int8.c" -o "$OUT/int8_generic.o"
"$CC" "${FLAGS[@]}" -march=armv8.2-a+dotprod -DDG_INT8_DOTPROD -c "$SRC/dg_int8.c" -o "$OUT/int8_dotprod.o"
"$CC" "${FLAGS[@]}" -march=armv8.6-a+i8mm+dotprod -DDG_INT8_I8MM -c "$SRC/dg_int8.c" -o "$OUT/int8_i8mm.o"
echo "ok   arm64 compile: dg_kernels.c, dg_cpu.c, dg_int8.c (generic, dotprod, i8mm)"
if command -v qemu-aarch64 >/dev/null; then
    # one thread (no OpenMP runtime to link statically): the same arithmetic
    for set in generic:"" dotprod:"-march=armv8.2-a+dotprod -DDG_INT8_DOTPROD" \
               i8mm:"-march=armv8.6-a+i8mm+dotprod -DDG_INT8_I8MM"; do
        # shellcheck disable=SC2086
        "$CC" "${FLAGS[@]}" -fno-openmp ${set#*:} -c "$SRC/dg_int8.c" -o "$OUT/check_${set%%:*}.o"
    done
    "$CC" "${FLAGS[@]}" -fno-openmp "-DSETS=X(dotprod) X(i8mm)" -c tools/int8_sets_check.c -o "$OUT/check.o"
    "$CC" -static "$OUT"/check*.o -lm -o "$OUT/check"
    qemu-aarch64 -cpu max "$OUT/check"
else
    echo "skip arm64 run: no qemu-aarch64"
fi
