"""The cpu backend: the numpy reference's op interface on native C kernels (native/cpu, loaded with cffi).

What makes it fast, and what it keeps from the reference:
- Weights stay memory-mapped in their .dgf types. Matmuls decode a few rows at a time into per-thread scratch
  (bit-exact with the reference's dequantization) and multiply in float32 with a register-tiled microkernel;
  no decoded copy of a tensor is ever kept, so memory stays at the file size plus activations. F32 weights are
  read straight from the mapping.
- The MoE groups tokens per expert (one GEMM per expert, gate/up → GELU → down fused, weighted scatter-add in
  expert order); the dense MLP is the same kernel with one expert. Its router is one native call (the
  reference's norm, scores and choice of experts; the softmax's exp is the kernels'). Attention is fused
  (scores, mask, softmax, values) per head and block of queries, over only the keys that block can see (a
  sliding layer costs its window, a causal one half the square). The sampler's vocabulary-wide work
  (temperature, softmax, entropy, argmax, the inverse-CDF draw) is one visit per row.
- Big outputs (canvas x vocab logits and probabilities) are recycled once nobody references them, which
  saves their page faults; no decode pass allocates a fresh one after the first.
- The self-conditioning soft embedding gathers the few embedding rows of a row whose mass sits on a few tokens
  (exact to float32, see numpy_backend.sparse_soft_embed_row) and multiplies the rest as one product that turns
  logits into probabilities as it reads them; the sampler step runs fused and in place (no canvas x vocab array
  besides the logits) and leaves the row statistics that soft embedding reads.
- Everything runs on `threads` OpenMP threads: the `threads=` argument, else $DGRUN_THREADS, else the CPUs this
  process may run on. The kernel set (avx512 / avx2 / generic) is chosen at run time; `isa=` or
  $DGRUN_CPU_ISA forces one (tests run each one this CPU supports). Both are process-wide settings of the
  library: each backend re-applies its own before its calls, so backends may differ but must not run
  concurrently in two Python threads with different settings.
- Quantized weights (every quantized type: Q4_0, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, MXFP4, NVFP4, IQ4_NL,
  IQ4_XS, IQ3_S, IQ2_S) multiply in integer arithmetic by default, as ggml does (native/cpu/dg_int8.c):
  activations quantized to int8 per 32 values, int8 x int8 dot products with VNNI (AVX512-VNNI or AVX-VNNI) or
  AVX2's vpmaddubsw, float32 only for the per-block scales. `int8=False` or $DGRUN_CPU_INT8=0 turns it off,
  `int8="avx2"` (etc.) picks a kernel set (also process-wide). Why on: users of a quantized file came for
  speed, and the activations' rounding (~0.5% per matmul) is small next to the weights' own quantization error
  (tools/quant_quality.py publishes both). Every kernel set takes every quantized type (AVX2 and arm64's
  dotprod multiply Q8_0's, IQ4_NL's and IQ4_XS's codes as signed bytes); adapters' float halves run the float32
  kernels. The soft embedding's dense rows over a quantized table are integer products too (5-bit probability
  codes per 32 tokens times the table re-quantized along the vocabulary, a chunk at a time: on the bench model's
  q4_k_m file 0.86% from the f32 file's result, against 0.71% in float32); its sparse rows stay exact.
  BF16 files on CPUs with AVX512-BF16 (the `avx512bf16` set) multiply their weights as stored by
  activations rounded to bfloat16 under the same switch (VDPBF16PS: 2^-8 relative per activation at most);
  elsewhere they stay float32 (`int8="generic"` computes the same bfloat16 products portably, for tests).
  Row-independent like the float
  kernels: each token's activations are quantized on their own, and its sums never depend on its neighbours.

Accuracy against the numpy backend with int8 off, and for float files always: float32 throughout, only
summation order differs (and exp/tanh within 2 ulp), so every file type's K/V agree to ~4e-7 and logits to
~5e-6 relative, the float32 noise floor; tests/test_cpu_backend.py states the bounds and why.
The sampler draws through the same Rng calls in the same order; with a `DefaultRng` only its uniforms are
drawn and the float64 inverse CDF runs natively (identical to `DefaultRng.categorical` given identical
probabilities; the kernels' probabilities differ from numpy's by float32 rounding, which can change a draw only
when a uniform lands within ~1e-7 of a CDF step).

The library builds itself with the system C compiler on first use (see native/cpu/build.py); without one the
constructor raises RuntimeError saying how to fix it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import weakref
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from dgrun import quants, sampler
from dgrun.backends.numpy_backend import (
    FLOAT32_UNIT_ROUNDOFF,
    SPARSE_KEEP_LOGIT,
    SPARSE_MASS_MARGIN,
    SPARSE_MAX_KEPT,
    NumpyBackend,
    Weight,
    require_ascending,
)
from dgrun.rng import DefaultRng, Rng

_ERRORS = {-1: "unsupported tensor type or row size", -2: "kernel set not available on this CPU",
           -3: "out of memory", -4: "bad shape"}


def _native_dir() -> Path:
    """The folder with the C sources and build.py: installed beside this module, or the source tree's native/cpu."""
    for candidate in (Path(__file__).resolve().parent / "_native_cpu",
                      Path(__file__).resolve().parents[1] / "native" / "cpu"):
        if (candidate / "build.py").is_file():
            return candidate
    raise RuntimeError("the cpu kernels' C sources are not installed (expected native/cpu beside the package); "
                       "reinstall dgrun from a source checkout")


INT8_DEFAULT = "on"  # see the module notes
_POOL_MIN_FLOATS = 1 << 20  # outputs from 4 MiB up are recycled (see CpuBackend._empty)
_POOL_ARRAYS = 48  # a batch of 8 may hold several canvas-sized arrays per element at once
_ROPE_TABLES = 16  # RoPE angle tables kept: a pass needs one per frequency set (sliding, full) and batch layout
_LIBRARY: tuple[Any, Any, Path] | None = None
_ACTIVE: list[Any] = [None]  # the backend whose threads/ISA the library is currently set to


def build_library(native_dir: Path, module_name: str = "_dgrun_cpu_build") -> tuple[Any, Any, Path]:
    """(ffi, lib, path) of the kernels in `native_dir`, built by its build.py (cached on disk by its sources)."""
    spec = importlib.util.spec_from_file_location(module_name, native_dir / "build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.load()  # BuildError is a RuntimeError with the fix in its message


def load_library() -> tuple[Any, Any, Path]:
    """(ffi, lib, path) of the native kernels, built on first use and cached per process."""
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = build_library(_native_dir())
    return _LIBRARY


def default_threads() -> int:
    """$DGRUN_THREADS, else the number of CPUs this process may run on."""
    env = os.environ.get("DGRUN_THREADS", "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            raise RuntimeError(f"DGRUN_THREADS must be a positive integer, got {env!r}") from None
        if value < 1:
            raise RuntimeError(f"DGRUN_THREADS must be a positive integer, got {env!r}")
        return value
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _int8_setting(value: bool | str | None) -> tuple[bool, str]:
    """(int8 on, the int8 kernel set to ask for) from the `int8=` argument, else $DGRUN_CPU_INT8."""
    if value is None:
        value = os.environ.get("DGRUN_CPU_INT8", "").strip().lower() or INT8_DEFAULT
    if value in (False, "0", "off", "no", "false"):
        return False, "auto"
    if value in (True, "1", "on", "yes", "true", "auto"):
        return True, "auto"
    return True, str(value)


class CpuWeight(Weight):
    """A stored tensor plus what the kernels need: its address in the mapping and bytes per row."""

    address: int = 0
    row_bytes: int = 0

    def __init__(self, raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], tensor_scale: float | None = None):
        super().__init__(raw, ggml_type, shape, tensor_scale)
        self.row_bytes = int(raw.shape[-1])
        self.address = raw.__array_interface__["data"][0] if raw.size else 0

    @property
    def scale(self) -> float:
        return 1.0 if self.tensor_scale is None else float(self.tensor_scale)

    @cached_property
    def max_row_norm(self) -> float:
        """As `Weight.max_row_norm`, decoded natively (one pass over the tensor, the first time it is asked)."""
        ffi, lib, _ = load_library()
        out = ffi.new("double *")
        rc = lib.dg_max_row_norm(self.ggml_type, ffi.cast("const uint8_t *", self.address), self.row_bytes,
                                 self.shape[-1], self.scale, self.shape[0], out)
        if rc != 0:
            raise RuntimeError(f"cpu kernel max_row_norm failed: {_ERRORS.get(rc, rc)}")
        return float(np.nextafter(out[0], np.inf))


@dataclass
class RowStats:
    """Per-row softmax statistics of a [rows, vocab] array (`dg_row_stats`): what the soft embedding reads."""

    row_max: np.ndarray  # float32 [rows]
    row_total: np.ndarray  # float32 [rows]: softmax = exp(x - row_max) / row_total
    mass: np.ndarray  # float64 [rows]: softmax mass outside the kept tokens
    kept_n: np.ndarray  # int64 [rows]: tokens within SPARSE_KEEP_LOGIT of the maximum
    kept: np.ndarray  # int32 [rows, SPARSE_MAX_KEPT]: the first of them, in index order

    @classmethod
    def empty(cls, rows: int) -> RowStats:
        return cls(np.empty(rows, np.float32), np.empty(rows, np.float32), np.empty(rows, np.float64),
                   np.empty(rows, np.int64), np.empty((rows, SPARSE_MAX_KEPT), np.int32))


class CpuBackend(NumpyBackend):
    """The op interface on native kernels; anything not worth a kernel is inherited from the numpy reference."""

    name = "cpu"
    supported_types = frozenset(quants.QUANT_TYPES)

    def __init__(self, threads: int | None = None, isa: str | None = None, int8: bool | str | None = None):
        self.ffi, self.lib, self.library_path = load_library()
        self.threads = default_threads() if threads is None else int(threads)
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads!r}")
        self.isa_request = isa or os.environ.get("DGRUN_CPU_ISA", "auto")
        if self.lib.dg_select_isa(self.isa_request.encode()) != 0:
            raise RuntimeError(f"cpu kernel set {self.isa_request!r} is not available on this CPU or build "
                               "(choose auto, avx512, avx2 or generic)")
        self.isa = self.ffi.string(self.lib.dg_isa()).decode()
        self.int8, int8_set = _int8_setting(int8)
        if self.lib.dg_select_int8(int8_set.encode()) != 0:
            raise RuntimeError(f"int8 kernel set {int8_set!r} is not available on this CPU or build "
                               "(choose auto, avx512bf16, avx512vnni, avxvnni, avx2, i8mm, dotprod or generic)")
        self.int8_isa = self.ffi.string(self.lib.dg_int8_isa()).decode()
        if not self.lib.dg_has_openmp():
            self.threads = 1
        self._activate(force=True)
        # id(processed logits) → (a weak reference to them, their row statistics): each element's self-conditioning
        # reads its own sampler step's; the entry goes when the processed logits do.
        self._stats: dict[int, tuple[weakref.ref[np.ndarray], RowStats]] = {}
        self._pool: list[np.ndarray] = []
        self._rope_cache: dict[tuple[bytes, bytes], tuple[np.ndarray, np.ndarray]] = {}
        self.soft_embed_paths: np.ndarray | None = None

    def __repr__(self) -> str:
        int8 = repr(self.int8_isa) if self.int8 else "off"
        return f"CpuBackend(threads={self.threads}, isa={self.isa!r}, int8={int8})"

    # -- plumbing --------------------------------------------------------------------------------------------

    def _activate(self, force: bool = False) -> None:
        """Point the process-wide library at this backend's thread count and kernel set."""
        if force or _ACTIVE[0] is not self:
            self.lib.dg_set_threads(self.threads)
            self.lib.dg_select_isa(self.isa.encode())
            self.lib.dg_select_int8(getattr(self, "int8_isa", "auto").encode())
            self.lib.dg_set_int8(int(getattr(self, "int8", False)))
            _ACTIVE[0] = self

    def _p(self, array: np.ndarray, ctype: str = "float *") -> Any:
        # from_buffer: ~0.5 us against ~3.5 us for a cast of __array_interface__'s address, ~400 times a pass
        return self.ffi.from_buffer(ctype.replace("*", "[]"), array)

    def _w(self, w: CpuWeight, offset: int = 0) -> Any:
        return self.ffi.cast("const uint8_t *", w.address + offset)

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            message = f"cpu kernel {what} failed: {_ERRORS.get(rc, rc)}"
            raise MemoryError(message) if rc == -3 else RuntimeError(message)

    @staticmethod
    def _f32(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)

    def _empty(self, shape: tuple[int, ...]) -> np.ndarray:
        """An uninitialised float32 output array. Big ones (canvas x vocab logits, probabilities) are recycled:
        a fresh 32 MiB array costs ~5 ms of page faults, several times per pass. An array is reused only once
        nothing but the pool references it (no variable, no view), so no caller ever sees its data change."""
        size = math.prod(shape)
        if size < _POOL_MIN_FLOATS:
            return np.empty(shape, dtype=np.float32)
        for array in self._pool:
            # References: the pool's list, this loop's variable and getrefcount's argument — nobody else.
            if array.size == size and sys.getrefcount(array) <= 3:
                return array.reshape(shape)
        array = np.empty(size, dtype=np.float32)
        self._pool.append(array)
        if len(self._pool) > _POOL_ARRAYS:
            self._pool.pop(0)  # the caller still holding it keeps it alive; the pool just forgets it
        return array.reshape(shape)

    def weight(self, raw: np.ndarray, ggml_type: int, shape: tuple[int, ...],
               tensor_scale: float | None = None) -> CpuWeight:
        w = super().weight(raw, ggml_type, shape, tensor_scale)
        return CpuWeight(w.raw, w.ggml_type, w.shape, w.tensor_scale)

    # -- elementwise and normalisation ----------------------------------------------------------------------

    def rms_norm(self, x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
        self._activate()
        x = self._f32(x)
        out = np.empty_like(x)
        width = x.shape[-1]
        w = None if weight is None else self._f32(weight)
        self._check(self.lib.dg_rms_norm(self._p(x), x.size // max(width, 1), width,
                                         self.ffi.NULL if w is None else self._p(w), eps, self._p(out)), "rms_norm")
        return out

    def softcap(self, x: np.ndarray, cap: float) -> np.ndarray:
        self._activate()
        x = self._f32(x)
        out = self._empty(x.shape)
        self._check(self.lib.dg_softcap(self._p(x), x.size, cap, self._p(out)), "softcap")
        return out

    def logits(self, x: np.ndarray, w: CpuWeight, cap: float) -> np.ndarray:
        """softcap(x @ W^T, cap), soft-capped in place: one canvas x vocab array."""
        out = self.linear(x, w)
        self._check(self.lib.dg_softcap(self._p(out), out.size, cap, self._p(out)), "softcap")
        return out

    # -- embeddings and matmuls -----------------------------------------------------------------------------

    def embed(self, table: CpuWeight, ids: np.ndarray, scale: float) -> np.ndarray:
        self._activate()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
            raise IndexError(f"token id outside the embedding table (0..{table.shape[0] - 1})")
        cols = table.shape[-1]
        out = np.empty((ids.size, cols), dtype=np.float32)
        self._check(self.lib.dg_dequant_rows(table.ggml_type, self._w(table), table.row_bytes, cols, table.scale,
                                             self._p(ids, "int64_t *"), ids.size, scale, self._p(out)), "embed")
        return out.reshape(*ids.shape, cols)

    def soft_embed(self, logits: np.ndarray, table: CpuWeight, scale: float) -> np.ndarray:
        """softmax(logits) @ table * scale, sparse where a row's mass sits on a few tokens (as the reference);
        the sampler step's row statistics when `logits` are its processed logits, else one pass to make them.
        `soft_embed_paths` then says per row how many tokens it gathered (-1: the dense product)."""
        self._activate()
        known = self._stats.get(id(logits))
        if known is not None and known[0]() is logits:
            stats = known[1]
        else:
            logits = self._f32(logits).reshape(-1, table.shape[0])
            stats = RowStats.empty(logits.shape[0])
            self._check(self.lib.dg_row_stats(self._p(logits), logits.shape[0], logits.shape[1], SPARSE_KEEP_LOGIT,
                                              SPARSE_MAX_KEPT, *self._stats_args(stats)), "row_stats")
        rows = logits.shape[0]
        out = np.empty((rows, table.shape[1]), dtype=np.float32)
        paths = np.empty(rows, dtype=np.int64)
        # Sparse when mass * (1 + margin) * scale * R <= (u / 2) ||y'||: numpy_backend.sparse_soft_embed_row.
        rel_tol = 0.5 * FLOAT32_UNIT_ROUNDOFF / SPARSE_MASS_MARGIN
        norm_bound = float(scale) * table.max_row_norm if (stats.kept_n <= SPARSE_MAX_KEPT).any() else 0.0
        self._check(self.lib.dg_soft_embed(
            self._p(logits), rows, table.shape[0], *self._stats_args(stats)[:4], self._p(stats.kept, "int32_t *"),
            SPARSE_MAX_KEPT, table.ggml_type, self._w(table), table.row_bytes, table.scale, table.shape[1], scale,
            norm_bound, rel_tol, self._p(out), self._p(paths, "int64_t *")), "soft_embed")
        self.soft_embed_paths = paths
        return out

    def _stats_args(self, stats: RowStats) -> tuple[Any, ...]:
        return (self._p(stats.row_max), self._p(stats.row_total), self._p(stats.mass, "double *"),
                self._p(stats.kept_n, "int64_t *"), self._p(stats.kept, "int32_t *"))

    def softmax(self, x: np.ndarray) -> np.ndarray:
        """Row softmax (the reference's `sampler.softmax`)."""
        self._activate()
        x = self._f32(x)
        out = self._empty(x.shape)
        cols = x.shape[-1]
        self._check(self.lib.dg_softmax(self._p(x), x.size // cols, cols, self._p(out)), "softmax")
        return out

    def linear(self, x: np.ndarray, w: CpuWeight) -> np.ndarray:
        """x @ W^T for a [out, in] weight of any supported type."""
        self._activate()
        x = self._f32(x)
        n, k = w.shape
        out = self._empty((*x.shape[:-1], n))
        self._check(self.lib.dg_linear(self._p(x), x.size // k, k, w.ggml_type, self._w(w), w.row_bytes, w.scale, n,
                                       self._p(out)), "linear")
        return out

    def gated_mlp(self, x: np.ndarray, gate: CpuWeight, up: CpuWeight, down: CpuWeight) -> np.ndarray:
        return self._ffn(x, None, None, 1, gate, 0, up, 0, down, 0)

    # -- positions and attention ----------------------------------------------------------------------------

    def rope(self, x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
        self._activate()
        x = self._f32(x)
        cos_a, sin_a = self._rope_angles(np.ascontiguousarray(positions, dtype=np.int64), self._f32(inv_freq))
        out = np.empty_like(x)
        n, heads, d = x.shape
        self._check(self.lib.dg_rope(self._p(x), n, heads, d, self._p(cos_a), self._p(sin_a), self._p(out)), "rope")
        return out

    def _rope_angles(self, positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of RoPE's angles [positions, frequencies], kept for the next use of the same positions and
        frequencies: a pass's layers (q and k alike) and a canvas's every step turn by the same angles, whose
        cosf / sinf were the op's whole cost (~0.2 ms a call on the bench model, 12 calls a pass)."""
        key = (positions.tobytes(), inv_freq.tobytes())
        angles = self._rope_cache.pop(key, None)
        if angles is None:
            angles = (np.empty((positions.size, inv_freq.size), np.float32),
                      np.empty((positions.size, inv_freq.size), np.float32))
            self._check(self.lib.dg_rope_table(self._p(positions, "int64_t *"), positions.size, self._p(inv_freq),
                                               inv_freq.size, self._p(angles[0]), self._p(angles[1])), "rope")
            if len(self._rope_cache) >= _ROPE_TABLES:
                self._rope_cache.pop(next(iter(self._rope_cache)))  # the least recently used
        self._rope_cache[key] = angles
        return angles

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
        """Fused softmax(q k^T) v with the reference's masks, over each query block's visible key range (see
        NumpyBackend.attention)."""
        self._activate()
        q, k, v = self._f32(q), self._f32(k), self._f32(v)
        q_pos = np.ascontiguousarray(q_pos, dtype=np.int64)
        k_pos = np.ascontiguousarray(k_pos, dtype=np.int64)
        require_ascending(k_pos)
        n, hq, d = q.shape
        m, hkv, dv = v.shape
        out = np.empty((n, hq, dv), dtype=np.float32)
        self._check(self.lib.dg_attention(self._p(q), n, hq, d, self._p(k), self._p(v), m, hkv, dv,
                                          self._p(q_pos, "int64_t *"), self._p(k_pos, "int64_t *"), int(causal),
                                          0 if window is None else int(window), self._p(out)), "attention")
        return out

    # -- mixture of experts ---------------------------------------------------------------------------------

    def route(self, x: np.ndarray, proj: CpuWeight, scale: np.ndarray, per_expert_scale: np.ndarray, top_k: int,
              eps: float) -> tuple[np.ndarray, np.ndarray]:
        """NumpyBackend.route in one native call: the same norm, scores and expert choice; the softmax's exp is
        the kernels' (within float32 rounding of numpy's)."""
        self._activate()
        x = self._f32(x)
        n, hidden = x.size // x.shape[-1], x.shape[-1]
        weights, index = np.empty((n, top_k), np.float32), np.empty((n, top_k), np.int64)
        self._check(self.lib.dg_route(self._p(x), n, hidden, proj.ggml_type, self._w(proj), proj.row_bytes,
                                      proj.scale, proj.shape[0], self._p(self._f32(scale)), hidden ** -0.5,
                                      self._p(self._f32(per_expert_scale)), top_k, eps, self._p(weights),
                                      self._p(index, "int64_t *")), "route")
        return weights, index

    def experts(
        self, x: np.ndarray, weights: np.ndarray, index: np.ndarray, gate_up: CpuWeight, down: CpuWeight
    ) -> np.ndarray:
        """Sum over each token's experts of weight * down(gelu(gate(x)) * up(x)), tokens grouped per expert."""
        n_experts, two_inter, _ = gate_up.shape
        expert_bytes = two_inter * gate_up.row_bytes
        return self._ffn(x, np.ascontiguousarray(index, dtype=np.int64), self._f32(weights), n_experts,
                         gate_up, expert_bytes, gate_up, expert_bytes, down, down.shape[1] * down.row_bytes,
                         up_offset=two_inter // 2 * gate_up.row_bytes)

    def _ffn(self, x: np.ndarray, index: np.ndarray | None, weights: np.ndarray | None, n_experts: int,
             gate: CpuWeight, gate_stride: int, up: CpuWeight, up_stride: int, down: CpuWeight, down_stride: int,
             up_offset: int = 0) -> np.ndarray:
        self._activate()
        x = self._f32(x)
        hidden, inter = x.shape[-1], down.shape[-1]
        n = x.size // hidden
        out = np.empty_like(x)
        null = self.ffi.NULL
        top_k = 1 if index is None else index.shape[-1]
        self._check(self.lib.dg_ffn(
            self._p(x), n, hidden, inter, null if index is None else self._p(index, "int64_t *"),
            null if weights is None else self._p(weights), top_k, n_experts,
            gate.ggml_type, self._w(gate), gate.row_bytes, gate_stride, gate.scale,
            up.ggml_type, self._w(up, up_offset), up.row_bytes, up_stride, up.scale,
            down.ggml_type, self._w(down), down.row_bytes, down_stride, down.scale, self._p(out)), "ffn")
        return out

    # -- sampler ----------------------------------------------------------------------------------------------

    def _remember_stats(self, processed: np.ndarray, stats: RowStats) -> None:
        """Keep `stats` for `soft_embed(processed)` for as long as `processed` lives."""
        key, table = id(processed), self._stats
        table[key] = (weakref.ref(processed, lambda _: table.pop(key, None)), stats)

    def denoise_step(
        self, logits: np.ndarray, canvas: np.ndarray, temp: float, entropy_bound: float, rng: Rng,
        clamp: np.ndarray | None = None,
    ) -> sampler.StepResult:
        """`dgrun.sampler.denoise_step` with its vocabulary-wide work fused into one native visit per row.

        In place: a float32 `logits` array becomes the processed logits (logits / temp) and is returned as
        `processed_logits`, so a step makes no canvas x vocab array (pass a copy to keep the logits). Its row
        statistics are kept for the soft embedding of those processed logits. Draws go through `rng` in the
        reference's order (categorical, then tokens): a plain `DefaultRng` gives only its uniforms and the
        inverse CDF runs natively; any other RNG gets the probabilities.
        """
        self._activate()
        processed = self._f32(logits)
        rows, vocab = processed.shape
        stats = RowStats.empty(rows)
        argmax, sampled = np.empty(rows, dtype=np.int64), np.empty(rows, dtype=np.int64)
        token_entropy = np.empty(rows, dtype=np.float32)
        native_draw = isinstance(rng, DefaultRng) and type(rng).categorical is DefaultRng.categorical
        u = np.ascontiguousarray(rng.uniform(rows), dtype=np.float64) if native_draw else None
        self._check(self.lib.dg_sampler(
            self._p(processed), rows, vocab, temp, self._p(argmax, "int64_t *"), self._p(token_entropy),
            self.ffi.NULL if u is None else self._p(u, "double *"), self._p(sampled, "int64_t *"),
            SPARSE_KEEP_LOGIT, SPARSE_MAX_KEPT, *self._stats_args(stats)), "sampler")
        if not native_draw:
            sampled = np.asarray(rng.categorical(self.softmax(processed)), dtype=np.int64)
        self._remember_stats(processed, stats)
        return sampler.finish_step(processed, sampled, argmax, token_entropy, canvas, entropy_bound, rng, clamp)
