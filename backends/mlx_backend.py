"""The MLX backend: the op interface on `mlx.core` arrays (Apple silicon GPU; `mlx[cpu]` elsewhere).

Weights are repacked once at load into MLX's quantized layouts, losslessly: every ggml block decodes to
exactly the value MLX's `dequantize` gives for the repacked codes, so the only differences from the numpy
reference are summation order inside matmuls (float32 compute throughout).

- Q8_0, Q4_0, Q5_0: affine 8/4/5-bit, group 32, scale d, bias -128·d / -8·d / -16·d (the zero point).
- Q4_K: affine 4-bit, group 32 (its 32-value sub-blocks): scale d·sc, bias -dmin·m.
- MXFP4: MLX `mxfp4` (group 32, the same E8M0 byte, the same E2M1 codes once ggml's nibble order is undone).
- NVFP4: MLX `nvfp4` (group 16, the same UE4M3 byte: ggml's half-valued scale times its doubled codes is the
  plain E4M3 x E2M1 product); the per-tensor `<name>.scale` multiplies each result after the matmul.
- Q6_K (16-value sub-blocks, below MLX's smallest group of 32): dequantized to float32 at load, with a
  one-line notice on stderr. F32/F16/BF16 stay as stored and are widened to float32 where used.

Arrays stay lazy; each layer's MoE output is scheduled with `mx.async_eval`, so the graph never spans more
than a layer and the device works while Python builds the next one. The sampler step runs on the device too:
only canvas-sized arrays (and, with a non-default RNG, the probabilities) reach the host.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T

from dgrun import quants
from dgrun.format import GGUFFile
from dgrun.rng import DefaultRng, Rng
from dgrun.sampler import MASKED_LOGIT, StepResult

Packed = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # (codes as uint32 words, scales, biases or None)

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_ATTENTION_CHUNK = 512  # query rows per attention call: bounds the [heads, chunk, keys] score matrix
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


def repack_q5_0(raw: np.ndarray) -> Packed:
    """Q5_0 → affine 5-bit, group 32: nibble | high bit << 4 is the code, scale d, bias -16·d."""
    blocks, lead = _blocks(raw, quants.Q5_0)
    d = _fp16(blocks[:, :2])
    qh = np.ascontiguousarray(blocks[:, 2:6]).view("<u4")  # bit j is the fifth bit of value j
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    codes = _nibbles(blocks[:, 6:]) | (high << 4)
    return _pack(codes, 5, lead), d.reshape(*lead, -1), (np.float32(-16) * d).reshape(*lead, -1)


def repack_q4_k(raw: np.ndarray) -> Packed:
    """Q4_K → affine 4-bit, group 32: each 32-value sub-block gets scale d·sc and bias -dmin·m.

    d·sc and dmin·m are exact in float32 (11 + 6 significant bits), and so is scale·code, so MLX's
    scale·code + bias rounds once, exactly where ggml's d·sc·q - dmin·m does.
    """
    blocks, lead = _blocks(raw, quants.Q4_K)
    d, dmin = _fp16(blocks[:, 0:2]), _fp16(blocks[:, 2:4])
    packed = blocks[:, 4:16].reshape(-1, 3, 4)
    lo, hi, extra = packed[:, 0], packed[:, 1], packed[:, 2]
    # 6-bit (scale, min) pairs: sub-blocks 0-3 in the low 6 bits of bytes 0-7; 4-7 split over bytes 8-11
    # (low 4 bits) and the spare top 2 bits of bytes 0-7 (ggml's get_scale_min_k4).
    sc = np.concatenate([lo & 0x3F, (extra & 0x0F) | ((lo >> 2) & 0x30)], axis=-1).astype(np.float32)
    m = np.concatenate([hi & 0x3F, (extra >> 4) | ((hi >> 2) & 0x30)], axis=-1).astype(np.float32)
    # Byte l of each 32-byte chunk c holds value l of sub-block 2c (low) and of sub-block 2c + 1 (high).
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2)
    return _pack(codes, 4, lead), (d * sc).reshape(*lead, -1), (-(dmin * m)).reshape(*lead, -1)


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
    T.Q4_K: Layout(repack_q4_k, "affine", 32, 4),
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

    def f32(self, index: mx.array | None = None) -> mx.array:
        """The tensor (or its rows at `index`) as float32: F16/BF16 widen lazily where used."""
        array = self.array if index is None else self.array[index]
        return array if array.dtype == mx.float32 else array.astype(mx.float32)


@dataclass
class QuantWeight:
    """A tensor in an MLX quantized layout: uint32 codes [..., in·bits/32], per-group scales (and biases)."""

    packed: mx.array
    scales: mx.array
    biases: mx.array | None
    layout: Layout
    shape: tuple[int, ...]
    tensor_scale: float | None = None  # NVFP4's per-tensor scale, applied to every result

    def kwargs(self) -> dict[str, Any]:  # Any: mypy cannot match a mixed dict to the keyword parameters
        return {"group_size": self.layout.group_size, "bits": self.layout.bits, "mode": self.layout.mode}

    def rescale(self, y: mx.array) -> mx.array:
        return y if self.tensor_scale is None else y * self.tensor_scale


Weight = DenseWeight | QuantWeight


def _repack_rows(raw: np.ndarray, layout: Layout) -> Packed:
    """`layout.repack` over a [..., row_bytes] tensor in row chunks, so temporaries stay small."""
    rows = raw.reshape(-1, raw.shape[-1])
    step = max(1, _REPACK_CHUNK_VALUES // (rows.shape[1] * 2))  # no layout packs more than 2 values a byte
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


def _accept(
    entropy: mx.array, sampled: mx.array, argmax: mx.array, canvas: mx.array, noise: mx.array,
    clamp: mx.array, bound: mx.array,
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """Entropy-bound acceptance and renoising as in `dgrun.sampler`: (canvas, argmax, accepted, mean entropy).

    Clamped positions sort last as +inf (inf - inf is NaN, never <= bound), so the free positions' running
    sums are exactly those over the free subset.
    """
    key = mx.where(clamp, mx.inf, entropy)
    # The reference sorts stably; MLX's sort keeps tied entries in index order too (exact ties only).
    order = mx.argsort(key)
    ordered = key[order]
    selected = (mx.cumsum(ordered) - ordered) <= bound
    accepted = selected[mx.argsort(order)] & ~clamp
    new_canvas = mx.where(clamp, canvas, mx.where(accepted, sampled, noise))
    free = (~clamp).sum()
    mean = mx.where(clamp, 0.0, entropy).sum() / mx.maximum(free, 1)
    return new_canvas, mx.where(clamp, canvas, argmax), accepted | clamp, mean


def _allowed(bitmask: mx.array, vocab: int) -> mx.array:
    """bool [rows, vocab] from int32 llguidance bitmasks: bit i % 32 of word i // 32 allows token i."""
    token = mx.arange(vocab, dtype=mx.int32)
    return ((bitmask[:, token >> 5] >> (token & 31)) & 1) == 1  # arithmetic shift, but only bit 0 is kept


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
        self._accept = mx.compile(_accept)

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
            if info.ggml_type in (T.F32, T.F16):
                weights[name] = DenseWeight(mx.array(np.ascontiguousarray(gguf.array(name))))
                continue
            if info.ggml_type == T.BF16:
                bits = mx.array(np.ascontiguousarray(gguf.array(name)))  # uint16 bit patterns
                weights[name] = DenseWeight(bits.view(mx.bfloat16))
                continue
            raw = gguf.raw(name).reshape(*info.shape[:-1], quants.row_bytes(info.ggml_type, info.shape[-1]))
            # 1-D tensors (norms and scales, F32 in every preset) are read whole by `vector`: never packed.
            layout = LAYOUTS.get(info.ggml_type) if len(info.shape) > 1 else None
            if layout is not None:
                try:
                    packed, scales, biases = _repack_rows(raw, layout)
                except ValueError:  # a scale byte MLX cannot express: fall through to float32
                    pass
                else:
                    weights[name] = QuantWeight(mx.array(packed), mx.array(scales),
                                                None if biases is None else mx.array(biases), layout,
                                                tuple(info.shape), scale)
                    continue
            dense = quants.dequantize_tensor(raw, info.ggml_type, scale).reshape(info.shape)
            weights[name] = DenseWeight(mx.array(dense))
            kind = info.ggml_type.name
            dequantized[kind] = dequantized.get(kind, 0) + dense.nbytes
        if dequantized:
            what = ", ".join(f"{kind} ({size / 2**20:.1f} MiB)" for kind, size in sorted(dequantized.items()))
            print(f"dgrun: mlx has no lossless layout for {what}: dequantized to float32 at load",
                  file=sys.stderr)
        # Evaluated now (BF16 views are lazy): MLX streams are per thread, and a lazy array made here could not be
        # evaluated by another thread (a Scheduler's worker).
        mx.eval([a for w in weights.values() for a in ((w.array,) if isinstance(w, DenseWeight) else
                                                      (w.packed, w.scales, w.biases)) if a is not None])
        return weights

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
        """softmax(logits) @ table * scale: the self-conditioning soft embedding ([n, V] @ [V, H])."""
        probs = mx.softmax(mx.array(logits) if isinstance(logits, np.ndarray) else logits, axis=-1)
        return self._matmul(probs, table, transpose=False) * scale

    def linear(self, x: mx.array, w: Weight) -> mx.array:
        """x @ W^T for a [out, in] weight."""
        return self._matmul(x, w, transpose=True)

    def _matmul(self, x: mx.array, w: Weight, transpose: bool) -> mx.array:
        if isinstance(w, QuantWeight):
            return w.rescale(mx.quantized_matmul(x, w.packed, w.scales, w.biases, transpose=transpose,
                                                 **w.kwargs()))
        dense = w.f32()
        return x @ (dense.T if transpose else dense)

    def gated_mlp(self, x: mx.array, gate: Weight, up: Weight, down: Weight) -> mx.array:
        return self.linear(self._gelu_mul(self.linear(x, gate), self.linear(x, up)), down)

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
        (window is None or k_pos > q_pos - window); MLX's fused attention takes the KV heads ungrouped.
        """
        qh = q.transpose(1, 0, 2)[None]
        kh, vh = k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None]
        kp = mx.array(np.asarray(k_pos, dtype=np.int32))[None, :]
        chunks = []
        for start in range(0, q.shape[0], _ATTENTION_CHUNK):
            stop = min(start + _ATTENTION_CHUNK, q.shape[0])
            mask = None
            if causal or window is not None:
                qp = mx.array(np.asarray(q_pos[start:stop], dtype=np.int32))[:, None]
                if causal:
                    mask = kp <= qp
                if window is not None:
                    in_window = kp > qp - window
                    mask = in_window if mask is None else mask & in_window
            chunks.append(mx.fast.scaled_dot_product_attention(qh[:, :, start:stop], kh, vh, scale=1.0,
                                                               mask=mask))
        out = chunks[0] if len(chunks) == 1 else mx.concatenate(chunks, axis=2)
        return out[0].transpose(1, 0, 2)

    # -- mixture of experts -----------------------------------------------------------------------------

    def route(
        self, x: mx.array, proj: Weight, scale: mx.array, per_expert_scale: mx.array, top_k: int, eps: float
    ) -> tuple[mx.array, mx.array]:
        """Router: unscaled RMSNorm, * scale * hidden^-0.5, softmax, top-k renormalised, per-expert scale."""
        h = self.rms_norm(x, None, eps) * scale * (x.shape[-1] ** -0.5)
        probs = mx.softmax(self.linear(h, proj), axis=-1)
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
    ) -> StepResult:
        """`dgrun.sampler.denoise_step` on the device; `processed_logits` stays an mx.array.

        Draws go through `rng` in the reference's order (categorical, then tokens). A `DefaultRng` gives only
        its uniforms and the inverse CDF runs here (float32 cdf, see `_inverse_cdf`); any other RNG gets the
        probabilities on the host, which costs a canvas x vocab copy (replay in tests).
        """
        logits = mx.array(logits) if isinstance(logits, np.ndarray) else logits
        canvas = np.asarray(canvas, dtype=np.int64)
        processed, probs, argmax, entropy = self._step_core(logits, mx.array(temp, dtype=mx.float32))
        if isinstance(rng, DefaultRng):
            sampled = self._inverse_cdf(probs, mx.array(rng.uniform(canvas.shape[0]).astype(np.float32)))
        else:
            sampled = mx.array(np.asarray(rng.categorical(np.array(probs)), dtype=np.int32))
        noise = rng.tokens(canvas.shape, logits.shape[-1])  # a full canvas every step, as transformers does
        no_clamp = np.zeros(canvas.shape, dtype=bool)
        new_canvas, argmax, accepted, mean = self._accept(
            entropy, sampled.astype(mx.int32), argmax.astype(mx.int32), mx.array(canvas.astype(np.int32)),
            mx.array(np.asarray(noise, dtype=np.int32)), mx.array(no_clamp if clamp is None else clamp),
            mx.array(entropy_bound, dtype=mx.float32))
        mx.eval(processed, new_canvas, argmax, accepted, mean)
        return StepResult(np.array(new_canvas).astype(np.int64), np.array(argmax).astype(np.int64), processed,
                          np.array(accepted), float(np.array(mean)))

    # -- constrained decoding (dgrun.constrain) -------------------------------------------------------------

    def mask_rows(self, logits: mx.array | np.ndarray, start: int, bitmask: np.ndarray) -> mx.array:
        """`dgrun.sampler.mask_rows` on the device: only the bitmask ([rows, vocab/32] int32) is uploaded."""
        logits = mx.array(logits) if isinstance(logits, np.ndarray) else logits
        stop = start + bitmask.shape[0]
        allowed = _allowed(mx.array(np.ascontiguousarray(bitmask, dtype=np.int32)), logits.shape[-1])
        logits[start:stop] = mx.where(allowed, logits[start:stop], mx.array(MASKED_LOGIT))
        return logits

    def argmax_rows(self, logits: mx.array | np.ndarray, start: int, stop: int,
                    bitmask: np.ndarray | None = None) -> np.ndarray:
        """`dgrun.sampler.argmax_rows` on the device; only the row indices come back."""
        rows = (mx.array(logits) if isinstance(logits, np.ndarray) else logits)[start:stop]
        if bitmask is not None:
            allowed = _allowed(mx.array(np.ascontiguousarray(bitmask, dtype=np.int32)), rows.shape[-1])
            rows = mx.where(allowed, rows, mx.array(-math.inf, dtype=mx.float32))
        return np.array(mx.argmax(rows, axis=-1)).astype(np.int64)
