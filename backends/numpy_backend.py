"""The numpy backend: every op in plain float32 numpy. The reference that other backends are tested against.

Weights stay memory-mapped in their .dgf types and are dequantized on use, so loading a file copies nothing.
Readability wins over speed here; the fast CPU path is a separate backend.

Every op computes each row (token) on its own, so a row's result never depends on which other rows share the
call: that is what makes a batch's elements get the tokens they get alone. Matrix products therefore go
through `row_products`, one BLAS matrix-vector product per row, and never one GEMM over all rows — OpenBLAS's
GEMM gives a row different bits in calls of 16 and 48 rows (its kernels and blocking follow the shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from dgrun import quants, sampler
from dgrun.format import GGUFFile
from dgrun.rng import Rng

_SQRT_2_OVER_PI = np.float32(np.sqrt(2.0 / np.pi))
ATTENTION_BLOCK = 256  # query rows per block of the reference attention


def require_ascending(k_pos: np.ndarray) -> None:
    """Key positions must not decrease: attention finds each query block's keys by binary search."""
    if len(k_pos) > 1 and bool((np.diff(k_pos) < 0).any()):
        raise ValueError("attention: key positions must be in ascending order")


def visible_key_range(k_pos: np.ndarray, q_min: int, q_max: int, causal: bool, window: int | None) -> tuple[int, int]:
    """[lo, hi): the keys (positions ascending) that some query with a position in [q_min, q_max] may see.

    Causal: nothing after q_max; a window: nothing at or before q_min - window. Keys inside the range can still
    be masked for one query of the block; keys outside it are masked for all of them.
    """
    lo = int(np.searchsorted(k_pos, q_min - window, side="right")) if window is not None else 0
    hi = int(np.searchsorted(k_pos, q_max, side="right")) if causal else len(k_pos)
    return lo, max(lo, hi)

# The sparse soft embedding (see `NumpyBackend.soft_embed`). A row keeps the tokens whose logit is within
# SPARSE_KEEP_LOGIT of its largest, i.e. whose probability is at least 2^-32 of the largest one; it takes the
# sparse path when it keeps at most SPARSE_MAX_KEPT of them and the mass it drops passes the bound below.
SPARSE_KEEP_LOGIT = np.float32(32 * np.log(2.0))
SPARSE_MAX_KEPT = 1024
# The dropped mass is summed in floating point, so it is taken 2^-10 larger than computed: that covers its
# own rounding and exp's (a few ulp per term) with room to spare, so the bound below holds for the true mass.
SPARSE_MASS_MARGIN = 1 + 2.0**-10
FLOAT32_UNIT_ROUNDOFF = 2.0**-24


@dataclass
class Weight:
    """A tensor as stored: raw bytes (memory-mapped), its ggml type and numpy-order shape."""

    raw: np.ndarray
    ggml_type: int
    shape: tuple[int, ...]
    tensor_scale: float | None = None

    def dense(self) -> np.ndarray:
        """The whole tensor as float32."""
        return quants.dequantize_tensor(self.raw, self.ggml_type, self.tensor_scale).reshape(self.shape)

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Rows (first-axis entries) of the tensor as float32, dequantizing only those."""
        out = quants.dequantize_tensor(self.raw[index], self.ggml_type, self.tensor_scale)
        return out.reshape((len(index), *self.shape[1:]))

    @cached_property
    def max_row_norm(self) -> float:
        """The largest Euclidean norm of a row (2-D tensors), in float64, rounded up: the sparse soft
        embedding's bound on what a dropped token can contribute."""
        largest = 0.0
        for start in range(0, self.shape[0], 4096):  # in slices: a float64 copy of a big table would not fit
            rows = self.rows(np.arange(start, min(start + 4096, self.shape[0]))).reshape(-1, self.shape[-1])
            largest = max(largest, float((rows.astype(np.float64) ** 2).sum(axis=1).max()))
        return float(np.nextafter(np.sqrt(largest), np.inf))


def row_products(x: np.ndarray, w_t: np.ndarray) -> np.ndarray:
    """x @ w_t for x [..., k] and w_t [k, n], computed row by row: each row is its own matrix-vector product of
    the same shape, so its sums are the same whatever else is in `x` (see the module notes)."""
    return (x[..., None, :] @ w_t)[..., 0, :]


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU with the tanh approximation (transformers' `gelu_pytorch_tanh`)."""
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(_SQRT_2_OVER_PI * (x + np.float32(0.044715) * x**3)))


def sparse_soft_embed_row(
    logits: np.ndarray, probs: np.ndarray, table: Weight, scale: float
) -> np.ndarray | None:
    """One row of the soft embedding y = scale * sum_j p_j E_j from the few tokens that carry its mass, or None
    when the row must take the dense path.

    The row keeps S = {j : x_j >= max(x) - SPARSE_KEEP_LOGIT} (at most SPARSE_MAX_KEPT tokens) and returns
    y' = scale * sum_{j in S} p_j E_j when the dropped mass D = sum_{j not in S} p_j satisfies

        D * R <= (u / 2) * ||y'||,    R = scale * max_j ||E_j|| (`Weight.max_row_norm`),  u = 2^-24.

    Why that makes y' exact to float32: ||y - y'|| = ||scale * sum_{j not in S} p_j E_j|| <= D * R (triangle
    inequality), and ||y|| >= ||y'|| - D * R >= (1 - u/2) ||y'||, so ||y - y'|| <= (u/2) / (1 - u/2) ||y|| < u ||y||:
    the tokens left out move the result by less than rounding the exact y to float32 does (elementwise
    rounding moves it by up to u ||y||). Both y and y' are then computed in float32; y' sums |S| terms where
    the dense path sums the whole vocabulary, so its own rounding is the smaller. The probabilities p are the
    float32 softmax both paths share, and D is taken SPARSE_MASS_MARGIN larger than its floating-point sum.
    """
    keep = np.flatnonzero(logits - logits.max() >= -SPARSE_KEEP_LOGIT)
    if len(keep) > SPARSE_MAX_KEPT:
        return None
    dropped = np.ones(len(probs), dtype=bool)
    dropped[keep] = False
    mass = float(probs[dropped].sum(dtype=np.float64)) * SPARSE_MASS_MARGIN
    row = (probs[keep] @ table.rows(keep)) * np.float32(scale)
    norm = float(np.sqrt((row.astype(np.float64) ** 2).sum()))
    return row if mass * float(scale) * table.max_row_norm <= 0.5 * FLOAT32_UNIT_ROUNDOFF * norm else None


class NumpyBackend:
    """Reference implementation of the backend op interface (see `dgrun.backends.Backend`)."""

    name = "numpy"
    supported_types = frozenset(quants.QUANT_TYPES)

    def load_weights(self, gguf: GGUFFile, names: list[str]) -> dict[str, Weight]:
        weights = {}
        for name in names:
            info = gguf.tensors[name]
            scale_name = f"{name}.scale"
            scale = None
            if scale_name in gguf.tensors and scale_name not in names:
                scale = float(gguf.array(scale_name).reshape(-1)[0])
            weights[name] = self.weight(gguf.raw(name), info.ggml_type, info.shape, scale)
        return weights

    def weight(self, raw: np.ndarray, ggml_type: int, shape: tuple[int, ...],
               tensor_scale: float | None = None) -> Weight:
        """A tensor from its stored bytes (uint8, memory-mapped or made in memory), kept in its type."""
        row_bytes = quants.row_bytes(ggml_type, shape[-1])
        return Weight(raw.reshape((*shape[:-1], row_bytes)), ggml_type, tuple(shape), tensor_scale)

    # -- elementwise and normalisation ------------------------------------------------------------

    def asarray(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def vector(self, w: Weight) -> np.ndarray:
        """A small 1-D tensor (norm weight, scale) as float32."""
        return w.dense().reshape(-1)

    def rms_norm(self, x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
        # x * (mean(x^2) + eps)^-0.5, with pow rather than rsqrt as transformers does.
        out = x * np.power((x * x).mean(axis=-1, keepdims=True) + np.float32(eps), np.float32(-0.5))
        return out if weight is None else out * weight

    def softcap(self, x: np.ndarray, cap: float) -> np.ndarray:
        return np.tanh(x / np.float32(cap)) * np.float32(cap)

    def concat(self, *arrays: np.ndarray) -> np.ndarray:
        """The arrays one after another along the first axis (a single array is returned as is)."""
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)

    # -- embeddings and matmuls ---------------------------------------------------------------------

    def embed(self, table: Weight, ids: np.ndarray, scale: float) -> np.ndarray:
        return table.rows(np.asarray(ids)) * np.float32(scale)

    def soft_embed(self, logits: np.ndarray, table: Weight, scale: float) -> np.ndarray:
        """softmax(logits) @ table * scale: the self-conditioning soft embedding, exact to float32.

        A row whose probability mass sits on a few tokens gathers just their embedding rows
        (`sparse_soft_embed_row`); the other rows take one dense matmul.
        """
        logits = np.asarray(logits, dtype=np.float32).reshape(-1, table.shape[0])
        probs = sampler.softmax(logits)
        out = np.empty((len(probs), table.shape[1]), dtype=np.float32)
        dense = []
        for i in range(len(probs)):
            row = sparse_soft_embed_row(logits[i], probs[i], table, scale)
            if row is None:
                dense.append(i)
            else:
                out[i] = row
        if dense:
            out[dense] = (probs[dense] @ table.dense()) * np.float32(scale)
        return out

    def linear(self, x: np.ndarray, w: Weight) -> np.ndarray:
        """x @ W^T for a [out, in] weight."""
        return row_products(x, w.dense().T)

    def gelu_mul(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """gelu_tanh(gate) * up: the gated MLP's middle."""
        return gelu_tanh(gate) * up

    def gated_mlp(self, x: np.ndarray, gate: Weight, up: Weight, down: Weight) -> np.ndarray:
        return self.linear(self.gelu_mul(self.linear(x, gate), self.linear(x, up)), down)

    def logits(self, x: np.ndarray, w: Weight, cap: float) -> np.ndarray:
        """softcap(x @ W^T, cap): the decoder's output logits."""
        return self.softcap(self.linear(x, w), cap)

    # -- positions and attention --------------------------------------------------------------------

    def rope(self, x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
        """Rotate-half RoPE on [n, heads, head_dim]; zero frequencies (proportional RoPE) pass through."""
        freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def attention(
        self,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        q_pos: np.ndarray,
        k_pos: np.ndarray,
        causal: bool,
        window: int | None,
    ) -> np.ndarray:
        """Softmax(q k^T) v with scaling 1.0 (q/k norms replace it), grouped KV heads, position masks.

        q [n, Hq, d], k/v [m, Hkv, d], k_pos ascending. A key is visible when (not causal or k_pos <= q_pos) and
        (window is None or k_pos > q_pos - window). Query rows go in blocks, each over only the range of keys
        some query of the block can see (`visible_key_range`), so long prompts never materialise an n x m
        score matrix per head and a sliding layer costs its window, not the prompt.
        """
        require_ascending(k_pos)
        n, n_heads, d = q.shape
        groups = n_heads // k.shape[1]
        out = np.empty((n, n_heads, v.shape[-1]), dtype=np.float32)
        kh = np.repeat(k, groups, axis=1).transpose(1, 2, 0)  # [H, d, m]
        vh = np.repeat(v, groups, axis=1).transpose(1, 0, 2)  # [H, m, d]
        for start in range(0, n, ATTENTION_BLOCK):
            stop = min(start + ATTENTION_BLOCK, n)
            qp = q_pos[start:stop, None]
            lo, hi = visible_key_range(k_pos, int(qp.min()), int(qp.max()), causal, window)
            if lo == hi:  # no visible key: the 0/0 a softmax over masked keys only gives
                out[start:stop] = np.nan
                continue
            kp = k_pos[None, lo:hi]
            scores = q[start:stop].transpose(1, 0, 2) @ kh[:, :, lo:hi]  # [H, c, keys]
            visible = np.ones((stop - start, hi - lo), dtype=bool)
            if causal:
                visible &= kp <= qp
            if window is not None:
                visible &= kp > qp - window
            scores = np.where(visible[None], scores, -np.inf)
            out[start:stop] = (sampler.softmax(scores) @ vh[:, lo:hi]).transpose(1, 0, 2)
        return out

    # -- mixture of experts ---------------------------------------------------------------------------

    def route(
        self, x: np.ndarray, proj: Weight, scale: np.ndarray, per_expert_scale: np.ndarray, top_k: int, eps: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Router: unscaled RMSNorm * scale * hidden^-0.5, softmax, top-k renormalised, times per-expert scale."""
        h = self.rms_norm(x, None, eps) * scale * np.float32(x.shape[-1] ** -0.5)
        probs = sampler.softmax(self.linear(h, proj))
        index = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
        weights = np.take_along_axis(probs, index, axis=-1)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        return weights * per_expert_scale[index], index

    def experts(
        self, x: np.ndarray, weights: np.ndarray, index: np.ndarray, gate_up: Weight, down: Weight
    ) -> np.ndarray:
        """Sum over each token's experts of weight * down(gelu(gate(x)) * up(x)), one expert at a time."""
        out = np.zeros_like(x)
        for expert in np.unique(index):
            token, slot = np.nonzero(index == expert)
            gu = row_products(x[token], gate_up.rows(np.array([expert]))[0].T)
            gate, up = np.split(gu, 2, axis=-1)
            y = row_products(gelu_tanh(gate) * up, down.rows(np.array([expert]))[0].T)
            np.add.at(out, token, y * weights[token, slot][:, None])
        return out

    # -- sampler ---------------------------------------------------------------------------------------

    def denoise_step(
        self, logits: np.ndarray, canvas: np.ndarray, temp: float, entropy_bound: float, rng: Rng,
        clamp: np.ndarray | None = None,
    ) -> sampler.StepResult:
        return sampler.denoise_step(logits, canvas, temp, entropy_bound, rng, clamp)
