#!/usr/bin/env bash
# The x86-64 int8 kernel sets a development CPU may lack (avx512bf16, avx512vnni, avxvnni) run through SIMDe's
# portable implementations of their intrinsics, against the portable int8 kernels: tools/int8_sets_check.c on every
# type (linear, the dense MLP, the soft embedding; BF16's bfloat16 products on avx512bf16). This runs the sets'
# own code (layouts, tails, the choice of instruction) on an AVX2 CPU: measured equal to the portable kernels bit
# for bit on every quantized type (the dense MLP of Q4_0 within 4e-9), BF16 within 1.2e-7 (SIMDe adds a pair's
# two products in the other order). What it cannot check is the hardware's own VDPBF16PS rounding: that takes a
# CPU with AVX512-BF16 (tools/gpu_check.sh runs tests/test_int8.py on a GPU host's).
#
#   apt install libsimde-dev        # Debian / Ubuntu: the headers, /usr/include/simde
#   bash tools/check_x86_simde.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CC=${CC:-cc}
SIMDE=${SIMDE_INCLUDE:-/usr/include}
[ -f "$SIMDE/simde/x86/avx512.h" ] || { echo "SIMDe not found under $SIMDE (apt install libsimde-dev)" >&2; exit 1; }
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# The sets' AVX-512 / VNNI intrinsics under their own names from SIMDe, compiled for AVX2 + FMA: the compiler's
# instructions for everything AVX2 has, SIMDe's C for the rest (the dot products).
grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo || { echo "this check runs on an AVX2 + FMA CPU" >&2; exit 1; }
cat >"$OUT/simde_shim.h" <<'SHIM'
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define _mm256_dpbusd_avx_epi32 _mm256_dpbusd_epi32 /* AVX-VNNI's VEX form: the same sums */
SHIM
FLAGS=(-O2 -std=gnu11 -fno-math-errno -ffp-contract=fast -Wall -Werror -Wno-psabi -Wno-unknown-pragmas
       -I native/cpu -I "$SIMDE")
"$CC" "${FLAGS[@]}" -c native/cpu/dg_int8.c -o "$OUT/int8_generic.o"
for set in avx512bf16 avx512vnni avxvnni; do
    "$CC" "${FLAGS[@]}" -mavx2 -mfma -mf16c -include "$OUT/simde_shim.h" "-DDG_INT8_${set^^}" -c native/cpu/dg_int8.c \
        -o "$OUT/int8_$set.o"
done
"$CC" "${FLAGS[@]}" "-DSETS=X(avx512bf16) X(avx512vnni) X(avxvnni)" -c tools/int8_sets_check.c -o "$OUT/check.o"
"$CC" "$OUT"/*.o -lm -o "$OUT/check"
"$OUT/check"
