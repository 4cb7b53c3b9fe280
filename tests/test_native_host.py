"""The CUDA kernels' per-element math (native/dg_math.cuh), built for the host with g++ and checked in CI.

The kernels call exactly these inline functions, so what is pinned here holds on the GPU too:
- block decoding of every weight type, bit-exact with gguf-py (`dgrun.quants.dequantize_tensor`), on valid
  quantized blocks (random valid blocks for the types dgrun only reads) and on random bytes (every scale and
  code pattern; NaN compared as NaN); the i-quant tables equal gguf-py's (tools/gen_iq_tables.py --check);
- the E2M1 / E8M0 / UE4M3 decoders, bit-exact over every code;
- RoPE (angle and pair rotation) and the attention mask predicate, bit-exact with numpy's float32 arithmetic;
  the attention kernel's key range per query block equal to the numpy reference's;
- softcap within 2 ulp of numpy's operation order with a float64 tanh, and 4 ulp of numpy itself (numpy's
  SIMD float32 tanh is up to 3 ulp off); GELU-tanh within 2 ulp of |x| of float64 and of numpy, 4 ulp for
  x > 0;
- entropy within 2e-6 relative on short rows (sequential float32 sums vs numpy's pairwise ones);
- the sparse soft embedding's keep / probability / accept rules against the numpy reference's;
- Philox4x32-10 bit-exact with Random123's known answers and a numpy implementation, plus the two maps from
  random words to a uniform float and to a token id;
- the scratch guard every kernel entry point allocates through gives everything back on every error path.
That nvcc fuses none of this arithmetic into FMAs the host build (-ffp-contract=off) does not have is checked on
the PTX by tools/check_ptx_fma.py, which tools/check_cuda_compile.sh runs (it needs nvcc, and a minute).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures import random_blocks
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from dgrun import quants, sampler
from dgrun.backends.numpy_backend import SPARSE_KEEP_LOGIT, gelu_tanh, visible_key_range

REPO = Path(__file__).resolve().parents[1]
TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4, T.NVFP4, T.IQ4_NL,
         T.IQ4_XS, T.IQ3_S, T.IQ2_S]


def _native_build() -> Any:
    spec = importlib.util.spec_from_file_location("dg_native_build", REPO / "native" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """libdghost.so built from the current sources (0.5 s), loaded with cffi."""
    cffi = pytest.importorskip("cffi")
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler to build native/dg_host.cpp")
    build = _native_build()
    try:
        lib_path = build.build_host(tmp_path_factory.mktemp("dghost"))
    except build.BuildError as e:
        if sys.platform == "win32":  # native parts are optional on Windows
            pytest.skip(f"cannot build the host library here: {e}")
        raise
    header = (lib_path.parent / "dg_host.h").read_text()
    ffi = cffi.FFI()
    ffi.cdef(header.split("/* <cdef> */")[1].split("/* </cdef> */")[0])
    lib = ffi.dlopen(str(lib_path))

    class Host:
        def ptr(self, ctype: str, arr: np.ndarray) -> Any:
            assert arr.flags.c_contiguous
            return ffi.cast(ctype, ffi.from_buffer(arr))

        def __getattr__(self, name: str) -> Any:
            return getattr(lib, name)

    return Host()


def _same_bits(out: np.ndarray, ref: np.ndarray, what: str) -> None:
    """float32 arrays equal bit for bit, except that NaN matches any NaN (payloads differ by converter)."""
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape, what
    both_nan = np.isnan(out) & np.isnan(ref)
    bad = (out.view(np.uint32) != ref.view(np.uint32)) & ~both_nan
    if bad.any():
        i = int(np.flatnonzero(bad.reshape(-1))[0])
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.size} differ; first at {i}: "
                    f"{out.reshape(-1)[i]!r} vs {ref.reshape(-1)[i]!r}")


def _ulp_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in representable float32 steps (sign-magnitude bits mapped onto a monotone integer line)."""
    def ordered(x: np.ndarray) -> np.ndarray:
        i = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)
    return np.abs(ordered(a) - ordered(b))


def _dequant(host: Any, ggml_type: T, raw: np.ndarray, n: int, scale: float) -> np.ndarray:
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.empty(n, dtype=np.float32)
    status = host.dg_host_dequant_row(int(ggml_type), host.ptr("uint8_t *", raw), host.ptr("float *", out), n,
                                      scale)
    assert status == 0
    return out


# -- block decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_dequant_matches_gguf_on_quantized_blocks(host, ggml_type):
    rng = np.random.default_rng(int(ggml_type))
    if not quants.can_quantize(ggml_type, 512):  # a type dgrun only reads: random bytes, finite fp16 scales
        raw, scale = random_blocks(ggml_type, 6, 512, rng), None
    else:
        # Rows at very different magnitudes, a zero row, and outliers: every scale path of the quantizers.
        magnitudes = np.array([1e-3, 0.02, 1, 30, 0, 1e3], np.float32)[:, None]
        x = rng.normal(0, 1, (6, 512)).astype(np.float32) * magnitudes
        x[2, ::17] *= 40
        raw, scale = quants.quantize_tensor(x, ggml_type)
    ref = quants.dequantize_tensor(raw, ggml_type, scale).reshape(-1)
    out = _dequant(host, ggml_type, raw.reshape(-1), ref.size, 1.0 if scale is None else scale)
    _same_bits(out, ref, f"{ggml_type.name} quantized blocks")


def test_cuda_backend_claims_exactly_the_types_decoded_here():
    from dgrun.backends.cuda_backend import SUPPORTED_TYPES

    assert SUPPORTED_TYPES == set(TYPES)


def test_iq_tables_are_gguf_pys():
    """native/cpu/dg_iq_tables.h (used by the cpu kernels and dg_math.cuh) is what gguf-py's tables generate."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gen_iq_tables.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_dequant_matches_gguf_on_random_bytes(host, ggml_type):
    rng = np.random.default_rng(100 + int(ggml_type))
    qt = quants.get_quant_type(ggml_type)
    blocks = 4096 // qt.block_size * 8
    raw = rng.integers(0, 256, blocks * qt.type_size, dtype=np.uint8)
    with np.errstate(all="ignore"):  # random scales overflow to inf in both implementations
        ref = quants.dequantize_tensor(raw, ggml_type, 1.0 if ggml_type == T.NVFP4 else None)
    out = _dequant(host, ggml_type, raw, blocks * qt.block_size, 1.0)
    _same_bits(out, ref, f"{ggml_type.name} random bytes")


def test_dequant_refuses_unknown_types_and_partial_blocks(host):
    raw = np.zeros(64, np.uint8)
    out = np.empty(64, np.float32)
    src, dst = host.ptr("uint8_t *", raw), host.ptr("float *", out)
    assert host.dg_host_dequant_row(3, src, dst, 32, 1.0) != 0
    assert host.dg_host_dequant_row(int(T.Q8_0), src, dst, 16, 1.0) != 0


def test_fp4_and_scale_decoders_over_every_code(host):
    codes = np.arange(256, dtype=np.uint8)
    out = np.empty(256, np.float32)
    host.dg_host_e2m1(host.ptr("uint8_t *", codes), host.ptr("float *", out), 16)
    _same_bits(out[:16], np.array(gguf_quants.MXFP4.kvalues, np.float32), "E2M1 (doubled)")
    host.dg_host_e8m0_half(host.ptr("uint8_t *", codes), host.ptr("float *", out), 256)
    _same_bits(out, gguf_quants.MXFP4.e8m0_to_fp32_half(codes), "E8M0 / 2")
    host.dg_host_ue4m3_half(host.ptr("uint8_t *", codes), host.ptr("float *", out), 256)
    _same_bits(out, gguf_quants.NVFP4.ue4m3_to_fp32(codes).astype(np.float32), "UE4M3 / 2")


# -- activations, RoPE, masks ---------------------------------------------------------------------------


def _wide_floats(rng: np.random.Generator, n: int) -> np.ndarray:
    """Values across many binades, both signs, plus zeros: where activation approximations break."""
    x = rng.normal(0, 1, n) * np.exp2(rng.integers(-12, 8, n))
    x[:8] = [0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 1e4, -1e4]
    return x.astype(np.float32)


def test_softcap_close_to_float64_and_numpy(host):
    x = _wide_floats(np.random.default_rng(1), 100_000)
    out = np.empty_like(x)
    host.dg_host_softcap(host.ptr("float *", x), host.ptr("float *", out), x.size, 30.0)
    # numpy's operation order with the tanh alone in float64: what is left is tanhf's own error.
    t = (x / np.float32(30.0)).astype(np.float64)
    assert _ulp_diff(out, np.tanh(t).astype(np.float32) * np.float32(30.0)).max() <= 2
    assert _ulp_diff(out, np.tanh(x / np.float32(30.0)) * np.float32(30.0)).max() <= 4


def test_gelu_tanh_close_to_float64_and_numpy(host):
    x = _wide_floats(np.random.default_rng(2), 100_000)
    out = np.empty_like(x)
    host.dg_host_gelu_tanh(host.ptr("float *", x), host.ptr("float *", out), x.size)
    x64 = x.astype(np.float64)
    exact = 0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64**3)))
    ref = gelu_tanh(x)
    # Absolute, in steps of the input: for negative x, 1 + tanh cancels and no result-relative bound holds.
    x_ulp = np.spacing(np.abs(x)).astype(np.float64)
    assert (np.abs(out - exact) <= 2 * x_ulp).all()
    assert (np.abs(out.astype(np.float64) - ref) <= 2 * x_ulp).all()
    positive = x > 0
    assert _ulp_diff(out[positive], ref[positive]).max() <= 4


def test_rope_angles_and_pairs_are_bit_exact(host):
    rng = np.random.default_rng(3)
    n = 50_000
    positions = rng.integers(0, 131_072, n).astype(np.int32)
    exponents = rng.integers(0, 256, n).astype(np.float32) / 512
    inv_freq = (1.0 / (np.float32(1e6) ** exponents)).astype(np.float32)
    inv_freq[:100] = 0.0  # proportional RoPE's unrotated tail
    angles = np.empty(n, np.float32)
    host.dg_host_rope_angles(host.ptr("int32_t *", positions), host.ptr("float *", inv_freq),
                             host.ptr("float *", angles), n)
    _same_bits(angles, positions.astype(np.float32) * inv_freq, "RoPE angle")

    x0, x1 = rng.normal(0, 3, n).astype(np.float32), rng.normal(0, 3, n).astype(np.float32)
    c, s = np.cos(angles), np.sin(angles)
    y0, y1 = np.empty(n, np.float32), np.empty(n, np.float32)
    host.dg_host_rope_pairs(*(host.ptr("float *", a) for a in (x0, x1, c, s, y0, y1)), n)
    # numpy_backend.rope: x * cos + rotate_half(x) * sin, rotate_half = (-x1, x0).
    _same_bits(y0, x0 * c + (-x1) * s, "RoPE first half")
    _same_bits(y1, x1 * c + x0 * s, "RoPE second half")
    assert (y0[:100] == x0[:100]).all() and (y1[:100] == x1[:100]).all(), "zero frequency must pass through"


def test_visibility_matches_numpy_masks(host):
    rng = np.random.default_rng(4)
    n = 20_000
    q_pos, k_pos = rng.integers(0, 64, n).astype(np.int32), rng.integers(0, 64, n).astype(np.int32)
    out = np.empty(n, np.uint8)
    for causal, window in [(0, 0), (1, 0), (1, 8), (0, 8)]:
        host.dg_host_visible(host.ptr("int32_t *", q_pos), host.ptr("int32_t *", k_pos), causal, window,
                             host.ptr("uint8_t *", out), n)
        ref = np.ones(n, bool)
        if causal:
            ref &= k_pos <= q_pos
        if window:
            ref &= k_pos > q_pos - window
        assert (out.astype(bool) == ref).all(), (causal, window)


def test_key_ranges_match_the_numpy_reference(host):
    """dg_key_range (the cuda attention kernel's key range per query block) = numpy_backend.visible_key_range."""
    rng = np.random.default_rng(8)
    # Ascending positions with gaps and repeats: a cache then a chunk, as the encoder gives them.
    k_pos = np.sort(rng.integers(0, 400, 300)).astype(np.int32)
    n = 2000
    q_min = rng.integers(-20, 450, n).astype(np.int32)
    q_max = (q_min + rng.integers(0, 40, n)).astype(np.int32)
    lo, hi = np.empty(n, np.int32), np.empty(n, np.int32)
    for causal, window in [(0, 0), (1, 0), (1, 8), (0, 8), (1, 1000)]:
        host.dg_host_key_range(host.ptr("int32_t *", k_pos), len(k_pos), host.ptr("int32_t *", q_min),
                               host.ptr("int32_t *", q_max), causal, window, host.ptr("int32_t *", lo),
                               host.ptr("int32_t *", hi), n)
        ref = [visible_key_range(k_pos, a, b, bool(causal), window or None) for a, b in zip(q_min, q_max,
                                                                                         strict=True)]
        assert list(zip(lo.tolist(), hi.tolist(), strict=True)) == ref, (causal, window)


def test_scratch_is_given_back_on_every_path(host):
    """DgScratchSet (what every kernel entry point allocates scratch through) frees everything it holds whether
    the function returns normally or at a failed allocation: a leak counter stays at 0."""
    live = np.zeros(1, np.int32)
    for fail_at in range(11):
        status = host.dg_host_scratch_run(9, fail_at, host.ptr("int *", live))
        assert (status != 0) == (1 <= fail_at <= 9) and live[0] == 0, (fail_at, status, int(live[0]))


def test_entropy_matches_sampler(host):
    rng = np.random.default_rng(5)
    rows = np.concatenate([
        rng.normal(0, 1, (4, 1000)), rng.normal(0, 20, (4, 1000)),  # flat and peaked
        np.full((1, 1000), 3.0), np.where(np.arange(1000) == 7, 50.0, -50.0)[None],  # uniform, one-hot
    ]).astype(np.float32)
    out = np.empty(len(rows), np.float32)
    host.dg_host_entropy_rows(host.ptr("float *", rows), host.ptr("float *", out), *rows.shape)
    ref = sampler.entropy(rows)
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-6)


def test_sparse_soft_embedding_rules_match_the_reference(host):
    """The kernels' keep / probability / accept rules against numpy_backend.sparse_soft_embed_row's: the kept
    set bit-exact (one float32 subtraction, edge values included), probabilities within 2 ulp (expf vs
    numpy's exp), the accept test as its float64 expression."""
    rng = np.random.default_rng(6)
    n = 20_000
    m = rng.normal(0, 10, n).astype(np.float32)
    x = (m - rng.uniform(0, 40, n)).astype(np.float32)
    x[:100] = m[:100] - SPARSE_KEEP_LOGIT  # on the edge of the window
    x[100:200] = np.nextafter(m[100:200] - SPARSE_KEEP_LOGIT, np.float32(-np.inf))  # just outside
    keep = np.empty(n, np.uint8)
    host.dg_host_sparse_keep(host.ptr("float *", x), host.ptr("float *", m), float(SPARSE_KEEP_LOGIT),
                             host.ptr("uint8_t *", keep), n)
    np.testing.assert_array_equal(keep.astype(bool), x - m >= -SPARSE_KEEP_LOGIT)
    total = rng.uniform(1, 100, n).astype(np.float32)
    prob = np.empty(n, np.float32)
    host.dg_host_softmax_prob(host.ptr("float *", x), host.ptr("float *", m), host.ptr("float *", total),
                              host.ptr("float *", prob), n)
    np.testing.assert_allclose(prob, np.exp(x - m) / total, rtol=2 * float(np.finfo(np.float32).eps), atol=1e-44)
    mass, norm2 = rng.uniform(0, 1e-7, n), rng.uniform(0, 4, n)
    accept = np.empty(n, np.uint8)
    host.dg_host_sparse_accept(host.ptr("double *", mass), host.ptr("double *", norm2), 3.0, 2.0**-25,
                               host.ptr("uint8_t *", accept), n)
    np.testing.assert_array_equal(accept.astype(bool), mass * 3.0 <= 2.0**-25 * np.sqrt(norm2))


# -- Philox ---------------------------------------------------------------------------------------------

# Random123's kat_vectors, the three "philox4x32 10" lines: counter, key, output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox4x32_10(counters: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """numpy reference: uint32 counters [n, 4] under one key → uint32 [n, 4] (Salmon et al., SC'11)."""
    c = [counters[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    mask = np.uint64(0xFFFFFFFF)
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
    return np.stack(c, axis=1).astype(np.uint32)


def _philox_host(host: Any, counters: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    counters = np.ascontiguousarray(counters, np.uint32)
    key_arr = np.array(key, np.uint32)
    out = np.empty_like(counters)
    host.dg_host_philox(host.ptr("uint32_t *", counters), host.ptr("uint32_t *", key_arr),
                        host.ptr("uint32_t *", out), len(counters))
    return out


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(host, counter, key, expected):
    assert tuple(int(v) for v in _philox_host(host, np.array([counter]), key)[0]) == expected
    assert tuple(int(v) for v in philox4x32_10(np.array([counter], np.uint32), key)[0]) == expected


def test_philox_matches_numpy_reference(host):
    rng = np.random.default_rng(6)
    counters = rng.integers(0, 2**32, (10_000, 4), dtype=np.uint64).astype(np.uint32)
    for key in [(0, 0), (123456789, 987654321), (0xFFFFFFFF, 1)]:
        assert (_philox_host(host, counters, key) == philox4x32_10(counters, key)).all()


def test_uniform_maps(host):
    rng = np.random.default_rng(7)
    words = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
    words[:2] = [0, 0xFFFFFFFF]
    u = np.empty(words.size, np.float32)
    host.dg_host_uniform01(host.ptr("uint32_t *", words), host.ptr("float *", u), words.size)
    _same_bits(u, (words >> 8).astype(np.float32) * np.float32(2.0**-24), "uniform01")
    assert u.min() == 0.0 and u.max() < 1.0

    hi, lo = words, words[::-1].copy()
    tokens = np.empty(words.size, np.uint32)
    for bound in (1, 7, 262_144, 2**32 - 1):
        host.dg_host_uniform_int(host.ptr("uint32_t *", hi), host.ptr("uint32_t *", lo), bound,
                                 host.ptr("uint32_t *", tokens), words.size)
        ref = [((int(h) << 32 | int(lo_)) * bound) >> 64 for h, lo_ in zip(hi[:2000], lo[:2000], strict=True)]
        assert tokens[:2000].tolist() == ref
        assert int(tokens.max()) < bound

