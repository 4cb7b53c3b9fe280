"""Tests for dgrun.quants: round-trip error per type, bit-exactness against gguf-py and against
literal scalar ports of ggml's C reference code (quantizers and decoders), and input validation."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures import random_blocks
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES

from dgrun.quants import (
    NVFP4,
    Q4_K,
    Q5_K,
    Q6_K,
    QUANT_TYPES,
    can_quantize,
    dequantize_tensor,
    get_quant_type,
    quantize_tensor,
    row_bytes,
)
from dgrun.quants import _fp32_to_ue4m3 as fp32_to_ue4m3

DECODE_ONLY = [T.IQ4_NL, T.IQ4_XS, T.IQ3_S, T.IQ2_S]  # read from llama-quantize's files, never written
WRITABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4, T.NVFP4]
ALL_TYPES = WRITABLE + DECODE_ONLY
GGUF_QUANTIZED = [T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1, T.MXFP4]  # we delegate quantization to gguf-py
OWN_QUANTIZED = [T.Q4_K, T.Q5_K, T.Q6_K, T.NVFP4]  # our numpy ports of ggml's reference quantizers
BLOCK_TYPES = [T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS, T.IQ3_S, T.IQ2_S]

# Upper bounds on the relative L2 error ||out - x|| / ||x|| for seeded Gaussian [8, 512] data, set
# ~25% above what was measured (std 1 / std 1e-3) so they catch regressions, not noise. A uniform
# quantizer with step s has RMS error s / sqrt(12), so the error roughly halves per extra bit.
REL_ERROR_BOUND = {
    T.F32: 0.0,  # lossless
    T.F16: 4e-4,  # 11-bit significand: RMS rounding error ~2^-11/sqrt(3) ~ 2.8e-4 (measured 2.1e-4)
    T.BF16: 2.5e-3,  # 8-bit significand: 16x coarser than F16 (measured 1.7e-3)
    T.Q8_0: 8e-3,  # 8.5 bpw: step amax/127 per 32 values (measured 5.3e-3 / 5.4e-3)
    T.Q5_0: 0.055,  # 5.5 bpw: step amax/16 per 32 values (measured 0.041 / 0.043)
    T.Q5_1: 0.047,  # 6 bpw: 32 levels spanning [min, max] of 32 values (measured 0.037 / 0.037)
    T.Q4_0: 0.11,  # 4.5 bpw: step amax/8 per 32 values (measured 0.084 / 0.086)
    # 4.5 bpw: 16 levels spanning [min, max] of 32 values, with a weighted scale/min search; ggml's
    # reference quantizer gives the same numbers (measured 0.070 / 0.072).
    T.Q4_K: 0.09,
    T.Q5_K: 0.045,  # 5.5 bpw: Q4_K's search with 32 levels (measured 0.035 / 0.036)
    # 6.56 bpw: step amax/32 per 16 values (measured 0.017 / 0.021). Worse at std 1e-3 because the
    # fp16 super-block scale d ~ amax/4096 is then a float16 subnormal with only a few significant bits.
    T.Q6_K: 0.027,
    T.MXFP4: 0.14,  # 4.25 bpw: E2M1 values, power-of-two scale per 32 (measured 0.116 / 0.113)
    T.NVFP4: 0.13,  # 4.5 bpw: E2M1 values, E4M3 scale per 16 (measured 0.104 / 0.110)
}


def gaussian(shape: tuple[int, ...], std: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def describe(out: np.ndarray, ref: np.ndarray) -> str:
    """Failure message: relative L2 error, max-abs error and the first mismatching index."""
    out, ref = np.asarray(out), np.asarray(ref)
    if out.shape != ref.shape:
        return f"shape {out.shape} != {ref.shape}"
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    mism = np.argwhere(out != ref)
    first = tuple(int(i) for i in mism[0]) if len(mism) else None
    where = f"first mismatch at {first}: {out[first]!r} vs {ref[first]!r}" if first else "no mismatch"
    rel = np.linalg.norm(diff) / max(np.linalg.norm(ref.astype(np.float64)), 1e-300)
    return f"rel err {rel:.3g}, max-abs err {diff.max():.3g}, {len(mism)} mismatches, {where}"


def assert_identical(out: np.ndarray, ref: np.ndarray) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, describe(out, ref)
    assert np.array_equal(out, ref), describe(out, ref)


# --------------------------------------------------------------------------------------------
# Registry and geometry
# --------------------------------------------------------------------------------------------


def test_registry_matches_gguf_geometry() -> None:
    assert set(QUANT_TYPES) == set(ALL_TYPES)
    for t, qt in QUANT_TYPES.items():
        assert qt.ggml_type == t
        assert (qt.block_size, qt.type_size) == GGML_QUANT_SIZES[t]
    assert int(T.MXFP4) == 39 and int(T.NVFP4) == 40
    assert (NVFP4.block_size, NVFP4.type_size) == (64, 36)


def test_get_quant_type_accepts_enum_int_and_name() -> None:
    assert get_quant_type(T.Q4_K) is Q4_K
    assert get_quant_type(int(T.Q4_K)) is Q4_K
    assert get_quant_type("q4_k") is Q4_K


@pytest.mark.parametrize("bad", ["Q3_K", "nope", 9999, T.IQ2_XXS])
def test_unknown_type_raises(bad: object) -> None:
    with pytest.raises(ValueError, match="unknown or unsupported ggml type"):
        get_quant_type(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown or unsupported"):
        quantize_tensor(np.zeros((1, 256), np.float32), bad)  # type: ignore[arg-type]


def test_row_bytes_and_can_quantize() -> None:
    assert row_bytes(T.Q4_K, 512) == 288
    assert row_bytes(T.Q6_K, 256) == 210
    assert row_bytes(T.NVFP4, 128) == 72
    assert row_bytes(T.F16, 3) == 6
    assert row_bytes("Q8_0", 64) == 68
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        row_bytes(T.Q4_K, 100)
    assert can_quantize(T.Q4_K, 2304) and not can_quantize(T.Q4_K, 2300)
    assert can_quantize(T.NVFP4, 64) and not can_quantize(T.NVFP4, 32)
    assert can_quantize(T.F32, 7) and not can_quantize(T.F32, 0)
    assert row_bytes(T.IQ2_S, 512) == 164 and not can_quantize(T.IQ2_S, 512)  # read, never written
    assert can_quantize(T.Q5_K, 512) and not can_quantize(T.Q5_K, 704)


@pytest.mark.parametrize("ggml_type", DECODE_ONLY, ids=lambda t: t.name)
def test_decode_only_types_refuse_to_quantize(ggml_type: T) -> None:
    with pytest.raises(ValueError, match="reads this type but cannot write it"):
        quantize_tensor(np.zeros((1, 256), np.float32), ggml_type)
    type_size = get_quant_type(ggml_type).type_size
    with pytest.raises(ValueError, match="not a multiple of the block bytes"):
        dequantize_tensor(np.zeros((1, type_size + 1), np.uint8), ggml_type)


# --------------------------------------------------------------------------------------------
# Round-trip error
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("std", [1.0, 1e-3])
@pytest.mark.parametrize("ggml_type", WRITABLE, ids=lambda t: t.name)
def test_round_trip_error(ggml_type: T, std: float) -> None:
    x = gaussian((8, 512), std)
    raw, scale = quantize_tensor(x, ggml_type)
    assert raw.dtype == np.uint8 and raw.shape == (8, row_bytes(ggml_type, 512))
    assert (scale is not None) == (ggml_type == T.NVFP4)
    out = dequantize_tensor(raw, ggml_type, scale)
    assert out.dtype == np.float32 and out.shape == x.shape
    err = rel_error(out, x)
    assert err <= REL_ERROR_BOUND[ggml_type], f"{ggml_type.name} std={std}: {describe(out, x)}"


def test_nvfp4_tensor_scale_is_needed_for_small_weights() -> None:
    # With unit tensor scale, values of std 1e-3 need UE4M3 scales ~5e-4, below the smallest
    # subnormal step (2^-9 ~ 2e-3): most of the tensor rounds to zero.
    x = gaussian((8, 512), 1e-3)
    unscaled = NVFP4.dequantize(NVFP4.quantize(x))
    assert rel_error(unscaled, x) > 0.5, describe(unscaled, x)
    raw, scale = quantize_tensor(x, T.NVFP4)
    assert scale == pytest.approx(np.abs(x).max() / (6 * 448), rel=1e-6)
    assert rel_error(dequantize_tensor(raw, T.NVFP4, scale), x) <= REL_ERROR_BOUND[T.NVFP4]


def test_nvfp4_largest_value_uses_top_of_range() -> None:
    # The tensor scale maps max|x| onto E2M1 6 x UE4M3 448, so the extreme value is exact (up to
    # the float32 division/multiplication by the scale) rather than clipped.
    x = gaussian((4, 256), 0.02, seed=3)
    raw, scale = quantize_tensor(x, T.NVFP4)
    out = dequantize_tensor(raw, T.NVFP4, scale)
    i = np.unravel_index(np.abs(x).argmax(), x.shape)
    assert out[i] == pytest.approx(x[i], rel=1e-6)


def test_float_types_exact_where_representable() -> None:
    x = gaussian((4, 96), 3.0)
    assert_identical(dequantize_tensor(quantize_tensor(x, T.F32)[0], T.F32), x)
    as_f16 = x.astype(np.float16).astype(np.float32)
    assert_identical(dequantize_tensor(quantize_tensor(as_f16, T.F16)[0], T.F16), as_f16)
    as_bf16 = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # low 16 bits cleared
    assert_identical(dequantize_tensor(quantize_tensor(as_bf16, T.BF16)[0], T.BF16), as_bf16)
    # Stored little-endian, as GGUF requires.
    assert quantize_tensor(np.array([1.0], np.float32), T.F32)[0].tolist() == [0, 0, 0x80, 0x3F]
    assert quantize_tensor(np.array([1.0], np.float32), T.F16)[0].tolist() == [0, 0x3C]


@pytest.mark.parametrize("ggml_type", WRITABLE, ids=lambda t: t.name)
def test_zeros_round_trip_exactly(ggml_type: T) -> None:
    x = np.zeros((2, 256), np.float32)
    raw, scale = quantize_tensor(x, ggml_type)
    if ggml_type == T.NVFP4:
        assert scale == 1.0
    assert_identical(dequantize_tensor(raw, ggml_type, scale), x)


@pytest.mark.parametrize("ggml_type", OWN_QUANTIZED + [T.Q8_0], ids=lambda t: t.name)
def test_shapes_layout_and_contiguity(ggml_type: T) -> None:
    x = gaussian((2, 3, 512), 1.0, seed=5)
    raw, scale = quantize_tensor(x, ggml_type)
    assert raw.shape == (2, 3, row_bytes(ggml_type, 512))
    # Rows are independent: quantizing one row alone gives the same bytes (NVFP4 modulo the
    # tensor-wide scale, so compare its raw quantizer on pre-scaled data).
    qt = get_quant_type(ggml_type)
    flat = x.reshape(6, 512) / np.float32(scale) if scale else x.reshape(6, 512)
    assert_identical(qt.quantize(flat[4]), qt.quantize(flat)[4])
    # A non-contiguous view quantizes like its contiguous copy.
    wide = gaussian((512, 8), 1.0, seed=6)
    assert_identical(qt.quantize(wide.T), qt.quantize(np.ascontiguousarray(wide.T)))
    out = dequantize_tensor(raw, ggml_type, scale)
    assert out.shape == x.shape
    empty_raw, _ = quantize_tensor(np.zeros((0, 512), np.float32), ggml_type)
    assert empty_raw.shape == (0, row_bytes(ggml_type, 512))


# --------------------------------------------------------------------------------------------
# Bit-exactness against gguf-py
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ggml_type", GGUF_QUANTIZED, ids=lambda t: t.name)
def test_delegated_quantizers_match_gguf_bytes(ggml_type: T) -> None:
    x = gaussian((8, 512), 1.0, seed=7)
    raw, _ = quantize_tensor(x, ggml_type)
    assert_identical(raw, gguf_quants.quantize(x, ggml_type))


@pytest.mark.parametrize("std", [1.0, 1e-3])
@pytest.mark.parametrize("ggml_type", OWN_QUANTIZED, ids=lambda t: t.name)
def test_own_quantizers_read_back_by_gguf(ggml_type: T, std: float) -> None:
    x = gaussian((8, 512), std, seed=8)
    raw, scale = quantize_tensor(x, ggml_type)
    ref = gguf_quants.dequantize(raw, ggml_type)
    if scale is not None:
        ref = ref * np.float32(scale)
    assert_identical(dequantize_tensor(raw, ggml_type, scale), ref)
    assert rel_error(ref, x) <= REL_ERROR_BOUND[ggml_type], describe(ref, x)


def test_ue4m3_encoder_matches_gguf() -> None:
    if not hasattr(gguf_quants.NVFP4, "fp32_to_ue4m3"):
        pytest.skip("this gguf-py has no NVFP4 scale encoder to compare with")
    v = np.concatenate(
        [
            np.geomspace(1e-6, 1e4, 20001, dtype=np.float32),
            np.array([0.0, -1.0, 2.0**-9, 2.0**-6, 448.0, 464.0, 480.0, 1e30], np.float32),
        ]
    )
    assert_identical(fp32_to_ue4m3(v), gguf_quants.NVFP4.fp32_to_ue4m3(v).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# Scalar ports of ggml's C reference (ggml/src/ggml-quants.c), element by element in float32.
# They are slow and obviously-correct transcriptions; the vectorised code must match them bytewise.
# --------------------------------------------------------------------------------------------

f32 = np.float32
KVALUES = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12]  # ggml's kvalues_mxfp4


def nearest_int(v: float) -> int:
    return int(np.rint(f32(v)))  # ggml's magic-number rounding is round-half-to-even


def ue4m3_half(b: int) -> float:
    """ggml_ue4m3_to_fp32: the UE4M3 value times 0.5 (pairs with the doubled kvalues)."""
    if b in (0, 0x7F):
        return 0.0
    exp, man = (b >> 3) & 0xF, b & 7
    raw = man * 2.0**-9 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7)
    return raw * 0.5


def ref_make_qkx2(x: list, w: list, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple:
    mn, mx = min(min(x), f32(0)), max(x)
    sum_w, sum_x = f32(0), f32(0)
    for xi, wi in zip(x, w, strict=True):
        sum_w, sum_x = f32(sum_w + wi), f32(sum_x + f32(wi * xi))
    if mx == mn:
        return f32(0), f32(-mn)

    def levels(iscale: f32, mn: f32) -> list:
        return [max(0, min(nmax, nearest_int(f32(iscale * f32(xi - mn))))) for xi in x]

    def error(scale: f32, mn: f32, lv: list) -> f32:
        e = f32(0)
        for xi, wi, li in zip(x, w, lv, strict=True):
            d = f32(f32(f32(scale * li) + mn) - xi)
            e = f32(e + f32(wi * f32(d * d)))
        return e

    iscale = f32(f32(nmax) / f32(mx - mn))
    scale = f32(1 / iscale)
    best = error(scale, mn, levels(iscale, mn))
    for step in range(nstep + 1):
        lv = levels(f32(f32(f32(rmin) + f32(f32(rdelta) * step) + nmax) / f32(mx - mn)), mn)
        sl = sl2 = sxl = f32(0)
        for xi, wi, li in zip(x, w, lv, strict=True):
            wl = f32(wi * li)
            sl, sl2, sxl = f32(sl + wl), f32(sl2 + f32(wl * li)), f32(sxl + f32(wl * xi))
        det = f32(f32(sum_w * sl2) - f32(sl * sl))
        if det > 0:
            this_scale = f32(f32(f32(sum_w * sxl) - f32(sum_x * sl)) / det)
            this_min = f32(f32(f32(sl2 * sum_x) - f32(sl * sxl)) / det)
            if this_min > 0:
                this_min, this_scale = f32(0), f32(sxl / sl2)
            err = error(this_scale, this_min, lv)
            if err < best:
                best, scale, mn = err, this_scale, this_min
    return scale, f32(-mn)


def ref_q4_k_block(x: np.ndarray) -> bytes:
    """quantize_row_q4_K_ref for one super-block."""
    d, dmin, packed, q = ref_k_quant(x, 15, -1.0, 20)
    qs = [q[c + i] | (q[c + i + 32] << 4) for c in range(0, 256, 64) for i in range(32)]
    return np.array([d, dmin], np.float16).tobytes() + bytes(packed) + bytes(qs)


def ref_q5_k_quant_block(x: np.ndarray) -> bytes:
    """quantize_row_q5_K_ref for one super-block."""
    d, dmin, packed, q = ref_k_quant(x, 31, -0.5, 15)
    qh, ql = [0] * 32, []
    for n in range(0, 256, 64):
        for j in range(32):
            lo, hi = q[n + j], q[n + j + 32]
            qh[j] |= (lo >> 4) << (n // 32) | (hi >> 4) << (n // 32 + 1)
            ql.append((lo & 0xF) | ((hi & 0xF) << 4))
    return np.array([d, dmin], np.float16).tobytes() + bytes(packed) + bytes(qh) + bytes(ql)


def ref_k_quant(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple:
    """The common part of quantize_row_q{4,5}_K_ref: (fp16 d, fp16 dmin, 12 scale bytes, 256 levels)."""
    xs = [f32(v) for v in x]
    scales, mins = [], []
    for j in range(8):
        sub = xs[32 * j : 32 * j + 32]
        sum_x2 = f32(0)
        for v in sub:
            sum_x2 = f32(sum_x2 + f32(v * v))
        av_x = f32(np.sqrt(f32(sum_x2 / 32)))
        s, m = ref_make_qkx2(sub, [f32(av_x + abs(v)) for v in sub], nmax, rmin, 0.1, nstep)
        scales.append(s)
        mins.append(m)
    max_scale, max_min = max([f32(0), *scales]), max([f32(0), *mins])
    inv_s = f32(63 / max_scale) if max_scale > 0 else f32(0)
    inv_m = f32(63 / max_min) if max_min > 0 else f32(0)
    ls = [min(63, nearest_int(f32(inv_s * s))) for s in scales]
    lm = [min(63, nearest_int(f32(inv_m * m))) for m in mins]
    packed = [0] * 12
    for j in range(8):
        if j < 4:
            packed[j], packed[j + 4] = ls[j], lm[j]
        else:
            packed[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            packed[j - 4] |= (ls[j] >> 4) << 6
            packed[j] |= (lm[j] >> 4) << 6
    d, dmin = np.float16(f32(max_scale / f32(63))), np.float16(f32(max_min / f32(63)))
    q = [0] * 256
    for j in range(8):
        dd, dm = f32(f32(d) * ls[j]), f32(f32(dmin) * lm[j])
        if dd:
            for i in range(32):
                q[32 * j + i] = max(0, min(nmax, nearest_int(f32(f32(xs[32 * j + i] + dm) / dd))))
    return d, dmin, packed, q


def ref_make_qx(x: list, nmax: int) -> f32:
    """make_qx_quants with rmse_type 1 (weights x^2)."""
    amax, vmax = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, vmax = abs(v), v
    if amax < 1e-15:
        return f32(0)

    def sums(iscale: f32) -> tuple:
        slx = sl2 = f32(0)
        for v in x:
            li = max(-nmax, min(nmax - 1, nearest_int(f32(iscale * v))))
            w = f32(v * v)
            slx, sl2 = f32(slx + f32(f32(w * v) * li)), f32(sl2 + f32(f32(w * li) * li))
        return slx, sl2

    slx, sl2 = sums(f32(-nmax / vmax))
    scale = f32(slx / sl2) if sl2 else f32(0)
    best = f32(scale * slx)
    for step in [s for s in range(-9, 10) if s]:
        slx, sl2 = sums(f32(-f32(nmax + f32(f32(0.1) * step)) / vmax))
        if sl2 > 0 and f32(slx * slx) > f32(best * sl2):
            scale = f32(slx / sl2)
            best = f32(scale * slx)
    return scale


def ref_q6_k_block(x: np.ndarray) -> bytes:
    """quantize_row_q6_K_ref for one super-block."""
    xs = [f32(v) for v in x]
    scales = [ref_make_qx(xs[16 * i : 16 * i + 16], 32) for i in range(16)]
    max_scale = max(scales, key=abs)  # first of the largest magnitude, as ggml's strict '>'
    if abs(max_scale) < 1e-15:
        return bytes(210)
    iscale = f32(f32(-128) / max_scale)
    d = np.float16(f32(1 / iscale))
    sc = [min(127, nearest_int(f32(iscale * s))) for s in scales]
    q = [0] * 256
    for j in range(16):
        dd = f32(f32(d) * sc[j])
        if dd:
            for i in range(16):
                q[16 * j + i] = max(-32, min(31, nearest_int(f32(xs[16 * j + i] / dd)))) + 32
    ql, qh = [0] * 128, [0] * 64
    for h in range(2):
        b = 128 * h
        for i in range(32):
            ql[64 * h + i] = (q[b + i] & 0xF) | ((q[b + i + 64] & 0xF) << 4)
            ql[64 * h + i + 32] = (q[b + i + 32] & 0xF) | ((q[b + i + 96] & 0xF) << 4)
            qh[32 * h + i] = sum((q[b + i + 32 * k] >> 4) << (2 * k) for k in range(4))
    return bytes(ql) + bytes(qh) + np.array(sc, np.int8).tobytes() + np.float16(d).tobytes()


def ref_nvfp4_block(x: np.ndarray) -> bytes:
    """quantize_row_nvfp4_ref for one block (unit tensor scale)."""
    scales, qs = [], []
    for s in range(4):
        sub = [f32(v) for v in x[16 * s : 16 * s + 16]]
        ue = int(fp32_to_ue4m3(np.array([f32(max(abs(v) for v in sub) / f32(6))]))[0])
        d = f32(ue4m3_half(ue))
        idx = [min(range(16), key=lambda k, v=v: (abs(f32(f32(KVALUES[k] * d) - v)), k)) for v in sub]
        scales.append(ue)
        qs += [idx[j] | (idx[j + 8] << 4) for j in range(8)]
    return bytes(scales) + bytes(qs)


def mixed_blocks(seed: int, n: int = 16) -> np.ndarray:
    """Super-blocks of Gaussian data with outliers, all-positive, tiny and all-zero stretches."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 256)).astype(np.float32)
    x[0::4] *= np.where(rng.random((n // 4, 256)) < 0.01, 50, 1).astype(np.float32)  # rare outliers
    x[1::4] = np.abs(x[1::4])  # exercises the "min > 0" branches
    x[2::4] *= 1e-3  # fp16 super-block scales become subnormal
    x[3, 64:96] = 0.0  # an all-zero sub-block
    return x


def test_nvfp4_matches_scalar_ggml_reference() -> None:
    # No reductions feed a decision here, so the vectorised code must match bytewise.
    x = mixed_blocks(seed=11, n=8)
    expected = np.frombuffer(b"".join(ref_nvfp4_block(b) for b in x.reshape(-1, 64)), np.uint8)
    assert_identical(NVFP4.quantize(x).reshape(-1), expected)


@pytest.mark.parametrize(
    ("qt", "ref_block"), [(Q4_K, ref_q4_k_block), (Q5_K, ref_q5_k_quant_block), (Q6_K, ref_q6_k_block)],
    ids=["Q4_K", "Q5_K", "Q6_K"],
)
def test_k_quants_match_scalar_ggml_reference(qt: type, ref_block) -> None:
    # numpy sums pairwise, ggml sequentially, so a float32 near-tie in the scale search (notably
    # when an outlier makes sum_w * sum_l2 - sum_l**2 cancel) can pick another, equally good
    # candidate. Require most super-blocks byte-identical and no measurable loss in the others.
    x = mixed_blocks(seed=2)
    expected = np.frombuffer(b"".join(ref_block(b) for b in x), np.uint8).reshape(len(x), -1)
    got = qt.quantize(x)
    identical = (got == expected).all(axis=1)
    err_ref = np.linalg.norm(qt.dequantize(expected) - x, axis=1)
    err_got = np.linalg.norm(qt.dequantize(got) - x, axis=1)
    msg = f"identical blocks {identical.sum()}/{len(x)}; ours/ref error per block {err_got / err_ref}"
    assert identical.sum() >= 3 * len(x) // 4, msg
    assert (err_got <= 1.05 * err_ref).all() and err_got.sum() <= 1.01 * err_ref.sum(), msg


def test_gguf_decoders_match_scalar_ggml_reference() -> None:
    """gguf-py's readers agree with transcriptions of ggml's dequantize_row_* (a guard on layout)."""
    x = gaussian((1, 256), 1.0, seed=12)

    raw = Q4_K.quantize(x)[0]
    d, dmin = (float(v) for v in raw[:4].view(np.float16))
    sc = raw[4:16]
    expected = []
    for j in range(8):  # get_scale_min_k4
        if j < 4:
            s, m = sc[j] & 63, sc[j + 4] & 63
        else:
            s, m = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
        chunk = raw[16 + 32 * (j // 2) : 16 + 32 * (j // 2 + 1)]
        nib = chunk & 0xF if j % 2 == 0 else chunk >> 4
        expected += [f32(f32(d * s) * int(n) - f32(dmin * m)) for n in nib]
    assert_identical(gguf_quants.dequantize(raw, T.Q4_K), np.array(expected, np.float32))

    raw = Q6_K.quantize(x)[0]
    ql, qh, scales, d = raw[:128], raw[128:192], raw[192:208].view(np.int8), raw[208:].view(np.float16)[0]
    out = np.zeros(256, np.float32)
    for h in range(2):
        for i in range(32):
            lo, hi = ql[64 * h + i], ql[64 * h + i + 32]
            q = [
                (lo & 0xF) | (((qh[32 * h + i] >> 0) & 3) << 4),
                (hi & 0xF) | (((qh[32 * h + i] >> 2) & 3) << 4),
                (lo >> 4) | (((qh[32 * h + i] >> 4) & 3) << 4),
                (hi >> 4) | (((qh[32 * h + i] >> 6) & 3) << 4),
            ]
            for k in range(4):
                out[128 * h + i + 32 * k] = f32(f32(d) * scales[8 * h + i // 16 + 2 * k]) * (int(q[k]) - 32)
    assert_identical(gguf_quants.dequantize(raw, T.Q6_K), out)

    raw = NVFP4.quantize(x[:, :64] * 100)[0]
    out = np.zeros(64, np.float32)
    for s in range(4):
        d = f32(ue4m3_half(int(raw[s])))
        for j in range(8):
            byte = raw[4 + 8 * s + j]
            out[16 * s + j], out[16 * s + j + 8] = KVALUES[byte & 0xF] * d, KVALUES[byte >> 4] * d
    assert_identical(gguf_quants.dequantize(raw, T.NVFP4), out)


@pytest.mark.parametrize("ggml_type", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_random_valid_blocks_matches_gguf(ggml_type: T) -> None:
    """Random bytes with finite fp16 scales: every code, sign and grid index, decoded as gguf-py (= ggml) does."""
    raw = random_blocks(ggml_type, 3, 1024, np.random.default_rng(int(ggml_type)))
    out = dequantize_tensor(raw, ggml_type)
    assert out.shape == (3, 1024) and np.isfinite(out).all()
    assert_identical(out, gguf_quants.dequantize(raw, ggml_type))


# Scalar transcriptions of ggml's dequantize_row_* for the types dgrun reads from llama-quantize's files: a guard
# on gguf-py's (vectorised) reading of each layout. The i-quant grids come from gguf-py, checked against a few
# entries of ggml's iq3s_grid / iq2s_grid tables here.
KVALUES_IQ4NL = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]


def _grid(cls: type) -> np.ndarray:
    cls.init_grid()
    return cls.grid.reshape(cls.grid_shape)


def test_iq_grids_match_ggml_entries() -> None:
    iq3s, iq2s = _grid(gguf_quants.IQ3_S), _grid(gguf_quants.IQ2_S)
    assert iq3s.shape == (512, 4) and iq2s.shape == (1024, 8)

    def as_bytes(word: int, n: int) -> list[int]:
        return list(word.to_bytes(n, "little"))

    # ggml-common.h: iq3s_grid[0..3] and [511], iq2s_grid[0..3].
    for i, word in [(0, 0x01010101), (1, 0x01010103), (2, 0x01010105), (3, 0x0101010B), (511, 0x0F0F0101)]:
        assert iq3s[i].tolist() == as_bytes(word, 4), i
    for i, word in [(0, 0x0808080808080808), (1, 0x080808080808082B), (2, 0x0808080808081919),
                    (3, 0x0808080808082B08)]:
        assert iq2s[i].tolist() == as_bytes(word, 8), i


def ref_q5_1_block(raw: np.ndarray) -> list:
    d, m = (f32(v) for v in raw[:4].view(np.float16))
    qh = int(raw[4:8].view("<u4")[0])
    qs = raw[8:]
    lo = [f32(f32(((qs[j] & 0xF) | (((qh >> j) << 4) & 0x10)) * d) + m) for j in range(16)]
    hi = [f32(f32(((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) * d) + m) for j in range(16)]
    return lo + hi


def _scale_min_k4(sc: np.ndarray, j: int) -> tuple[int, int]:
    if j < 4:
        return int(sc[j] & 63), int(sc[j + 4] & 63)
    return int((sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)), int((sc[j + 4] >> 4) | ((sc[j] >> 6) << 4))


def ref_q5_k_block(raw: np.ndarray) -> list:
    d, dmin = (f32(v) for v in raw[:4].view(np.float16))
    sc, qh, ql = raw[4:16], raw[16:48], raw[48:]
    out = []
    for c in range(4):  # 64 values per chunk of 32 nibble bytes
        for half in range(2):
            s, m = _scale_min_k4(sc, 2 * c + half)
            d1, m1 = f32(d * s), f32(dmin * m)
            for ell in range(32):
                nib = (ql[32 * c + ell] >> (4 * half)) & 0xF
                high = 16 if qh[ell] & (1 << (2 * c + half)) else 0
                out.append(f32(f32(d1 * (int(nib) + high)) - m1))
    return out


def ref_iq4_nl_block(raw: np.ndarray) -> list:
    d = f32(raw[:2].view(np.float16)[0])
    qs = raw[2:]
    return [f32(d * KVALUES_IQ4NL[q & 0xF]) for q in qs] + [f32(d * KVALUES_IQ4NL[q >> 4]) for q in qs]


def ref_iq4_xs_block(raw: np.ndarray) -> list:
    d = f32(raw[:2].view(np.float16)[0])
    scales_h = int(raw[2:4].view("<u2")[0])
    scales_l, qs = raw[4:8], raw[8:]
    out = []
    for ib in range(8):
        ls = ((scales_l[ib // 2] >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4)
        dl = f32(d * (int(ls) - 32))
        q = qs[16 * ib : 16 * ib + 16]
        out += [f32(dl * KVALUES_IQ4NL[v & 0xF]) for v in q] + [f32(dl * KVALUES_IQ4NL[v >> 4]) for v in q]
    return out


def ref_iq3_s_block(raw: np.ndarray) -> list:
    grid = _grid(gguf_quants.IQ3_S)
    d = f32(raw[:2].view(np.float16)[0])
    qs, qh, signs, scales = raw[2:66], raw[66:74], raw[74:106], raw[106:110]
    out = []
    for ib in range(8):  # 32 values: 4 groups of 8 = two grid entries of 4, one sign byte
        db = f32(d * (1 + 2 * int((scales[ib // 2] >> (4 * (ib % 2))) & 0xF)))
        for ell in range(4):
            for k in range(2):
                index = int(qs[8 * ib + 2 * ell + k]) | ((int(qh[ib]) << (8 - 2 * ell - k)) & 256)
                for j in range(4):
                    sign = -1 if signs[4 * ib + ell] & (1 << (4 * k + j)) else 1
                    out.append(f32(f32(db * grid[index, j]) * sign))
    return out


def ref_iq2_s_block(raw: np.ndarray) -> list:
    grid = _grid(gguf_quants.IQ2_S)
    d = f32(raw[:2].view(np.float16)[0])
    qs, signs, qh, scales = raw[2:34], raw[34:66], raw[66:74], raw[74:82]
    out = []
    for ib in range(8):
        db = [f32(f32(d * f32(0.5 + int(scales[ib] & 0xF))) * f32(0.25)),
              f32(f32(d * f32(0.5 + int(scales[ib] >> 4))) * f32(0.25))]
        for ell in range(4):
            index = int(qs[4 * ib + ell]) | ((int(qh[ib]) << (8 - 2 * ell)) & 0x300)
            for j in range(8):
                sign = -1 if signs[4 * ib + ell] & (1 << j) else 1
                out.append(f32(f32(db[ell // 2] * grid[index, j]) * sign))
    return out


SCALAR_DECODERS = {T.Q5_1: ref_q5_1_block, T.Q5_K: ref_q5_k_block, T.IQ4_NL: ref_iq4_nl_block,
                   T.IQ4_XS: ref_iq4_xs_block, T.IQ3_S: ref_iq3_s_block, T.IQ2_S: ref_iq2_s_block}


@pytest.mark.parametrize("ggml_type", list(SCALAR_DECODERS), ids=lambda t: t.name)
def test_new_type_decoders_match_scalar_ggml_reference(ggml_type: T) -> None:
    qt = get_quant_type(ggml_type)
    raw = random_blocks(ggml_type, 1, 2 * max(qt.block_size, 256), np.random.default_rng(40 + int(ggml_type)))
    blocks = raw.reshape(-1, qt.type_size)
    expected = np.array([v for b in blocks for v in SCALAR_DECODERS[ggml_type](b)], np.float32)
    assert_identical(dequantize_tensor(raw, ggml_type).reshape(-1), expected)


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ggml_type", WRITABLE, ids=lambda t: t.name)
def test_bad_inputs_raise(ggml_type: T) -> None:
    block = get_quant_type(ggml_type).block_size
    if block > 1:
        with pytest.raises(ValueError, match=f"not a multiple of the block size {block}"):
            quantize_tensor(np.zeros((2, block + 1), np.float32), ggml_type)
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((2, 256), np.float32)
        x[1, 7] = bad
        with pytest.raises(ValueError, match="non-finite"):
            quantize_tensor(x, ggml_type)
    with pytest.raises(ValueError, match="0-d"):
        quantize_tensor(np.float32(1.0), ggml_type)
    type_size = get_quant_type(ggml_type).type_size
    scale = 1.0 if ggml_type == T.NVFP4 else None
    with pytest.raises(ValueError, match="not a multiple of the block bytes"):
        dequantize_tensor(np.zeros((1, type_size * 2 + 1), np.uint8), ggml_type, scale)
    with pytest.raises(ValueError, match="must be uint8"):
        dequantize_tensor(np.zeros((1, type_size), np.float32), ggml_type, scale)


def test_f16_overflow_raises() -> None:
    with pytest.raises(ValueError, match="beyond the float16 range"):
        quantize_tensor(np.array([1.0, 70000.0], np.float32), T.F16)


def test_tensor_scale_misuse_raises() -> None:
    raw, scale = quantize_tensor(gaussian((1, 64), 1.0), T.NVFP4)
    with pytest.raises(ValueError, match="needs the tensor_scale"):
        dequantize_tensor(raw, T.NVFP4)
    with pytest.raises(ValueError, match="finite and > 0"):
        dequantize_tensor(raw, T.NVFP4, 0.0)
    with pytest.raises(ValueError, match="only used by NVFP4"):
        dequantize_tensor(quantize_tensor(gaussian((1, 64), 1.0), T.Q8_0)[0], T.Q8_0, scale)
