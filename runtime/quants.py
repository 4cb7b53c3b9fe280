"""GGML tensor types as small classes: quantize float32 arrays to GGML's raw block bytes and back.

Every type the project writes into a ``.dgf`` file is a subclass of :class:`QuantType` with the
GGML type id, the block geometry, and two class methods::

    raw = Q4_K.quantize(x)      # float32 [..., n]          -> uint8 [..., n // 256 * 144]
    y = Q4_K.dequantize(raw)    # uint8 [..., n_bytes]     -> float32 [..., n]

Where gguf-py already has a quantizer that is bit-exact with ggml's C reference (Q8_0, Q4_0, Q5_0,
Q5_1, MXFP4, BF16) we delegate to it, so files we write are byte-identical to what llama.cpp's tools would
write. gguf-py has no quantizer for Q4_K, Q5_K, Q6_K and NVFP4, so those are vectorised numpy ports of
ggml's ``quantize_row_*_ref`` (see ``ggml/src/ggml-quants.c``). Dequantization of every quantized
type delegates to ``gguf.quants.dequantize``, which mirrors ggml's ``dequantize_row_*`` and is fast
enough (~10 ms per 2M values) that a private copy would only be a second thing to keep right.

Some types dgrun reads but does not write (:class:`DecodeOnlyType`: the i-quants IQ4_NL, IQ4_XS, IQ3_S and
IQ2_S): they occur in GGUF files made by llama.cpp's ``llama-quantize``, whose quantizers for them search
value grids, best against an importance matrix. Their ``quantize`` raises ValueError and
:func:`can_quantize` is False for them.

NVFP4 additionally needs a per-tensor float32 scale (stored by the converter as ``<name>.scale``,
as llama.cpp does): its per-16-value UE4M3 scales cannot go below 2**-9, so without a tensor scale
small weights underflow. :func:`quantize_tensor` / :func:`dequantize_tensor` hide that difference
so callers treat every type the same way.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES

__all__ = [
    "QUANT_TYPES",
    "BF16",
    "F16",
    "F32",
    "MXFP4",
    "NVFP4",
    "Q4_0",
    "IQ2_S",
    "IQ3_S",
    "IQ4_NL",
    "IQ4_XS",
    "Q4_K",
    "Q5_0",
    "Q5_1",
    "Q5_K",
    "Q6_K",
    "Q8_0",
    "DecodeOnlyType",
    "QuantType",
    "can_quantize",
    "dequantize_tensor",
    "get_quant_type",
    "quantize_tensor",
    "row_bytes",
]

TypeLike = GGMLQuantizationType | int | str

# Values handed to a numpy quantizer at once. The scale searches make many passes over a handful of
# chunk-sized float32 temporaries; 64K values (256 KiB each) keeps them in cache, which measured
# ~1.5x faster than 1M-value chunks, while numpy's per-call overhead stays negligible.
_CHUNK_VALUES = 1 << 16

QUANT_TYPES: dict[GGMLQuantizationType, type[QuantType]] = {}


class QuantType:
    """One GGML tensor type. Subclasses are used as namespaces (class methods only, no instances)."""

    ggml_type: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]  # values per block
    type_size: ClassVar[int]  # bytes per block
    bits_per_weight: ClassVar[float]

    def __init_subclass__(cls, ggml_type: GGMLQuantizationType | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if ggml_type is None:  # an intermediate base class, not a concrete type
            return
        cls.ggml_type = ggml_type
        # Take the geometry from gguf-py rather than restating it, so the two can never disagree.
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[ggml_type]
        cls.bits_per_weight = 8.0 * cls.type_size / cls.block_size
        QUANT_TYPES[ggml_type] = cls

    @classmethod
    def quantize(cls, x: np.ndarray) -> np.ndarray:
        """Quantize ``x`` (float, last dim a multiple of ``block_size``) to uint8 ``[..., row_bytes]``."""
        rows = _check_float_input(cls, x)
        n = rows.shape[-1]
        out_shape = (*np.shape(x)[:-1], n // cls.block_size * cls.type_size)
        if rows.size == 0:
            return np.zeros(out_shape, dtype=np.uint8)
        return cls._quantize_rows(rows).reshape(out_shape)

    @classmethod
    def dequantize(cls, raw: np.ndarray) -> np.ndarray:
        """Decode uint8 ``[..., n_bytes]`` raw blocks back to float32 ``[..., n_elements]``."""
        rows = _check_raw_input(cls, raw)
        out_shape = (*np.shape(raw)[:-1], rows.shape[-1] // cls.type_size * cls.block_size)
        if rows.size == 0:
            return np.zeros(out_shape, dtype=np.float32)
        return cls._dequantize_rows(rows).reshape(out_shape)

    @classmethod
    def _quantize_rows(cls, rows: np.ndarray) -> np.ndarray:
        """float32 [R, n] (validated, C-contiguous) -> uint8 [R, n_bytes]."""
        return gguf_quants.quantize(rows, cls.ggml_type)

    @classmethod
    def _dequantize_rows(cls, rows: np.ndarray) -> np.ndarray:
        """uint8 [R, n_bytes] (validated, C-contiguous) -> float32 [R, n]."""
        return gguf_quants.dequantize(rows, cls.ggml_type)


class DecodeOnlyType(QuantType):
    """A type dgrun reads (dequantizes with gguf-py, bit-exact with ggml) but does not write."""

    @classmethod
    def quantize(cls, x: np.ndarray) -> np.ndarray:
        raise ValueError(f"{cls.ggml_type.name}: dgrun reads this type but cannot write it "
                         "(llama.cpp's llama-quantize can)")


class _BlockQuantType(QuantType):
    """A type whose quantizer is our own numpy code, run over chunks of blocks."""

    @classmethod
    def _quantize_rows(cls, rows: np.ndarray) -> np.ndarray:
        blocks = rows.reshape(-1, cls.block_size)
        out = np.empty((blocks.shape[0], cls.type_size), dtype=np.uint8)
        step = max(1, _CHUNK_VALUES // cls.block_size)
        for start in range(0, blocks.shape[0], step):
            out[start : start + step] = cls._quantize_blocks(blocks[start : start + step])
        return out.reshape(rows.shape[0], -1)

    @classmethod
    def _quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """float32 [nb, block_size] -> uint8 [nb, type_size]."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# Plain float types
# ----------------------------------------------------------------------------------------------


class F32(QuantType, ggml_type=GGMLQuantizationType.F32):
    """IEEE float32, stored little-endian as GGUF requires."""

    @classmethod
    def _quantize_rows(cls, rows: np.ndarray) -> np.ndarray:
        return rows.astype("<f4", copy=False).view(np.uint8)

    @classmethod
    def _dequantize_rows(cls, rows: np.ndarray) -> np.ndarray:
        return rows.view("<f4").astype(np.float32)


class F16(QuantType, ggml_type=GGMLQuantizationType.F16):
    """IEEE float16 (round to nearest even, like ggml's FP32_TO_FP16)."""

    @classmethod
    def _quantize_rows(cls, rows: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # reported as a ValueError just below
            half = rows.astype("<f2")
        # float16 tops out at 65504; a silent inf in a weight file would only surface as NaN logits.
        if not np.isfinite(half).all():
            max_abs = float(np.abs(rows).max())
            raise ValueError(f"F16: input has values beyond the float16 range (max |x| = {max_abs:g})")
        return half.view(np.uint8)

    @classmethod
    def _dequantize_rows(cls, rows: np.ndarray) -> np.ndarray:
        return rows.view("<f2").astype(np.float32)


class BF16(QuantType, ggml_type=GGMLQuantizationType.BF16):
    """bfloat16; gguf-py's converter is bit-exact with ggml_compute_fp32_to_bf16 (round to nearest even)."""


# ----------------------------------------------------------------------------------------------
# Legacy block types and MXFP4: gguf-py's quantizers are bit-exact ports of ggml's reference code.
# ----------------------------------------------------------------------------------------------


class Q8_0(QuantType, ggml_type=GGMLQuantizationType.Q8_0):
    """32 int8 values with one fp16 scale (8.5 bits/weight)."""


class Q4_0(QuantType, ggml_type=GGMLQuantizationType.Q4_0):
    """32 4-bit values with one fp16 scale (4.5 bits/weight)."""


class Q5_0(QuantType, ggml_type=GGMLQuantizationType.Q5_0):
    """32 5-bit values with one fp16 scale (5.5 bits/weight)."""


class Q5_1(QuantType, ggml_type=GGMLQuantizationType.Q5_1):
    """32 5-bit values with an fp16 scale and an fp16 min (6 bits/weight): x = d·q + m.

    Layout (24 bytes): fp16 d, fp16 m, 4 bytes of fifth bits (bit j for value j), 16 bytes of nibbles
    (byte j: value j low, value j + 16 high). llama-quantize's fallback for Q5_K on rows not divisible by 256.
    """


class MXFP4(QuantType, ggml_type=GGMLQuantizationType.MXFP4):
    """OCP MXFP4: 32 E2M1 values with one E8M0 (power of two) scale (4.25 bits/weight)."""


# ----------------------------------------------------------------------------------------------
# K-quants: vectorised ports of quantize_row_q4_K_ref / quantize_row_q5_K_ref / quantize_row_q6_K_ref
# ----------------------------------------------------------------------------------------------


def _make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted affine fit ``x ~ scale * L - min`` with ``L`` in ``[0, nmax]``, over the last axis.

    Port of ggml's ``make_qkx2_quants``: start from the min/max fit, then try ``nstep + 1`` slightly
    different inverse scales, each followed by a closed-form weighted least-squares refit of
    (scale, min), keeping whichever has the lowest weighted squared error. Every sub-block runs the
    same candidate sequence, so we loop over candidates and vectorise over sub-blocks. Arithmetic is
    float32 like ggml's; only summation order differs. Returns ``(scale, min)`` with ``min >= 0``.
    """
    xmin = np.minimum(x.min(axis=-1), 0.0)
    xmax = x.max(axis=-1)
    sum_w = w.sum(axis=-1)
    sum_x = (w * x).sum(axis=-1)
    flat = xmax == xmin  # constant sub-block: represented by the min alone
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = nmax / (xmax - xmin)
        scale = 1.0 / iscale
        levels = np.clip(np.rint(iscale[..., None] * (x - xmin[..., None])), 0, nmax)
        best = (w * (scale[..., None] * levels + xmin[..., None] - x) ** 2).sum(axis=-1)
        for step in range(nstep + 1):
            # As in ggml, a candidate that improved the fit moves `xmin`, which the next candidates
            # start from: the search is sequential per sub-block, hence the loop.
            iscale = (rmin + rdelta * step + nmax) / (xmax - xmin)
            levels = np.clip(np.rint(iscale[..., None] * (x - xmin[..., None])), 0, nmax)
            wl = w * levels
            sum_l = wl.sum(axis=-1)
            sum_l2 = (wl * levels).sum(axis=-1)
            sum_xl = (wl * x).sum(axis=-1)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            # The format can only subtract a min; a positive offset is refit as a pure scale.
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive, 0.0, this_min)
            err = (w * (this_scale[..., None] * levels + this_min[..., None] - x) ** 2).sum(axis=-1)
            better = (det > 0) & (err < best)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            xmin = np.where(better, this_min, xmin)
    scale = np.where(flat, 0.0, scale)
    return scale, -xmin


def _make_qx_quants(x: np.ndarray, nmax: int) -> np.ndarray:
    """Symmetric fit ``x ~ scale * l``, ``l`` in ``[-nmax, nmax - 1]`` (ggml's make_qx_quants, rmse_type 1).

    The signed value of largest magnitude is mapped to ``-nmax`` (the asymmetric extra level), then
    19 nearby inverse scales are tried and the one maximising ``sumlx**2 / suml2`` (i.e. minimising
    the x**2-weighted squared error after the least-squares rescale) wins. float32 like ggml: its
    x**3-sized sums only underflow for weights far below where the fp16 super-block scale does.
    """
    ax = np.abs(x)
    amax = ax.max(axis=-1)
    vmax = np.take_along_axis(x, ax.argmax(axis=-1)[..., None], axis=-1)[..., 0]  # first max, as ggml
    zero = amax < 1e-15  # GROUP_MAX_EPS
    vmax = np.where(zero, 1.0, vmax)
    w = x * x

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        levels = np.clip(np.rint(iscale[..., None] * x), -nmax, nmax - 1)
        wl = w * levels
        return (wl * x).sum(axis=-1), (wl * levels).sum(axis=-1)

    with np.errstate(divide="ignore", invalid="ignore"):
        sumlx, suml2 = fit(-nmax / vmax)
        scale = np.where(suml2 != 0, sumlx / suml2, 0.0)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            sumlx, suml2 = fit(-(nmax + 0.1 * step) / vmax)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    return np.where(zero, 0.0, scale)


def _k_quant_blocks(
    blocks: np.ndarray, nmax: int, rmin: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ggml's quantize_row_q4_K_ref / quantize_row_q5_K_ref up to the packing of the levels.

    float32 [nb, 256] -> (fp16 d [nb, 1], fp16 dmin [nb, 1], the 12 packed (scale, min) bytes [nb, 12],
    levels in [0, nmax] as uint8 [nb, 8, 32]).
    """
    nb = blocks.shape[0]
    x = blocks.reshape(nb, 8, 32)
    # ggml's weighting: large-magnitude values matter more, with the sub-block RMS as a floor.
    av_x = np.sqrt(np.mean(x * x, axis=-1, keepdims=True))
    scales, mins = _make_qkx2_quants(x, av_x + np.abs(x), nmax=nmax, rmin=rmin, rdelta=0.1, nstep=nstep)

    # Second level: the 8 scales and 8 mins are themselves quantized to 6 bits against the
    # super-block maxima, stored as fp16 d and dmin.
    max_scale = scales.max(axis=-1, keepdims=True)
    max_min = mins.max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, np.float32(63) / max_scale, np.float32(0))
        inv_min = np.where(max_min > 0, np.float32(63) / max_min, np.float32(0))
    ls = np.clip(np.rint(inv_scale * scales), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(inv_min * mins), 0, 63).astype(np.uint8)
    d = (max_scale / np.float32(63)).astype(np.float16)
    dmin = (max_min / np.float32(63)).astype(np.float16)

    # Re-derive the levels against the scales as they will actually be decoded.
    d_sub = d.astype(np.float32) * ls.astype(np.float32)
    m_sub = dmin.astype(np.float32) * lm.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.clip(np.rint((x + m_sub[..., None]) / d_sub[..., None]), 0, nmax)
    # A zero sub-block scale decodes to -min whatever the level; store 0 there, as ggml does for
    # constant sub-blocks (it keeps its search's levels in the rare other cases).
    levels = np.where(d_sub[..., None] == 0, 0, levels).astype(np.uint8)

    packed_scales = np.empty((nb, 12), dtype=np.uint8)
    # Sub-blocks 0-3 keep their 6 bits in bytes 0-7; sub-blocks 4-7 put their low 4 bits in
    # bytes 8-11 and their top 2 bits in the spare top bits of bytes 0-7 (ggml's get_scale_min_k4).
    packed_scales[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed_scales[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed_scales[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    return d, dmin, packed_scales, levels


def _k_quant_nibbles(levels: np.ndarray) -> np.ndarray:
    """Low 4 bits of [nb, 8, 32] levels as Q4_K/Q5_K's 128 bytes: byte l of each 32-byte group holds value l of
    sub-block 2c in the low and of sub-block 2c + 1 in the high nibble."""
    pairs = (levels & 0x0F).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0, :] | (pairs[:, :, 1, :] << 4)).reshape(-1, 128)


class Q4_K(_BlockQuantType, ggml_type=GGMLQuantizationType.Q4_K):
    """Super-blocks of 256 = 8 x 32 values, 4-bit levels with 6-bit scale and min per 32 (4.5 bits/weight).

    Layout (144 bytes): fp16 d, fp16 dmin, 12 bytes of packed 6-bit (scale, min) pairs, 128 bytes of
    nibbles (byte l of each 32-byte group holds value l in the low and value l + 32 in the high nibble).
    """

    @classmethod
    def _quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, dmin, packed_scales, levels = _k_quant_blocks(blocks, nmax=15, rmin=-1.0, nstep=20)
        qs = _k_quant_nibbles(levels)
        return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed_scales, qs], axis=1)


class Q5_K(_BlockQuantType, ggml_type=GGMLQuantizationType.Q5_K):
    """Super-blocks of 256 = 8 x 32 values, 5-bit levels with 6-bit scale and min per 32 (5.5 bits/weight).

    Layout (176 bytes): fp16 d, fp16 dmin, Q4_K's 12 bytes of (scale, min) pairs, 32 bytes of fifth bits
    (bit s of byte l: value l of sub-block s), 128 bytes of nibbles in Q4_K's order; x = d·sc·q - dmin·m per
    sub-block. The bulk type of Q5_K_M files. Quantizer: ggml's quantize_row_q5_K_ref (Q4_K's with 32 levels).
    """

    @classmethod
    def _quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d, dmin, packed_scales, levels = _k_quant_blocks(blocks, nmax=31, rmin=-0.5, nstep=15)
        fifth = (levels >> 4).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]
        qh = np.bitwise_or.reduce(fifth, axis=1)
        return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed_scales, qh, _k_quant_nibbles(levels)],
                              axis=1)


class Q6_K(_BlockQuantType, ggml_type=GGMLQuantizationType.Q6_K):
    """Super-blocks of 256 = 16 x 16 values, 6-bit levels with an int8 scale per 16 (6.5625 bits/weight).

    Layout (210 bytes): 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, fp16 d.
    """

    @classmethod
    def _quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        nb = blocks.shape[0]
        x = blocks.reshape(nb, 16, 16)
        scales = _make_qx_quants(x, nmax=32).astype(np.float32)

        # The signed scale of largest magnitude maps to int8 -128 (again using the extra level).
        max_scale = np.take_along_axis(scales, np.abs(scales).argmax(axis=-1)[:, None], axis=-1)
        zero_block = np.abs(max_scale) < 1e-15
        iscale = np.float32(-128) / np.where(zero_block, np.float32(1), max_scale)
        d = np.where(zero_block, 0, np.float32(1) / iscale).astype(np.float16)
        sc = np.where(zero_block, 0, np.clip(np.rint(iscale * scales), -128, 127)).astype(np.int8)

        d_sub = d.astype(np.float32) * sc.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            levels = np.clip(np.rint(x / d_sub[..., None]), -32, 31) + 32
        # A zero sub-block scale decodes to 0 whatever the level; store raw 0 there, which is what
        # ggml writes for all-zero sub-blocks (it keeps its search's levels in the rare other cases).
        levels = np.where(d_sub[..., None] == 0, 0, levels).astype(np.uint8)

        # Each 128-value half: ql byte l holds values l (low) and l + 64 (high); byte l + 32 holds
        # l + 32 and l + 96; qh byte l holds the top 2 bits of l, l + 32, l + 64, l + 96.
        q = levels.reshape(nb, 2, 4, 32)
        lo = q & 0x0F
        ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=-1)
        hi = q >> 4
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
        return np.concatenate(
            [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d.view(np.uint8)], axis=1
        )


# ----------------------------------------------------------------------------------------------
# i-quants (read only): non-uniform value tables and lattice grids, written by llama-quantize
# ----------------------------------------------------------------------------------------------


class IQ4_NL(DecodeOnlyType, ggml_type=GGMLQuantizationType.IQ4_NL):
    """32 4-bit indices into a fixed non-uniform table of 16 int8 values, one fp16 scale (4.5 bits/weight).

    Layout (18 bytes): fp16 d, 16 bytes of nibbles (byte j: value j low, value j + 16 high);
    x = d·kvalues[q] with kvalues = -127 … 113 (ggml's ``kvalues_iq4nl``). llama-quantize's fallback for
    IQ4_XS / IQ3 / IQ2 recipes on rows not divisible by 256.
    """


class IQ4_XS(DecodeOnlyType, ggml_type=GGMLQuantizationType.IQ4_XS):
    """IQ4_NL's value table in super-blocks of 256 = 8 x 32, a 6-bit signed scale per 32 (4.25 bits/weight).

    Layout (136 bytes): fp16 d, 2 bytes of high scale bits (2 per sub-block), 4 bytes of low scale nibbles,
    128 bytes of nibbles in IQ4_NL's order per 32 values; x = d·(scale - 32)·kvalues[q].
    """


class IQ3_S(DecodeOnlyType, ggml_type=GGMLQuantizationType.IQ3_S):
    """Groups of 4 values from a 512-entry grid of magnitudes {1, 3, …, 15}, explicit signs (3.44 bits/weight).

    Layout (110 bytes): fp16 d, 64 bytes of grid-index low bytes, 8 bytes of ninth index bits, 32 bytes of
    sign bits, 4 bytes of 4-bit scales (one per 32 values); x = d·(1 + 2·scale)·grid·sign. An IQ3_M file
    is IQ3_S with some tensors in Q4_K / Q5_K.
    """


class IQ2_S(DecodeOnlyType, ggml_type=GGMLQuantizationType.IQ2_S):
    """Groups of 8 values from a 1024-entry grid of magnitudes {8, 25, 43}, explicit signs (2.56 bits/weight).

    Layout (82 bytes): fp16 d, 32 bytes of grid-index low bytes, 32 bytes of sign bits, 8 bytes of index
    high bits (2 per group), 8 bytes of 4-bit scales (one per 16 values); x = d·(0.5 + scale)·0.25·grid·sign.
    """


# ----------------------------------------------------------------------------------------------
# NVFP4
# ----------------------------------------------------------------------------------------------

# E2M1 magnitudes doubled (ggml's kvalues_mxfp4): codes 0-7 positive, 8-15 negative.
_KVALUES_FP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


def _ue4m3_half_table() -> np.ndarray:
    """Decoded value of every UE4M3 byte, times 0.5 like ggml_ue4m3_to_fp32 (pairs with doubled kvalues)."""
    code = np.arange(256)
    exp = (code >> 3) & 0x0F
    man = (code & 0x07).astype(np.float64)
    raw = np.where(exp == 0, man * 2.0**-9, (1.0 + man / 8.0) * np.exp2(exp - 7.0))
    return np.where((code == 0) | (code == 0x7F), 0.0, raw * 0.5).astype(np.float32)


_UE4M3_HALF = _ue4m3_half_table()


def _fp32_to_ue4m3(x: np.ndarray) -> np.ndarray:
    """Encode non-negative float32 as UE4M3 bytes, exactly as ggml_fp32_to_ue4m3.

    Normal range: truncate to 3 mantissa bits and round half up on the next bit; below 2**-6:
    subnormal ``round(x * 512)`` capped at 7; saturates at 0x7E (= 448, the largest finite value;
    0x7F is NaN); non-positive input gives 0.
    """
    x = np.minimum(np.asarray(x, dtype=np.float32), np.float32(448))
    bits = x.view(np.uint32)
    exp = ((bits >> 23) & 0xFF).astype(np.int32) - 127 + 7
    man = ((bits >> 20) & 0x7).astype(np.int32) + ((bits >> 19) & 0x1).astype(np.int32)
    carry = man > 7
    exp_r = np.where(carry, exp + 1, exp)
    man_r = np.where(carry, 0, man)
    normal = np.where(exp_r >= 15, 0x7E, (exp_r << 3) | man_r)
    subnormal = np.clip((x * np.float32(512) + np.float32(0.5)).astype(np.int32), 0, 7)
    code = np.where(exp <= 0, subnormal, np.where(exp >= 15, 0x7E, normal))
    return np.where(x > 0, code, 0).astype(np.uint8)


class NVFP4(_BlockQuantType, ggml_type=GGMLQuantizationType.NVFP4):
    """NVIDIA FP4: blocks of 64 = 4 x 16 E2M1 values, one UE4M3 scale per 16 (4.5 bits/weight).

    Layout (36 bytes): 4 UE4M3 scale bytes, then 4 x 8 code bytes; byte j of sub-block s holds value
    j in the low nibble and value j + 8 in the high nibble. ggml (and gguf-py) decode a scale byte
    to *half* its UE4M3 value and use doubled E2M1 codes, so the product is the true value; we
    quantize against the same decoded scales, which keeps the round trip consistent.

    ``quantize`` / ``dequantize`` here handle the raw blocks only (tensor scale 1). Real weights
    need the per-tensor scale from :meth:`tensor_scale`; use :func:`quantize_tensor` and
    :func:`dequantize_tensor`, which apply it.
    """

    # Largest magnitude representable with unit tensor scale: E2M1 max (6) x UE4M3 max (448).
    MAX_REPRESENTABLE: ClassVar[float] = 6.0 * 448.0

    @classmethod
    def tensor_scale(cls, x: np.ndarray) -> float:
        """Per-tensor scale mapping max |x| onto the largest representable value (1.0 for all zeros).

        Returned as a float32-representable Python float, since it is stored as an F32 tensor.
        """
        amax = np.float32(np.max(np.abs(x))) if np.size(x) else np.float32(0)
        if not np.isfinite(amax):
            raise ValueError("NVFP4: input contains non-finite values (NaN or Inf)")
        if amax == 0:
            return 1.0
        scale = np.float32(amax / np.float32(cls.MAX_REPRESENTABLE))
        if scale == 0:  # amax so small that amax / 2688 underflows float32
            return 1.0
        return float(scale)

    @classmethod
    def _quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # Port of quantize_row_nvfp4_ref: per 16 values, scale = UE4M3(amax / 6), then each value
        # takes the nearest code (first code on ties, as ggml's best_index_mxfp4).
        nb = blocks.shape[0]
        x = blocks.reshape(nb, 4, 16)
        amax = np.abs(x).max(axis=-1)
        ue = _fp32_to_ue4m3(amax / np.float32(6))
        d = _UE4M3_HALF[ue]
        err = np.abs(_KVALUES_FP4 * d[..., None, None] - x[..., None])
        codes = err.argmin(axis=-1).astype(np.uint8)
        qs = codes[..., :8] | (codes[..., 8:] << 4)
        return np.concatenate([ue, qs.reshape(nb, 32)], axis=1)


# ----------------------------------------------------------------------------------------------
# Module-level API
# ----------------------------------------------------------------------------------------------


def get_quant_type(ggml_type: TypeLike) -> type[QuantType]:
    """The :class:`QuantType` subclass for a GGML type given as enum, int id or name (e.g. ``"Q4_K"``)."""
    try:
        if isinstance(ggml_type, str):
            key = GGMLQuantizationType[ggml_type.upper()]
        else:
            key = GGMLQuantizationType(ggml_type)
        return QUANT_TYPES[key]
    except (KeyError, ValueError):
        supported = ", ".join(t.name for t in QUANT_TYPES)
        raise ValueError(f"unknown or unsupported ggml type {ggml_type!r} (supported: {supported})") from None


def row_bytes(ggml_type: TypeLike, n_elements: int) -> int:
    """Bytes needed to store ``n_elements`` values (a multiple of the block size) of ``ggml_type``."""
    qt = get_quant_type(ggml_type)
    if n_elements < 0 or n_elements % qt.block_size:
        name, block = qt.ggml_type.name, qt.block_size
        raise ValueError(f"{name}: {n_elements} elements is not a multiple of the block size {block}")
    return n_elements // qt.block_size * qt.type_size


def can_quantize(ggml_type: TypeLike, row_width: int) -> bool:
    """Whether dgrun can write rows of ``row_width`` values as ``ggml_type``.

    True when it has a quantizer for the type (not a :class:`DecodeOnlyType`) and the width is a multiple of
    the block size.
    """
    qt = get_quant_type(ggml_type)
    return not issubclass(qt, DecodeOnlyType) and row_width > 0 and row_width % qt.block_size == 0


def quantize_tensor(x: np.ndarray, ggml_type: TypeLike) -> tuple[np.ndarray, float | None]:
    """Quantize a tensor: ``(raw uint8 [..., row_bytes], tensor_scale)``.

    ``tensor_scale`` is a float for NVFP4 (to be stored as ``<name>.scale``) and ``None`` otherwise.
    """
    qt = get_quant_type(ggml_type)
    if qt is not NVFP4:
        return qt.quantize(x), None
    _check_float_input(qt, x)  # clear errors for bad shapes / NaN before touching the values
    scale = NVFP4.tensor_scale(x)
    return NVFP4.quantize(np.asarray(x, dtype=np.float32) / np.float32(scale)), scale


def dequantize_tensor(raw: np.ndarray, ggml_type: TypeLike, tensor_scale: float | None = None) -> np.ndarray:
    """Decode raw uint8 ``[..., n_bytes]`` to float32 ``[..., n_elements]``.

    NVFP4 requires the ``tensor_scale`` returned by :func:`quantize_tensor` (pass 1.0 for data that
    has none); every other type requires ``None``, so a scale paired with the wrong tensor is caught.
    """
    qt = get_quant_type(ggml_type)
    if qt is not NVFP4:
        if tensor_scale is not None:
            raise ValueError(f"{qt.ggml_type.name}: tensor_scale is only used by NVFP4, got {tensor_scale!r}")
        return qt.dequantize(raw)
    if tensor_scale is None:
        raise ValueError("NVFP4: dequantize_tensor needs the tensor_scale (the '<name>.scale' tensor)")
    scale = np.float32(tensor_scale)
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"NVFP4: tensor_scale must be finite and > 0, got {tensor_scale!r}")
    return NVFP4.dequantize(raw) * scale


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _check_float_input(qt: type[QuantType], x: np.ndarray) -> np.ndarray:
    """Validate ``x`` and return it as C-contiguous float32 rows ``[R, n]``."""
    name = qt.ggml_type.name
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise ValueError(f"{name}: cannot quantize a 0-d array; need at least one dimension")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    n = arr.shape[-1]
    if n % qt.block_size:
        raise ValueError(f"{name}: last dimension {n} is not a multiple of the block size {qt.block_size}")
    rows = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1, n)
    if not np.isfinite(rows).all():
        raise ValueError(f"{name}: input contains non-finite values (NaN or Inf)")
    return rows


def _check_raw_input(qt: type[QuantType], raw: np.ndarray) -> np.ndarray:
    """Validate raw block bytes and return them as C-contiguous uint8 rows ``[R, n_bytes]``."""
    name = qt.ggml_type.name
    arr = np.asarray(raw)
    if arr.dtype != np.uint8:
        raise ValueError(f"{name}: raw data must be uint8 bytes, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise ValueError(f"{name}: raw data must have at least one dimension")
    nbytes = arr.shape[-1]
    if nbytes % qt.type_size:
        size = qt.type_size
        raise ValueError(f"{name}: raw last dimension {nbytes} is not a multiple of the block bytes {size}")
    return np.ascontiguousarray(arr).reshape(-1, nbytes)
