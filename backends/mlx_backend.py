"""The MLX backend: the op interface on `mlx.core` arrays (Apple silicon GPU; `mlx[cpu]` elsewhere).

Weights are repacked once at load into MLX's quantized layouts, losslessly: every ggml block decodes to
exactly the value MLX's `dequantize` gives for the repacked codes, so the only differences from the numpy
reference are summation order inside matmuls (float32 compute throughout).

- Q8_0, Q4_0, Q5_0: affine 8/4/5-bit, group 32, scale d, bias -128·d / -8·d / -16·d (the zero point).
- Q5_1: affine 5-bit, group 32, scale d, bias m.
- Q4_K, Q5_K: affine 4/5-bit, group 32 (their 32-value sub-blocks): scale d·sc, bias -dmin·m.
- IQ4_NL, IQ4_XS: affine 8-bit, group 32: the code is the table value + 127 (0..240), scale d (IQ4_XS: d·(ls-32)),
  bias -127 times the scale; 8 bits for 4, but exact (float32 would be 32).
- IQ3_S: affine 4-bit, group 32: its signed grid magnitudes are the 16 odd numbers -15..15, so the code is
  (sign·magnitude + 15) / 2, scale 2·db, bias -15·db.
- MXFP4: MLX `mxfp4` (group 32, the same E8M0 byte, the same E2M1 codes once ggml's nibble order is undone).
- NVFP4: MLX `nvfp4` (group 16, the same UE4M3 byte: ggml's half-valued scale times its doubled codes is the
  plain E4M3 x E2M1 product); the per-tensor `<name>.scale` multiplies each result after the matmul. Needs
  mlx >= 0.30.3: before it (MLX commit 1eef1d1, "Metal/CPU nvfp4 and mxfp8") Metal had no nvfp4 kernels and
  the CPU build ran every non-affine mode as mxfp4 (mlx/backend/cpu/quantized.cpp in v0.30.1). The extra
  asks for 0.30.4, the first with `mx.device_info`.
- Q6_K and IQ2_S (16-value sub-blocks, below MLX's smallest group of 32; IQ2_S's magnitudes 8, 25, 43 are not
  evenly spaced either): dequantized to float32 at load, with a one-line notice on stderr saying how much memory
  that took.
- F32/F16/BF16 stay as stored. F16/BF16 are widened to float32 on every use (`DenseWeight.f32`), which keeps
  them exact (float32 activations times the file's values, as the reference computes) at a price in memory
  traffic: each use reads 2 bytes, writes 4 and the matmul reads those 4 again, 5x what a kernel reading
  the 16-bit values would move. For the released model in BF16 that is ~26 G weight values widened per
  decoder pass (all 128 experts of every layer, the 262,144-row table twice: soft embedding and output),
  ~260 GB of traffic against ~52 GB, plus ~3 GB of transient float32 experts per layer (on `mlx[cpu]`, at a
  decoder pass's 16 rows per expert: 1.2x (BF16) and 1.3x (F16) the F32 time). Running them as bf16
  matmuls instead would round the activations to bf16 too (~4e-3 relative per matmul), far outside the
  2e-5 parity bound. So F16/BF16 files are exact but slow here: on a Mac use `q8_0` or a `*_moe` preset,
  whose layouts MLX multiplies without widening.

How MLX's Metal kernels differ from the CPU build that the Linux tests run (checked against MLX's sources):
- Precision: on M5-class GPUs (macOS 26.2+), float32 matmul, quantized matmul, gather matmul and attention
  run at TF32-class precision unless MLX_ENABLE_TF32=0 (`env::enable_tf32()`, mlx/utils.h, default 1, read
  once at the first such op; MLX's docs/src/usage/precision.rst; measured ~7.7e-4 relative in MLX issue
  #3860, 40x the 2e-5 parity bound). This module sets it to 0 at import unless the user has set it.
- Quantized matrix-vector products (`qmv`, `gather_qmv`: few rows, e.g. a short prompt's encoder pass, or
  few tokens per expert) compute each thread's 8-32 values of a group as scale·Σ(x·q) + bias·Σx (`qdot`,
  mlx/backend/metal/kernels/quantized.h), never forming the weight scale·q + bias that the CPU build
  (mlx/backend/cpu/quantized.cpp) and Metal's matrix-matrix kernels form: another rounding, not just another
  order. For the affine layouts the bias term is large (-128·d for Q8_0) and partly cancels. Known: a float32
  numpy emulation of that formula on random Q8_0/Q4_0/Q5_0/Q4_K rows of 256 and 2816 values measures
  2e-7..5e-7 relative per matmul against float64, no worse than the dequantized form (3e-7..1e-6), so it fits
  the 2e-5 parity bound. Untested: the kernel itself, which only a Mac runs (the macOS CI job's parity tests
  cover it on whatever GPU the runner has). mxfp4/nvfp4 have no bias term: order differences only.
- Sums are parallel on Metal (SIMD/tree reductions) and left to right on the CPU build, so the per-row
  entropies differ in their last bits between the two (as numpy's differ from torch's). The canvas-sized
  end of each step (the entropy-bound cut-off's cumulative sum, the mean entropy, acceptance, renoising)
  therefore runs on the host in `dgrun.sampler.finish_step`, the reference's own code, as the cpu backend
  does: given the same entropies it decides exactly as the reference.
- `mx.softmax` uses Metal's fast exp (mlx/backend/metal/kernels/softmax.h `softmax_exp`); `mx.exp` is
  `metal::precise::exp`. The router (whose top-k is a discrete choice) and the soft embedding therefore write
  exp(x - max) / sum as the reference does. Attention keeps `mx.softmax`: one kernel that holds one score
  matrix where the written-out form holds three (the scores stay alive until the last op that reads them),
  and its weights are continuous, so the fast exp's few-ulp error near each row's maximum lands inside the
  2e-5 bound (untested on Metal: the macOS job's parity tests are what would show otherwise).
- MLX's fused attention kernels do not take the full layers' head dim 512, and for the sliding layers' 256
  MLX routes more than 8 queries to its unfused ops anyway (`has_fused_kernel` / `use_fallback`,
  mlx/backend/metal/scaled_dot_product_attention.cpp). So attention is written unfused here, for memory:
  query chunks of `_ATTENTION_CHUNK` rows, each evaluated before the next is built (MLX would otherwise
  schedule every chunk of a long prompt together and hold all their scores at once).

Arrays stay lazy; each layer's MoE output is scheduled with `mx.async_eval`, so the graph never spans more
than a layer and the device works while Python builds the next one. The sampler's vocabulary-wide work runs
on the device, _ROW_BLOCK rows at a time (no canvas x vocab temporary besides the logits); only canvas-sized
arrays (and, with a non-default RNG, the probabilities) reach the host. The soft embedding gathers the few
embedding rows of a row whose mass sits on a few tokens (`numpy_backend.sparse_soft_embed_row`: exact to
float32), one small product per group of such rows, and multiplies the other rows densely.
On Apple silicon the weights are wired (kept resident) up to the GPU's recommended working set, and MLX's
buffer cache is emptied after every encoder pass, whose buffers (sized for the prompt) the decoder never
reuses.
"""

from __future__ import annotations

import math
import os
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from dgrun import quants, sampler
from dgrun.backends.numpy_backend import (
    FLOAT32_UNIT_ROUNDOFF,
    SPARSE_KEEP_LOGIT,
    SPARSE_MASS_MARGIN,
    SPARSE_MAX_KEPT,
)
from dgrun.format import GGUFFile
from dgrun.rng import DefaultRng, Rng

# Full float32 matmuls on M5-class GPUs (see the module notes). MLX reads the variable once, at the first
# matmul-family op the process runs, so this must happen before any: a process that ran one already keeps
# its setting. A user's own value (MLX_ENABLE_TF32=1 for speed) wins.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

Packed = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # (codes as uint32 words, scales, biases or None)

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_ATTENTION_CHUNK = 512  # query rows per attention call: bounds the [heads, chunk, keys] score matrix
_ROW_BLOCK = 32  # rows of a canvas x vocab array the sampler step and the soft embedding evaluate at a time
_REPACK_CHUNK_VALUES = 1 << 20  # values repacked at once: keeps the uint64 packing temporaries small


# -- repacking ggml blocks into MLX layouts --------------------------------------------------------------


def _blocks(raw: np.ndarray, qt: type[quants.QuantType]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Raw uint8 [..., row_bytes] as [n_blocks, type_size], plus the leading shape to restore."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.shape[-1] % qt.type_size:
        raise ValueError(f"{qt.ggml_type.name}: row of {raw.shape[-1]} bytes is not whole blocks")
    return raw.reshape(-1, qt.type_size), raw.shape[:-1]


def _pack(codes: np.ndarray, bits: int, lead: tuple[int, ...]) -> np.ndarray:
    """Pack `bits`-bit codes (uint8, values in row order) into MLX's uint32 words: a little-endian bit stream.

    Every 8 codes fill exactly `bits` bytes, so each group of 8 is assembled in one uint64 and its low bytes
    kept. Rows hold a multiple of 32 codes, hence whole uint32 words.
    """
    groups = codes.reshape(-1, 8).astype(np.uint64) << (np.arange(8, dtype=np.uint64) * np.uint64(bits))
    words = np.bitwise_or.reduce(groups, axis=-1)
    stream = words.astype("<u8")[:, None].view(np.uint8)[:, :bits]
    return np.ascontiguousarray(stream).reshape(-1).view("<u4").astype(np.uint32).reshape(*lead, -1)


def _fp16(b: np.ndarray) -> np.ndarray:
    """Two bytes per row as their fp16 value in float32 (exact)."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's split nibble order (byte j: value j low, value j + half high) as codes in value order."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def repack_q8_0(raw: np.ndarray) -> Packed:
    """Q8_0 → affine 8-bit, group 32: code q + 128, scale d, bias -128·d (so d·code + bias is d·q exactly)."""
    blocks, lead = _blocks(raw, quants.Q8_0)
    d = _fp16(blocks[:, :2])
    codes = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return _pack(codes, 8, lead), d.reshape(*lead, -1), (np.float32(-128) * d).reshape(*lead, -1)


def repack_q4_0(raw: np.ndarray) -> Packed:
    """Q4_0 → affine 4-bit, group 32: the stored nibble is the code, scale d, bias -8·d."""
    blocks, lead = _blocks(raw, quants.Q4_0)
    d = _fp16(blocks[:, :2])
    bias = np.float32(-8) * d
    return _pack(_nibbles(blocks[:, 2:]), 4, lead), d.reshape(*lead, -1), bias.reshape(*lead, -1)


def _five_bit_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1 codes: nibbles (ggml's split order) | fifth bit << 4, bit j of the u32 `qh` for value j."""
    bits = np.ascontiguousarray(qh).view("<u4")
    high = ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    return _nibbles(qs) | (high << 4)


def repack_q5_0(raw: np.ndarray) -> Packed:
    """Q5_0 → affine 5-bit, group 32: nibble | high bit << 4 is the code, scale d, bias -16·d."""
    blocks, lead = _blocks(raw, quants.Q5_0)
    d = _fp16(blocks[:, :2])
    codes = _five_bit_codes(blocks[:, 2:6], blocks[:, 6:])
    return _pack(codes, 5, lead), d.reshape(*lead, -1), (np.float32(-16) * d).reshape(*lead, -1)


def repack_q5_1(raw: np.ndarray) -> Packed:
    """Q5_1 → affine 5-bit, group 32: the 5-bit value is the code, scale d, bias m (d·q + m exactly as ggml)."""
    blocks, lead = _blocks(raw, quants.Q5_1)
    d, m = _fp16(blocks[:, :2]), _fp16(blocks[:, 2:4])
    codes = _five_bit_codes(blocks[:, 4:8], blocks[:, 8:])
    return _pack(codes, 5, lead), d.reshape(*lead, -1), m.reshape(*lead, -1)


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K per sub-block scale d·sc and bias -dmin·m [n, 8] from a block's first 16 bytes.

    d·sc and dmin·m are exact in float32 (11 + 6 significant bits), and so is scale·code (at most 5 more), so
    MLX's scale·code + bias rounds once, exactly where ggml's d·sc·q - dmin·m does.
    """
    d, dmin = _fp16(blocks[:, 0:2]), _fp16(blocks[:, 2:4])
    packed = blocks[:, 4:16].reshape(-1, 3, 4)
    lo, hi, extra = packed[:, 0], packed[:, 1], packed[:, 2]
    # 6-bit (scale, min) pairs: sub-blocks 0-3 in the low 6 bits of bytes 0-7; 4-7 split over bytes 8-11
    # (low 4 bits) and the spare top 2 bits of bytes 0-7 (ggml's get_scale_min_k4).
    sc = np.concatenate([lo & 0x3F, (extra & 0x0F) | ((lo >> 2) & 0x30)], axis=-1).astype(np.float32)
    m = np.concatenate([hi & 0x3F, (extra >> 4) | ((hi >> 2) & 0x30)], axis=-1).astype(np.float32)
    return d * sc, -(dmin * m)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """The 128 nibble bytes of Q4_K / Q5_K as [n, 8, 32] low 4 bits per sub-block: byte l of each 32-byte chunk
    c holds value l of sub-block 2c (low nibble) and of sub-block 2c + 1 (high)."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 8, 32)


def repack_q4_k(raw: np.ndarray) -> Packed:
    """Q4_K → affine 4-bit, group 32: each 32-value sub-block gets scale d·sc and bias -dmin·m."""
    blocks, lead = _blocks(raw, quants.Q4_K)
    scales, biases = _k_scales(blocks)
    return _pack(_k_nibbles(blocks[:, 16:]), 4, lead), scales.reshape(*lead, -1), biases.reshape(*lead, -1)


def repack_q5_k(raw: np.ndarray) -> Packed:
    """Q5_K → affine 5-bit, group 32: Q4_K's nibbles, each with its fifth bit (bit s of qh[l] for value l of
    sub-block s), scale d·sc and bias -dmin·m."""
    blocks, lead = _blocks(raw, quants.Q5_K)
    scales, biases = _k_scales(blocks)
    high = (blocks[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    codes = _k_nibbles(blocks[:, 48:]) | (high << 4)
    return _pack(codes, 5, lead), scales.reshape(*lead, -1), biases.reshape(*lead, -1)


# IQ4_NL's table values shifted to unsigned 8-bit codes: kvalue = code - 127.
_IQ4_CODES = (np.array(gguf_quants.IQ4_NL.kvalues, dtype=np.int16) + 127).astype(np.uint8)


def repack_iq4_nl(raw: np.ndarray) -> Packed:
    """IQ4_NL → affine 8-bit, group 32: code kvalue + 127, scale d, bias -127·d.

    d·code (11 + 8 significant bits) and 127·d are exact in float32, and so is their difference d·kvalue.
    """
    blocks, lead = _blocks(raw, quants.IQ4_NL)
    d = _fp16(blocks[:, :2])
    codes = _IQ4_CODES[_nibbles(blocks[:, 2:])]
    return _pack(codes, 8, lead), d.reshape(*lead, -1), (np.float32(-127) * d).reshape(*lead, -1)


def repack_iq4_xs(raw: np.ndarray) -> Packed:
    """IQ4_XS → affine 8-bit, group 32: code kvalue + 127, scale dl = d·(ls - 32), bias -127·dl.

    dl has at most 16 significant bits, so dl·code (at most 24) and 127·dl are exact, as is dl·kvalue.
    """
    blocks, lead = _blocks(raw, quants.IQ4_XS)
    d = _fp16(blocks[:, :2])
    sub = np.arange(8)
    scales_h = np.ascontiguousarray(blocks[:, 2:4]).view("<u2")  # 2 bits per 32 values
    low = (blocks[:, 4 + sub // 2] >> (4 * (sub % 2)).astype(np.uint8)) & 0x0F
    high = (scales_h >> (2 * sub).astype(np.uint16)) & 3
    dl = d * ((low | (high << 4)).astype(np.float32) - np.float32(32))
    codes = _IQ4_CODES[_nibbles(blocks[:, 8:].reshape(-1, 8, 16))]
    return _pack(codes, 8, lead), dl.reshape(*lead, -1), (np.float32(-127) * dl).reshape(*lead, -1)


def _iq3s_grid() -> np.ndarray:
    gguf_quants.IQ3_S.init_grid()
    return np.asarray(gguf_quants.IQ3_S.grid).reshape(512, 4).astype(np.int16)


_IQ3S_GRID = _iq3s_grid()


def repack_iq3_s(raw: np.ndarray) -> Packed:
    """IQ3_S → affine 4-bit, group 32: a signed magnitude v in {-15, -13, ..., 15} is code (v + 15) / 2, scale
    2·db, bias -15·db with db = d·(1 + 2s) per 32 values: 2·db·code - 15·db = db·v, every step exact."""
    blocks, lead = _blocks(raw, quants.IQ3_S)
    d = _fp16(blocks[:, :2])
    qh = (blocks[:, 66:74, None] >> np.arange(8, dtype=np.uint8)) & 1  # bit g % 8 of qh[g / 8], group g
    index = blocks[:, 2:66].astype(np.int32) | (qh.reshape(-1, 64).astype(np.int32) << 8)
    negative = np.unpackbits(blocks[:, 74:106], axis=-1, bitorder="little")  # bit j % 8 of signs[j / 8]
    signed = _IQ3S_GRID[index].reshape(-1, 256) * (1 - 2 * negative.astype(np.int16))
    codes = ((signed + 15) // 2).astype(np.uint8)
    s = (blocks[:, 106:110, None] >> np.array([0, 4], dtype=np.uint8)) & 0x0F
    db = d * (1 + 2 * s.reshape(-1, 8)).astype(np.float32)
    return _pack(codes, 4, lead), (np.float32(2) * db).reshape(*lead, -1), (np.float32(-15) * db).reshape(*lead, -1)


def repack_mxfp4(raw: np.ndarray) -> Packed:
    """MXFP4 → MLX `mxfp4`, group 32: the E8M0 byte as is; codes out of ggml's split nibble order.

    ggml decodes the scale at half value and doubles the E2M1 table, so the product is the plain OCP value
    MLX computes. E8M0 255 (never written by a quantizer) decodes to a finite value in ggml but NaN/inf in
    MLX, so it raises ValueError.
    """
    blocks, lead = _blocks(raw, quants.MXFP4)
    if (blocks[:, 0] == 0xFF).any():
        raise ValueError("MXFP4: scale byte 0xFF has no MLX equivalent")
    return _pack(_nibbles(blocks[:, 1:]), 4, lead), blocks[:, :1].reshape(*lead, -1), None


def repack_nvfp4(raw: np.ndarray) -> Packed:
    """NVFP4 → MLX `nvfp4`, group 16: the UE4M3 byte as E4M3; codes out of ggml's split nibble order.

    The per-tensor scale is not part of the blocks: multiply it in after dequantizing or after the matmul.
    ggml ignores a scale byte's top bit (masked here) and decodes 0x7F as zero (MLX: NaN, so it becomes 0x00);
    0xFF decodes to 480 in ggml, beyond E4M3, so it raises ValueError (no quantizer writes either byte).
    """
    blocks, lead = _blocks(raw, quants.NVFP4)
    scales = blocks[:, :4]
    if (scales == 0xFF).any():
        raise ValueError("NVFP4: scale byte 0xFF has no MLX equivalent")
    scales = scales & 0x7F
    scales = np.where(scales == 0x7F, np.uint8(0), scales)
    codes = _nibbles(blocks[:, 4:].reshape(-1, 4, 8))
    return _pack(codes, 4, lead), scales.reshape(*lead, -1), None


@dataclass(frozen=True)
class Layout:
    """How one ggml type maps onto MLX's quantized matmuls."""

    repack: Callable[[np.ndarray], Packed]
    mode: str
    group_size: int
    bits: int


LAYOUTS: dict[T, Layout] = {
    T.Q8_0: Layout(repack_q8_0, "affine", 32, 8),
    T.Q4_0: Layout(repack_q4_0, "affine", 32, 4),
    T.Q5_0: Layout(repack_q5_0, "affine", 32, 5),
    T.Q5_1: Layout(repack_q5_1, "affine", 32, 5),
    T.Q4_K: Layout(repack_q4_k, "affine", 32, 4),
    T.Q5_K: Layout(repack_q5_k, "affine", 32, 5),
    T.IQ4_NL: Layout(repack_iq4_nl, "affine", 32, 8),
    T.IQ4_XS: Layout(repack_iq4_xs, "affine", 32, 8),
    T.IQ3_S: Layout(repack_iq3_s, "affine", 32, 4),
    T.MXFP4: Layout(repack_mxfp4, "mxfp4", 32, 4),
    T.NVFP4: Layout(repack_nvfp4, "nvfp4", 16, 4),
}


# -- weights on the device ----------------------------------------------------------------------------


@dataclass
class DenseWeight:
    """A tensor held whole: F32/F16/BF16 as stored, or a type without an MLX layout dequantized to float32."""

    array: mx.array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def f32(self, index: mx.array | None = None) -> mx.array:
        """The tensor (or its rows at `index`) as float32: F16/BF16 widen lazily where used."""
        array = self.array if index is None else self.array[index]
        return array if array.dtype == mx.float32 else array.astype(mx.float32)

    @cached_property
    def max_row_norm(self) -> float:
        """As `numpy_backend.Weight.max_row_norm` (see `_max_row_norm`)."""
        return _max_row_norm(self.shape[0], lambda rows: self.f32(rows))


@dataclass
class QuantWeight:
    """A tensor in an MLX quantized layout: uint32 codes [..., in·bits/32], per-group scales (and biases)."""

    packed: mx.array
    scales: mx.array
    biases: mx.array | None
    layout: Layout
    shape: tuple[int, ...]
    tensor_scale: float | None = None  # NVFP4's per-tensor scale, applied to every result

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.packed, self.scales, self.biases) if a is not None)

    def kwargs(self) -> dict[str, Any]:  # Any: mypy cannot match a mixed dict to the keyword parameters
        return {"group_size": self.layout.group_size, "bits": self.layout.bits, "mode": self.layout.mode}

    def rescale(self, y: mx.array) -> mx.array:
        return y if self.tensor_scale is None else y * self.tensor_scale

    def rows(self, index: mx.array) -> mx.array:
        """Rows of a 2-D tensor as float32, dequantizing only those."""
        biases = None if self.biases is None else self.biases[index]
        out = mx.dequantize(self.packed[index], self.scales[index], biases, dtype=mx.float32, **self.kwargs())
        return self.rescale(out)

    @cached_property
    def max_row_norm(self) -> float:
        """As `numpy_backend.Weight.max_row_norm` (see `_max_row_norm`)."""
        return _max_row_norm(self.shape[0], self.rows)


Weight = DenseWeight | QuantWeight


def _max_row_norm(rows: int, decode: Callable[[mx.array], mx.array]) -> float:
    """The largest Euclidean norm of a row, decoded 4096 rows at a time. The device sums in float32 (relative
    error < 1e-6 for any row width here), so the result is taken 1e-5 larger: the bound it feeds stays a bound."""
    largest = 0.0
    for start in range(0, rows, 4096):
        block = decode(mx.arange(start, min(start + 4096, rows)))
        largest = max(largest, float(mx.sqrt((block * block).sum(axis=-1).max())))
    return largest * (1 + 1e-5)


def _repack_rows(raw: np.ndarray, layout: Layout) -> Packed:
    """`layout.repack` over a [..., row_bytes] tensor in row chunks, so temporaries stay small."""
    rows = raw.reshape(-1, raw.shape[-1])
    step = max(1, _REPACK_CHUNK_VALUES // (rows.shape[1] * 3))  # no layout packs more than 3 values a byte
    parts = [layout.repack(rows[i:i + step]) for i in range(0, rows.shape[0], step)]
    lead = raw.shape[:-1]
    packed, scales = (np.concatenate([p[k] for p in parts]).reshape(*lead, -1) for k in (0, 1))
    biases = None if parts[0][2] is None else np.concatenate([p[2] for p in parts]).reshape(*lead, -1)
    return packed, scales, biases


def _gelu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """gelu_tanh(gate) * up, the gated MLP's elementwise middle."""
    cube = gate * gate * gate  # not gate**3: a float power of a negative base is NaN on some devices
    return 0.5 * gate * (1.0 + mx.tanh(_SQRT_2_OVER_PI * (gate + 0.044715 * cube))) * up


def _softcap(x: mx.array, cap: mx.array) -> mx.array:
    return mx.tanh(x / cap) * cap


def _rope(x: mx.array, positions: mx.array, inv_freq: mx.array) -> mx.array:
    freqs = positions[:, None] * inv_freq[None, :]
    emb = mx.concatenate([freqs, freqs], axis=-1)
    cos, sin = mx.cos(emb)[:, None, :], mx.sin(emb)[:, None, :]
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _step_core(logits: mx.array, temp: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """Temperature, softmax, argmax and per-row entropy (as `dgrun.sampler`): processed, probs, argmax, H."""
    processed = logits / temp
    shifted = processed - processed.max(axis=-1, keepdims=True)
    exp = mx.exp(shifted)
    total = exp.sum(axis=-1, keepdims=True)
    logp = shifted - mx.log(total)
    entropy = -(mx.exp(logp) * logp).sum(axis=-1)
    return processed, exp / total, mx.argmax(processed, axis=-1), entropy


def _inverse_cdf(probs: mx.array, u: mx.array) -> mx.array:
    """DefaultRng.categorical on the device: count cdf <= u·total, with a float32 instead of a float64 cdf.

    The two can disagree only where u·total falls within float32 rounding of a cdf step (~1e-7 relative),
    the same size as the float32 differences between backends' probabilities themselves. The result is
    capped at the last non-zero probability, which the float64 cdf guarantees and float32 might not.
    """
    cdf = mx.cumsum(probs, axis=-1)
    index = (cdf <= (u * cdf[:, -1])[:, None]).sum(axis=-1)
    positive = probs > 0
    last = probs.shape[-1] - 1 - mx.argmax(positive[:, ::-1], axis=-1)
    return mx.minimum(index, last)


def _sparse_split(x: mx.array, keep_logit: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """Per row: max, sum of exp(x - max), the tokens kept by the sparse soft embedding (x - max >= -keep_logit:
    their count) and the softmax mass of the others (numpy_backend.sparse_soft_embed_row)."""
    m = x.max(axis=-1, keepdims=True)
    shifted = x - m
    exp = mx.exp(shifted)
    total = exp.sum(axis=-1, keepdims=True)
    keep = shifted >= -keep_logit
    return m, total, keep.sum(axis=-1), mx.where(keep, 0.0, exp).sum(axis=-1) / total[:, 0]


def _exp_shifted(x: mx.array) -> tuple[mx.array, mx.array]:
    """(exp(x - max), its sum) over the last axis: softmax's parts with `mx.exp`, which is precise on Metal where
    `mx.softmax`'s exp is not (see the module notes)."""
    exp = mx.exp(x - x.max(axis=-1, keepdims=True))
    return exp, exp.sum(axis=-1, keepdims=True)


def _wire_weights(weight_bytes: int) -> None:
    """On Apple silicon, keep up to the GPU's recommended working set wired (resident), as mlx-lm does
    (mlx_lm/generate.py `wired_limit`, mlx_lm/server.py), so the weights are not paged out between passes.

    Process-wide and kept after the model is closed, as mlx-lm's server keeps it; a larger limit already set
    is left alone. A no-op without Metal (Linux, `mlx[cpu]`), where `device_info` has no working-set size.
    """
    if not mx.metal.is_available():
        return
    limit = int(mx.device_info()["max_recommended_working_set_size"])
    if weight_bytes > 0.9 * limit:
        print(f"dgrun: the weights take {weight_bytes / 2**30:.1f} GiB of this GPU's recommended working set of "
              f"{limit / 2**30:.1f} GiB: expect paging (a smaller preset, e.g. mxfp4_moe, would fit)",
              file=sys.stderr)
    previous = mx.set_wired_limit(limit)
    if previous > limit:
        mx.set_wired_limit(previous)


def _attend(q: mx.array, kt: mx.array, v: mx.array, visible: mx.array | None) -> mx.array:
    """softmax(q k^T) v for one chunk of query rows, hidden keys at -inf; a function of its own so that no name
    keeps the chunk's scores alive once the chunk is evaluated."""
    scores = q @ kt
    if visible is not None:
        scores = mx.where(visible, scores, -mx.inf)
    return mx.softmax(scores, axis=-1) @ v


class MlxBackend:
    """The op interface (see `dgrun.backends`) on mlx.core arrays: float32 compute, weights in MLX layouts."""

    name = "mlx"
    supported_types = frozenset(quants.QUANT_TYPES)

    def __init__(self) -> None:
        # Compiled once per backend; shapeless where the function is purely elementwise.
        self._gelu_mul = mx.compile(_gelu_mul, shapeless=True)
        self._softcap = mx.compile(_softcap, shapeless=True)
        self._rope = mx.compile(_rope)
        self._step_core = mx.compile(_step_core)
        self._inverse_cdf = mx.compile(_inverse_cdf)
        self._exp_shifted = mx.compile(_exp_shifted)
        self._sparse_split = mx.compile(_sparse_split)
        # The last step's processed logits (weakly) and what they are made of (logits, temperature): the soft
        # embedding reads them a block of rows at a time, so they are never evaluated whole.
        self._processed: tuple[weakref.ref[mx.array], mx.array, mx.array] | None = None
        self.soft_embed_paths: np.ndarray | None = None
        self._encoder_ran = False  # an encoder pass ran since the decoder's last (see `_after_encoder`)

    def load_weights(self, gguf: GGUFFile, names: list[str]) -> dict[str, Weight]:
        """Every named tensor on the device: repacked into an MLX layout, or whole (see the module notes)."""
        weights: dict[str, Weight] = {}
        dequantized: dict[str, int] = {}  # type name -> float32 bytes made
        for name in names:
            info = gguf.tensors[name]
            scale_name = f"{name}.scale"
            scale = None
            if scale_name in gguf.tensors and scale_name not in names:
                scale = float(gguf.array(scale_name).reshape(-1)[0])
            weights[name] = w = self.weight(gguf.raw(name), info.ggml_type, info.shape, scale)
            if isinstance(w, DenseWeight) and info.ggml_type not in (T.F32, T.F16, T.BF16):
                kind = info.ggml_type.name
                dequantized[kind] = dequantized.get(kind, 0) + w.nbytes
        if dequantized:
            what = ", ".join(f"{kind} ({size / 2**20:.1f} MiB)" for kind, size in sorted(dequantized.items()))
            print(f"dgrun: mlx has no lossless layout for {what}: dequantized to float32 at load",
                  file=sys.stderr)
        # Evaluated now (BF16 views are lazy): MLX streams are per thread, and a lazy array made here could not be
        # evaluated by another thread (a Scheduler's worker).
        mx.eval([a for w in weights.values() for a in ((w.array,) if isinstance(w, DenseWeight) else
                                                      (w.packed, w.scales, w.biases)) if a is not None])
        _wire_weights(sum(w.nbytes for w in weights.values()))
        return weights

    def weight(self, raw: np.ndarray, ggml_type: int, shape: tuple[int, ...],
               tensor_scale: float | None = None) -> Weight:
        """A tensor from its stored bytes (uint8): F32/F16/BF16 whole as stored, a block type repacked into its MLX
        layout, else dequantized to float32."""
        ggml_type = T(ggml_type)
        if ggml_type in (T.F32, T.F16, T.BF16):
            dtype = {T.F32: "<f4", T.F16: "<f2", T.BF16: "<u2"}[ggml_type]
            array = mx.array(np.ascontiguousarray(raw.reshape(-1).view(dtype).reshape(shape)))
            return DenseWeight(array.view(mx.bfloat16) if ggml_type == T.BF16 else array)  # BF16: uint16 bits
        raw = raw.reshape(*shape[:-1], quants.row_bytes(ggml_type, shape[-1]))
        # 1-D tensors (norms and scales, F32 in every preset) are read whole by `vector`: never packed.
        layout = LAYOUTS.get(ggml_type) if len(shape) > 1 else None
        if layout is not None:
            try:
                packed, scales, biases = _repack_rows(raw, layout)
            except ValueError:  # a scale byte MLX cannot express: fall through to float32
                pass
            else:
                return QuantWeight(mx.array(packed), mx.array(scales), None if biases is None else mx.array(biases),
                                   layout, tuple(shape), tensor_scale)
        return DenseWeight(mx.array(quants.dequantize_tensor(raw, ggml_type, tensor_scale).reshape(shape)))

    # -- elementwise and normalisation --------------------------------------------------------------

    def asarray(self, x: np.ndarray) -> mx.array:
        return mx.array(np.asarray(x, dtype=np.float32))

    def to_numpy(self, x: mx.array | np.ndarray) -> np.ndarray:
        return np.array(x)

    def vector(self, w: DenseWeight) -> mx.array:
        """A small 1-D tensor (norm weight, scale) as float32 (the loader keeps 1-D tensors dense)."""
        out = w.f32().reshape(-1)
        mx.eval(out)  # kept for the model's life: usable from any thread (see load_weights)
        return out

    def rms_norm(self, x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
        return mx.fast.rms_norm(x, weight, eps)

    def softcap(self, x: mx.array, cap: float) -> mx.array:
        return self._softcap(x, mx.array(cap, dtype=mx.float32))

    def concat(self, *arrays: mx.array) -> mx.array:
        """The arrays one after another along the first axis (a single array is returned as is)."""
        return arrays[0] if len(arrays) == 1 else mx.concatenate(list(arrays), axis=0)

    # -- embeddings and matmuls -----------------------------------------------------------------------

    def embed(self, table: Weight, ids: np.ndarray, scale: float) -> mx.array:
        """Rows of the table, dequantizing only the gathered rows, times `scale`."""
        index = mx.array(np.asarray(ids, dtype=np.int32))
        if isinstance(table, DenseWeight):
            return table.f32(index) * scale
        biases = None if table.biases is None else table.biases[index]
        rows = mx.dequantize(table.packed[index], table.scales[index], biases, dtype=mx.float32,
                             **table.kwargs())
        return table.rescale(rows) * scale

    def soft_embed(self, logits: mx.array | np.ndarray, table: Weight, scale: float) -> mx.array:
        """softmax(logits) @ table * scale: the self-conditioning soft embedding ([n, V] @ [V, H]), _ROW_BLOCK rows
        at a time (no canvas x vocab temporary lives whole). A row whose mass sits on a few tokens gathers just
        their embedding rows, exactly as `numpy_backend.sparse_soft_embed_row` decides; the others take the
        product exp(l - max) @ table / sum (normalised after the matmul: float32 rounding away from the reference's
        divide-first). `soft_embed_paths`: per row, the tokens gathered (-1: the dense product).
        """
        last = self._processed
        if last is not None and last[0]() is logits:
            base, temp = last[1], last[2]  # the step's processed logits, made a block at a time from the logits
        else:
            base, temp = (mx.array(logits) if isinstance(logits, np.ndarray) else logits), None
        blocks, paths = [], []
        for start in range(0, base.shape[0], _ROW_BLOCK):
            x = base[start:start + _ROW_BLOCK]
            x = x if temp is None else x / temp
            out, path = self._soft_embed_block(x, table, scale)
            mx.eval(out)
            blocks.append(out)
            paths.append(path)
        self.soft_embed_paths = np.concatenate(paths)
        return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks)

    def _soft_embed_block(self, x: mx.array, table: Weight, scale: float) -> tuple[mx.array, np.ndarray]:
        m, total, kept_n, mass = self._sparse_split(x, mx.array(SPARSE_KEEP_LOGIT))
        mx.eval(m, total, kept_n, mass)
        kept, dropped = np.array(kept_n).astype(np.int64), np.array(mass).astype(np.float64)
        paths = np.full(x.shape[0], -1, dtype=np.int64)
        parts: list[tuple[np.ndarray, mx.array]] = []  # (rows, their soft embedding)
        candidates = np.flatnonzero(kept <= SPARSE_MAX_KEPT)
        # Candidate rows in groups of at most 4096 gathered tokens: a group's embedding rows stay small.
        groups, group, tokens = [], [], 0
        for row in candidates:
            if group and tokens + kept[row] > 4096:
                groups.append(group)
                group, tokens = [], 0
            group.append(row)
            tokens += kept[row]
        groups += [group] if group else []
        bound = float(scale) * table.max_row_norm
        rel_tol = 0.5 * FLOAT32_UNIT_ROUNDOFF / SPARSE_MASS_MARGIN
        for rows in map(np.array, groups):
            y, norm = self._sparse_rows(x, rows, m, total, int(kept[rows].max()), table, scale)
            accept = dropped[rows] * bound <= rel_tol * norm
            paths[rows[accept]] = kept[rows[accept]]
            if accept.any():
                parts.append((rows[accept], y[mx.array(np.flatnonzero(accept))]))
        dense = np.flatnonzero(paths < 0)
        if dense.size:
            index = mx.array(dense)
            exp = mx.exp(x[index] - m[index])
            parts.append((dense, self._matmul(exp, table, transpose=False) / total[index] * scale))
        order = np.concatenate([rows for rows, _ in parts])
        stacked = mx.concatenate([y for _, y in parts]) if len(parts) > 1 else parts[0][1]
        return stacked[mx.array(np.argsort(order))], paths

    def _sparse_rows(self, x: mx.array, rows: np.ndarray, m: mx.array, total: mx.array, top: int, table: Weight,
                     scale: float) -> tuple[mx.array, np.ndarray]:
        """(scale * sum over each row's kept tokens of p_j E_j, its norms) for `rows` of x: the `top` largest logits
        of each hold its kept tokens, which are gathered once for the group as one small product."""
        index = mx.array(rows)
        xr, mr = x[index], m[index]
        top_ids = mx.argpartition(-xr, top - 1, axis=-1)[:, :top]
        values = mx.take_along_axis(xr, top_ids, axis=-1)
        probs = mx.exp(values - mr) / total[index]
        keep = (values - mr) >= -SPARSE_KEEP_LOGIT
        mx.eval(top_ids, probs, keep)
        ids, p, kept = np.array(top_ids), np.array(probs), np.array(keep)
        union = np.unique(ids[kept])
        weights = np.zeros((len(rows), len(union)), dtype=np.float32)
        row_of = np.repeat(np.arange(len(rows)), top).reshape(ids.shape)
        weights[row_of[kept], np.searchsorted(union, ids[kept])] = p[kept]
        table_rows = table.f32(mx.array(union)) if isinstance(table, DenseWeight) else table.rows(mx.array(union))
        y = (mx.array(weights) @ table_rows) * scale
        norm = mx.sqrt((y * y).sum(axis=-1))
        mx.eval(y, norm)
        return y, np.array(norm).astype(np.float64)

    def linear(self, x: mx.array, w: Weight) -> mx.array:
        """x @ W^T for a [out, in] weight."""
        return self._matmul(x, w, transpose=True)

    def _matmul(self, x: mx.array, w: Weight, transpose: bool) -> mx.array:
        if isinstance(w, QuantWeight):
            return w.rescale(mx.quantized_matmul(x, w.packed, w.scales, w.biases, transpose=transpose,
                                                 **w.kwargs()))
        dense = w.f32()
        return x @ (dense.T if transpose else dense)

    def logits(self, x: mx.array, w: Weight, cap: float) -> mx.array:
        """softcap(x @ W^T, cap): the decoder's output logits."""
        return self.softcap(self.linear(x, w), cap)

    def gelu_mul(self, gate: mx.array, up: mx.array) -> mx.array:
        """gelu_tanh(gate) * up: the gated MLP's middle."""
        return self._gelu_mul(gate, up)

    def gated_mlp(self, x: mx.array, gate: Weight, up: Weight, down: Weight) -> mx.array:
        return self.linear(self.gelu_mul(self.linear(x, gate), self.linear(x, up)), down)

    # -- positions and attention ----------------------------------------------------------------------

    def rope(self, x: mx.array, positions: np.ndarray, inv_freq: mx.array) -> mx.array:
        """Rotate-half RoPE on [n, heads, head_dim]; zero frequencies (proportional RoPE) pass through."""
        return self._rope(x, mx.array(np.asarray(positions, dtype=np.float32)), inv_freq)

    def attention(
        self,
        q: mx.array,
        k: mx.array,
        v: mx.array,
        q_pos: np.ndarray,
        k_pos: np.ndarray,
        causal: bool,
        window: int | None,
    ) -> mx.array:
        """Softmax(q k^T) v with scaling 1.0, grouped KV heads and the reference's position masks.

        q [n, Hq, d], k/v [m, Hkv, d]. A key is visible when (not causal or k_pos <= q_pos) and
        (window is None or k_pos > q_pos - window). Unfused (see the module notes): per chunk of query rows,
        scores [Hkv, group, rows, m] (query head h reads KV head h // group, as the reference's repeat does),
        -inf where hidden, softmax, times v. With more rows than one chunk, each chunk is evaluated before the
        next is built, so only one chunk's scores are ever alive; one chunk (every decoder pass) stays lazy.
        """
        if causal:
            self._encoder_ran = True
        elif self._encoder_ran:
            self._after_encoder(k, v)
        n, heads, d = q.shape
        kv_heads = k.shape[1]
        qh = q.transpose(1, 0, 2).reshape(kv_heads, heads // kv_heads, n, d)
        kt = k.transpose(1, 2, 0)[:, None]  # [Hkv, 1, d, m]: broadcast over the group
        vh = v.transpose(1, 0, 2)[:, None]  # [Hkv, 1, m, d_v]
        kp = mx.array(np.asarray(k_pos, dtype=np.int32))[None, :]
        chunks = []
        for start in range(0, n, _ATTENTION_CHUNK):
            stop = min(start + _ATTENTION_CHUNK, n)
            visible = None
            if causal or window is not None:
                qp = mx.array(np.asarray(q_pos[start:stop], dtype=np.int32))[:, None]
                visible = kp <= qp if causal else mx.array(True)
                if window is not None:
                    visible = visible & (kp > qp - window)
            chunks.append(_attend(qh[:, :, start:stop], kt, vh, visible))
            if n > _ATTENTION_CHUNK:
                mx.eval(chunks[-1])
        out = chunks[0] if len(chunks) == 1 else mx.concatenate(chunks, axis=2)
        return out.reshape(heads, n, -1).transpose(1, 0, 2)

    def _after_encoder(self, k: mx.array, v: mx.array) -> None:
        """The decoder's first attention after an encoder pass: let the encoder finish, then empty MLX's cache.

        The encoder's buffers are sized for its rows (a long prompt's score matrices alone reach GBs, each chunk's
        of another size), and the decoder's canvas-sized passes never reuse them: MLX takes a cached buffer only
        of nearly the requested size (`reuse_from_cache`, mlx/backend/common/buffer_cache.h), and on Metal the
        cache may grow to 1.5x the recommended working set before it returns any (mlx/backend/metal/allocator.cpp).
        Evaluating k/v (the cache they read) first waits for the encoder's work, so its buffers are back in the
        cache when it is cleared. Once per encoder pass, i.e. per canvas: the decoder's own buffers are then
        allocated afresh once every (up to 48) steps, as mlx-lm clears every 256 tokens.
        """
        mx.eval(k, v)
        mx.clear_cache()
        self._encoder_ran = False

    # -- mixture of experts -----------------------------------------------------------------------------

    def route(
        self, x: mx.array, proj: Weight, scale: mx.array, per_expert_scale: mx.array, top_k: int, eps: float
    ) -> tuple[mx.array, mx.array]:
        """Router: unscaled RMSNorm, * scale * hidden^-0.5, softmax, top-k renormalised, per-expert scale."""
        h = self.rms_norm(x, None, eps) * scale * (x.shape[-1] ** -0.5)
        exp, total = self._exp_shifted(self.linear(h, proj))
        probs = exp / total
        index = mx.argsort(-probs, axis=-1)[:, :top_k]  # exact ties keep index order, as numpy's stable sort
        weights = mx.take_along_axis(probs, index, axis=-1)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        return weights * per_expert_scale[index], index

    def experts(
        self, x: mx.array, weights: mx.array, index: mx.array, gate_up: Weight, down: Weight
    ) -> mx.array:
        """Sum over each token's experts of weight * down(gelu(gate(x)) * up(x)).

        The (token, slot) pairs are sorted by expert so each expert's rows are contiguous for the gathered
        matmuls; results are put back in slot order and summed per token.
        """
        n, top_k = index.shape
        flat = index.reshape(-1)
        order = mx.argsort(flat)
        experts = flat[order]
        rows = x[order // top_k][:, None, :]  # [n·k, 1, hidden]
        gu = self._gather_matmul(rows, gate_up, experts)
        gate, up = mx.split(gu, 2, axis=-1)
        y = self._gather_matmul(self._gelu_mul(gate, up), down, experts)[:, 0, :]
        y = y[mx.argsort(order)] * weights.reshape(-1)[:, None]
        out = y.reshape(n, top_k, -1).sum(axis=1)
        # The end of every layer's feed-forward: schedule it now so the lazy graph stays one layer deep.
        mx.async_eval(out)
        return out

    def _gather_matmul(self, rows: mx.array, w: Weight, experts: mx.array) -> mx.array:
        """rows[i] @ w[experts[i]]^T for sorted expert ids ([n, 1, in] → [n, 1, out])."""
        if isinstance(w, QuantWeight):
            return w.rescale(mx.gather_qmm(rows, w.packed, w.scales, w.biases, rhs_indices=experts,
                                           transpose=True, sorted_indices=True, **w.kwargs()))
        return mx.gather_mm(rows, w.f32().swapaxes(-1, -2), rhs_indices=experts, sorted_indices=True)

    # -- sampler -------------------------------------------------------------------------------------------

    def denoise_step(
        self, logits: mx.array | np.ndarray, canvas: np.ndarray, temp: float, entropy_bound: float, rng: Rng,
        clamp: np.ndarray | None = None,
    ) -> sampler.StepResult:
        """`dgrun.sampler.denoise_step`: the vocabulary-wide work on the device, the canvas-sized rest on the host.

        The device computes temperature, softmax, per-row entropy and argmax (and, for a plain `DefaultRng`, the
        categorical draw from its uniforms by a float32 inverse CDF, see `_inverse_cdf`; any other RNG gets the
        probabilities, a canvas x vocab copy). Entropies, argmax and draws (a few KiB) then go through
        `sampler.finish_step`, the reference's own acceptance, renoising, clamp and mean entropy, as the cpu
        backend does: Metal's parallel sums could otherwise flip an acceptance or the stop rule (module notes).
        Draws go through `rng` in the reference's order (categorical, then tokens). The device works _ROW_BLOCK
        rows at a time, and `processed_logits` (logits / temp) stays an unevaluated mx.array that the next pass's
        soft embedding reads a block at a time: the logits are the only canvas x vocab array a step keeps.
        """
        logits = mx.array(logits) if isinstance(logits, np.ndarray) else logits
        rows, vocab = logits.shape
        temp_array = mx.array(temp, dtype=mx.float32)
        native_draw = isinstance(rng, DefaultRng) and type(rng).categorical is DefaultRng.categorical
        uniforms = mx.array(rng.uniform(rows).astype(np.float32)) if native_draw else None
        probs_host = None if native_draw else np.empty((rows, vocab), dtype=np.float32)
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for start in range(0, rows, _ROW_BLOCK):  # a block of rows at a time: no canvas x vocab temporary
            stop = min(start + _ROW_BLOCK, rows)
            _, probs, argmax, entropy = self._step_core(logits[start:stop], temp_array)
            if uniforms is not None:
                sampled = self._inverse_cdf(probs, uniforms[start:stop])
                mx.eval(sampled, argmax, entropy)
                parts.append((np.array(sampled), np.array(argmax), np.array(entropy)))
            else:
                mx.eval(probs, argmax, entropy)
                probs_host[start:stop] = np.array(probs)  # type: ignore[index]
                parts.append((np.zeros(0, np.int64), np.array(argmax), np.array(entropy)))
        drawn = (np.concatenate([p[0] for p in parts]) if probs_host is None
                 else np.asarray(rng.categorical(probs_host)))
        argmax, entropy = np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
        # Never evaluated here: the soft embedding reads it a block of rows at a time (see `soft_embed`).
        processed = logits / temp_array
        self._processed = (weakref.ref(processed), logits, temp_array)
        return sampler.finish_step(processed, drawn, argmax, entropy, canvas, entropy_bound, rng, clamp)
