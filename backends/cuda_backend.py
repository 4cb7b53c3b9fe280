"""The CUDA backend: the op interface of `dgrun.backends` on device memory, through libdgcuda.so.

The kernels live in native/ (C API: native/dg_cuda.h); this module loads the library with cffi in ABI mode
(no compiler needed at import), keeps weights on the GPU in their .dgf block types, and wraps activations in
`DeviceArray`, a contiguous float32/int32 device buffer with the few array methods the graph uses
(shape, reshape, leading-axis slices, +, *). runtime/model.py runs on it unchanged.

Every shape, index and id is checked here, in Python, before any native call: the kernels trust their sizes.

Matmul precision follows the weights (DGRUN_CUDA_MATMUL=auto): F32 weights multiply in float32 on CUDA cores,
so an F32 file matches the numpy reference up to summation order; quantized/BF16/F16 weights use TF32 tensor
cores (10-bit mantissa inputs, float32 sums), far below their own quantization error. DGRUN_CUDA_MATMUL=fp32
or tf32 forces one engine for every matmul.

Threads: the library runs on the device DGRUN_CUDA_DEVICE named at first use, whichever host thread calls it
(each call switches that thread to the device and back). DGRUN_CUDA_SYNC=1 waits after every kernel so a fault
names the kernel that caused it.

Randomness: with dgrun's `DefaultRng` the whole sampler step runs on the device, its draws from Philox4x32-10
keyed by the RNG's seed; any other `Rng` (e.g. `ReplayRng` in tests) gets the logits on the host and the numpy
sampler, so recorded draws replay exactly.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from dgrun import quants, sampler
from dgrun.backends.numpy_backend import (
    FLOAT32_UNIT_ROUNDOFF,
    SPARSE_KEEP_LOGIT,
    SPARSE_MASS_MARGIN,
    SPARSE_MAX_KEPT,
)
from dgrun.format import GGUFFile
from dgrun.rng import DefaultRng, Rng

LIBRARY = "libdgcuda.so"
HEADER = "dg_cuda.h"
BUILD_HINT = ("build it with `python native/build.py` (DGRUN_CUDA_ARCH=native builds for this GPU only) or "
              "reinstall dgrun with nvcc on PATH (`pip install .`); DGRUN_CUDA_LIB may name a built library")
SUPPORTED_TYPES = frozenset({T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4,
                             T.NVFP4, T.IQ4_NL, T.IQ4_XS, T.IQ3_S, T.IQ2_S})
ENGINE_FP32, ENGINE_TF32 = 0, 1
MAX_CANVAS = 4096  # the sampler kernel's limit (one block sorts the canvas)
MAX_EXPERTS = 1024  # the router kernel's limit (one warp per token, experts in shared memory)
MAX_HEAD_DIM = 512  # the attention kernel's limit (a warp holds one head row in registers)
K_SLICE = 32  # the matmul kernels' step through the reduced dimension, which must be a multiple of it


def library_candidates() -> list[Path]:
    """Where libdgcuda.so is looked for, in order: $DGRUN_CUDA_LIB, the installed package, a checkout."""
    here = Path(__file__).resolve().parent
    env = os.environ.get("DGRUN_CUDA_LIB")
    installed, checkout = here / "_native" / LIBRARY, here.parent / "native" / "build" / LIBRARY
    return [*([Path(env)] if env else []), installed, checkout]


class Native:
    """libdgcuda.so loaded with cffi, its device initialised; `call` raises RuntimeError on a bad status."""

    def __init__(self, path: Path, device: int):
        import cffi

        header = (path.parent / HEADER).read_text()
        self.ffi = cffi.FFI()
        self.ffi.cdef(header.split("/* <cdef> */")[1].split("/* </cdef> */")[0])
        self.lib = self.ffi.dlopen(str(path))
        # A debugging switch for tests: fill every new activation with NaN so unwritten elements show.
        self.poison = False
        self.call("dg_init", device, what=f"initialise CUDA device {device}")
        name = self.ffi.new("char[256]")
        major, minor, sms = self.ffi.new("int *"), self.ffi.new("int *"), self.ffi.new("int *")
        total = self.ffi.new("int64_t *")
        self.call("dg_device_info", name, 256, major, minor, sms, total)
        self.device_name = self.ffi.string(name).decode()
        self.compute_capability = (major[0], minor[0])
        self.total_bytes = int(total[0])

    def call(self, name: str, *args: Any, what: str | None = None) -> None:
        status = getattr(self.lib, name)(*args)
        if status:
            message = self.ffi.string(self.lib.dg_last_error()).decode(errors="replace")
            raise RuntimeError(f"CUDA {what or name} failed ({status}): {message}")

    def ptr(self, ctype: str, address: int) -> Any:
        return self.ffi.cast(ctype, address)

    def host(self, ctype: str, array: np.ndarray) -> Any:
        """A cffi pointer to a contiguous host array."""
        return self.ffi.cast(ctype, self.ffi.from_buffer(array))


_NATIVE: list[Native] = []  # the loaded library, once per process
_NATIVE_LOCK = threading.Lock()


def native() -> Native:
    """The process-wide library handle, loaded and its device initialised once even when several threads ask at
    the same time; RuntimeError saying how to build it when unavailable."""
    if not _NATIVE:
        with _NATIVE_LOCK:
            if not _NATIVE:
                _NATIVE.append(_load_native())
    return _NATIVE[0]


def _load_native() -> Native:
    for path in library_candidates():
        if path.is_file():
            break
    else:
        looked = ", ".join(str(p) for p in library_candidates())
        raise RuntimeError(f"{LIBRARY} not found (looked in {looked}): {BUILD_HINT}")
    try:
        return Native(path, int(os.environ.get("DGRUN_CUDA_DEVICE", "0")))
    except OSError as e:
        raise RuntimeError(f"cannot load {path}: {e}; {BUILD_HINT}") from None


class _Buffer:
    """One device allocation, freed (stream-ordered, back to the pool) when the last view of it dies."""

    __slots__ = ("address", "nbytes", "lib", "ffi", "__weakref__")

    def __init__(self, nbytes: int):
        n = native()
        out = n.ffi.new("void **")
        n.call("dg_malloc", out, nbytes, what=f"allocation of {nbytes} bytes")
        self.address = int(n.ffi.cast("uintptr_t", out[0]))
        self.nbytes = nbytes
        self.lib, self.ffi = n.lib, n.ffi

    def __del__(self) -> None:
        try:
            self.lib.dg_free(self.ffi.cast("void *", self.address))
        except Exception:  # interpreter shutdown: the library may already be gone
            pass


class DeviceArray:
    """A contiguous float32 or int32 array in device memory, possibly a view into a larger buffer.

    `bound`, when set, promises every value lies in [0, bound) (router indices); ops that index memory with
    the values require it.
    """

    def __init__(self, buffer: _Buffer, shape: tuple[int, ...], dtype: np.dtype[Any], offset: int = 0,
                 bound: int | None = None):
        self.buffer, self.shape, self.dtype = buffer, tuple(shape), np.dtype(dtype)
        self.offset, self.bound = offset, bound

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: Any = np.float32) -> DeviceArray:
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.int32)):
            raise TypeError(f"DeviceArray holds float32 or int32, not {dtype}")
        out = cls(_Buffer(math.prod(shape) * dtype.itemsize), shape, dtype)
        n = native()
        if n.poison and out.size:
            n.call("dg_fill_f32", n.ptr("float *", out.address), float("nan"), out.size)
        return out

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> DeviceArray:
        array = np.ascontiguousarray(array)
        if array.dtype not in (np.dtype(np.float32), np.dtype(np.int32)):
            raise TypeError(f"DeviceArray holds float32 or int32, not {array.dtype}")
        out = cls.empty(array.shape, array.dtype)
        if array.size:
            n = native()
            n.call("dg_upload", n.ptr("void *", out.address), n.host("void *", array), array.nbytes)
        return out

    @property
    def address(self) -> int:
        return self.buffer.address + self.offset

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def reshape(self, *shape: Any) -> DeviceArray:
        given = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        dims: list[int] = [int(d) for d in given]
        if dims.count(-1) > 1:
            raise ValueError("only one dimension can be -1")
        if -1 in dims:
            known = math.prod(d for d in dims if d != -1)
            if known == 0 or self.size % known:
                raise ValueError(f"cannot reshape {self.shape} into {tuple(dims)}")
            dims[dims.index(-1)] = self.size // known
        if math.prod(dims) != self.size or any(d < 0 for d in dims):
            raise ValueError(f"cannot reshape {self.shape} into {tuple(dims)}")
        return DeviceArray(self.buffer, tuple(dims), self.dtype, self.offset, self.bound)

    def __getitem__(self, key: Any) -> DeviceArray:
        """Leading-axis views only: an integer or a step-1 slice (what KV-cache trimming needs)."""
        if not self.shape:
            raise IndexError("a 0-d DeviceArray cannot be indexed")
        rows, row_bytes = self.shape[0], math.prod(self.shape[1:]) * self.dtype.itemsize
        if isinstance(key, (int, np.integer)):
            i = int(key) + rows if key < 0 else int(key)
            if not 0 <= i < rows:
                raise IndexError(f"index {key} out of range for {rows} rows")
            offset = self.offset + i * row_bytes
            return DeviceArray(self.buffer, self.shape[1:], self.dtype, offset, self.bound)
        if isinstance(key, slice):
            start, stop, step = key.indices(rows)
            if step != 1:
                raise IndexError("DeviceArray slices must have step 1")
            stop = max(start, stop)
            return DeviceArray(self.buffer, (stop - start, *self.shape[1:]), self.dtype,
                               self.offset + start * row_bytes, self.bound)
        raise IndexError(f"DeviceArray supports integer or slice indexing on the first axis, not {key!r}")

    def numpy(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        if out.size:
            n = native()
            n.call("dg_download", n.host("void *", out), n.ptr("void *", self.address), out.nbytes)
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self.numpy()
        return out if dtype is None else out.astype(dtype)

    def __float__(self) -> float:
        if self.size != 1:
            raise TypeError("only size-1 arrays convert to float")
        return float(self.numpy().reshape(-1)[0])

    def __add__(self, other: DeviceArray) -> DeviceArray:
        _require_float(self, other)
        if other.shape != self.shape:
            raise ValueError(f"cannot add shapes {self.shape} and {other.shape}")
        out = DeviceArray.empty(self.shape)
        n = native()
        n.call("dg_add", _f(self), _f(other), self.size, _f(out))
        return out

    def __mul__(self, other: DeviceArray) -> DeviceArray:
        """Elementwise with the same shape, or broadcast of a last-axis vector or a one-element array."""
        _require_float(self, other)
        if other.shape == self.shape:
            period = self.size
        elif other.size == 1 or (other.ndim == 1 and self.ndim and other.shape[0] == self.shape[-1]):
            period = other.size
        else:
            raise ValueError(f"cannot multiply shapes {self.shape} and {other.shape}")
        out = DeviceArray.empty(self.shape)
        if self.size:
            native().call("dg_mul_bcast", _f(self), _f(other), self.size, period, _f(out))
        return out

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype})"


def _f(a: DeviceArray) -> Any:
    return native().ptr("float *", a.address)


def _i(a: DeviceArray) -> Any:
    return native().ptr("int32_t *", a.address)


def _require_float(*arrays: Any) -> None:
    for a in arrays:
        if not isinstance(a, DeviceArray) or a.dtype != np.float32:
            raise TypeError(f"expected a float32 DeviceArray, got {type(a).__name__}"
                            f"{'' if not isinstance(a, DeviceArray) else ' of ' + str(a.dtype)}")


def _require_k_slices(what: str, k: int) -> None:
    """The matmul kernels step through the reduced dimension K_SLICE values at a time."""
    if k % K_SLICE:
        raise ValueError(f"the cuda backend needs a {what} that is a multiple of {K_SLICE}, not {k}")


@dataclass
class CudaWeight:
    """A tensor as stored in the file: its raw blocks on the device (2-D and up) or on the host (1-D)."""

    ggml_type: T
    shape: tuple[int, ...]
    row_bytes: int
    tensor_scale: float | None
    device: _Buffer | None
    host_raw: np.ndarray | None

    @property
    def address(self) -> int:
        assert self.device is not None, "1-D weights stay on the host (use CudaBackend.vector)"
        return self.device.address

    @property
    def scale_arg(self) -> float:
        return 1.0 if self.tensor_scale is None else self.tensor_scale

    @functools.cached_property
    def max_row_norm(self) -> float:
        """As `numpy_backend.Weight.max_row_norm`, computed on the device the first time it is asked."""
        n = native()
        out = np.zeros(1, np.float64)
        n.call("dg_max_row_norm", n.ptr("void *", self.address), int(self.ggml_type), self.row_bytes,
               self.scale_arg, self.shape[0], math.prod(self.shape[1:]), n.host("double *", out))
        return float(np.nextafter(out[0], np.inf))


@dataclass
class RowStats:
    """A [rows, vocab] array's softmax statistics on the device (`dg_row_stats`): what the soft embedding reads."""

    row_max: DeviceArray
    row_total: DeviceArray
    mass: DeviceArray
    kept_n: DeviceArray
    kept: DeviceArray

    @classmethod
    def empty(cls, rows: int) -> RowStats:
        return cls(DeviceArray.empty((rows,)), DeviceArray.empty((rows,)), DeviceArray.empty((rows,)),
                   DeviceArray.empty((rows,), np.int32), DeviceArray.empty((rows, SPARSE_MAX_KEPT), np.int32))

    def args(self) -> tuple[Any, ...]:
        return _f(self.row_max), _f(self.row_total), _f(self.mass), _i(self.kept_n), _i(self.kept)


class CudaBackend:
    """The backend op interface on an NVIDIA GPU (see `dgrun.backends`); RuntimeError when it cannot start."""

    name = "cuda"
    supported_types = SUPPORTED_TYPES
    k_multiple = K_SLICE  # what a matmul's reduced dimension must be a multiple of (LoRA ranks are padded to it)

    def __init__(self, poison_outputs: bool = False):
        self.native = native()
        self.native.poison = poison_outputs
        self.matmul = os.environ.get("DGRUN_CUDA_MATMUL", "auto")
        if self.matmul not in ("auto", "fp32", "tf32"):
            raise RuntimeError(f"DGRUN_CUDA_MATMUL must be auto, fp32 or tf32, not {self.matmul!r}")
        sync = os.environ.get("DGRUN_CUDA_SYNC", "0").strip() or "0"
        if sync not in ("0", "1"):
            raise RuntimeError(f"DGRUN_CUDA_SYNC must be 0 or 1, not {sync!r}")
        # 1: every kernel is waited for as it is queued, so an asynchronous fault is reported under its own name
        # instead of the next call's (slow: for a first run on a new GPU or driver). Process-wide.
        self.native.call("dg_set_launch_sync", int(sync))
        # DefaultRng → [Philox key, next step]; weak so a finished generation's state goes with its RNG.
        self._philox: weakref.WeakKeyDictionary[DefaultRng, list[int]] = weakref.WeakKeyDictionary()
        # Recent position uploads (the same few arrays serve every layer of a pass).
        self._positions: OrderedDict[bytes, DeviceArray] = OrderedDict()
        # The last sampler step's processed logits (weakly) and their row statistics, for the soft embedding.
        self._stats: tuple[weakref.ref[DeviceArray], RowStats] | None = None
        self.soft_embed_paths: np.ndarray | None = None

    # -- weights ------------------------------------------------------------------------------------

    def load_weights(self, gguf: GGUFFile, names: list[str]) -> dict[str, CudaWeight]:
        """Upload every named tensor once, in its block type; 1-D tensors stay on the host for `vector`."""
        infos = [gguf.tensors[name] for name in names]
        device_bytes = sum(info.nbytes for info in infos if len(info.shape) > 1)
        if device_bytes > 0.95 * self.native.total_bytes:
            raise RuntimeError(f"the weights need {device_bytes / 2**30:.1f} GiB but "
                               f"{self.native.device_name} has {self.native.total_bytes / 2**30:.1f} GiB")
        weights = {}
        for name, info in zip(names, infos, strict=True):
            scale = None
            if info.ggml_type == T.NVFP4:
                scale_name = f"{name}.scale"
                scale = float(gguf.array(scale_name).reshape(-1)[0]) if scale_name in gguf.tensors else 1.0
            try:
                weights[name] = self.weight(gguf.raw(name), info.ggml_type, info.shape, scale)
            except ValueError as e:
                raise ValueError(f"tensor {name}: {e}") from None
        return weights

    def weight(self, raw: np.ndarray, ggml_type: T, shape: tuple[int, ...],
               tensor_scale: float | None = None) -> CudaWeight:
        """A tensor from its raw uint8 blocks: uploaded as is when 2-D or more, kept on the host when 1-D."""
        ggml_type = T(ggml_type)
        if ggml_type not in SUPPORTED_TYPES:
            raise ValueError(f"the cuda backend cannot run type {ggml_type.name}")
        row_bytes = quants.row_bytes(ggml_type, shape[-1])
        raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
        if raw.nbytes != math.prod(shape[:-1]) * row_bytes:
            raise ValueError(f"{raw.nbytes} bytes do not match shape {shape} of {ggml_type.name}")
        if ggml_type == T.NVFP4:
            if tensor_scale is None or not (math.isfinite(tensor_scale) and tensor_scale > 0):
                raise ValueError(f"NVFP4 tensor scale {tensor_scale!r} must be finite and > 0")
        elif tensor_scale is not None:
            raise ValueError(f"{ggml_type.name} takes no tensor scale")
        if len(shape) == 1:
            return CudaWeight(ggml_type, tuple(shape), row_bytes, tensor_scale, None, raw)
        buffer = _Buffer(raw.nbytes)
        n = self.native
        n.call("dg_upload", n.ptr("void *", buffer.address), n.host("void *", raw), raw.nbytes,
               what="weight upload")
        return CudaWeight(ggml_type, tuple(shape), row_bytes, tensor_scale, buffer, None)

    def vector(self, w: CudaWeight) -> DeviceArray:
        """A small 1-D tensor (norm weight, scale) as float32 on the device."""
        if w.host_raw is None:
            raise ValueError(f"vector() takes a 1-D weight, not shape {w.shape}")
        return self.asarray(quants.dequantize_tensor(w.host_raw, w.ggml_type, w.tensor_scale).reshape(-1))

    def _engine(self, w: CudaWeight) -> int:
        if self.matmul == "fp32" or (self.matmul == "auto" and w.ggml_type == T.F32):
            return ENGINE_FP32
        # TF32 tensor cores start with compute capability 8.0 (Ampere); older GPUs multiply in float32.
        return ENGINE_TF32 if self.native.compute_capability >= (8, 0) else ENGINE_FP32

    # -- arrays -------------------------------------------------------------------------------------

    def asarray(self, x: np.ndarray) -> DeviceArray:
        return DeviceArray.from_numpy(np.asarray(x, dtype=np.float32))

    def to_numpy(self, x: DeviceArray | np.ndarray) -> np.ndarray:
        return x.numpy() if isinstance(x, DeviceArray) else np.asarray(x)

    def _device_f32(self, x: DeviceArray | np.ndarray) -> DeviceArray:
        return x if isinstance(x, DeviceArray) else self.asarray(x)

    def _positions_on_device(self, positions: np.ndarray, count: int) -> DeviceArray:
        pos = np.asarray(positions)
        if pos.shape != (count,) or not np.issubdtype(pos.dtype, np.integer):
            raise ValueError(f"positions must be {count} integers, got shape {pos.shape} {pos.dtype}")
        if count and (pos.min() < 0 or pos.max() >= 2**31):
            raise ValueError("positions must lie in [0, 2**31)")
        pos32 = np.ascontiguousarray(pos, dtype=np.int32)
        key = pos32.tobytes()
        cached = self._positions.get(key)
        if cached is None:
            cached = self._positions[key] = DeviceArray.from_numpy(pos32)
            if len(self._positions) > 64:  # a batched pass uses 1 + 3 per element (rope; queries, two key sets)
                self._positions.popitem(last=False)
        else:
            self._positions.move_to_end(key)
        return cached

    # -- elementwise and normalisation ---------------------------------------------------------------

    def rms_norm(self, x: DeviceArray, weight: DeviceArray | None, eps: float) -> DeviceArray:
        _require_float(x)
        width = x.shape[-1]
        if weight is not None:
            _require_float(weight)
            if weight.shape != (width,):
                raise ValueError(f"rms_norm weight {weight.shape} does not match rows of {width}")
        out = DeviceArray.empty(x.shape)
        w = self.native.ptr("float *", 0) if weight is None else _f(weight)
        self.native.call("dg_rms_norm", _f(x), w, x.size // width if width else 0, width, float(eps), _f(out))
        return out

    def softcap(self, x: DeviceArray, cap: float) -> DeviceArray:
        _require_float(x)
        if not cap > 0:
            raise ValueError(f"softcap must be > 0, got {cap}")
        out = DeviceArray.empty(x.shape)
        self.native.call("dg_softcap", _f(x), x.size, float(cap), _f(out))
        return out

    def concat(self, *arrays: DeviceArray) -> DeviceArray:
        """The arrays one after another along the first axis (a single array is returned as is)."""
        first = arrays[0]
        for a in arrays[1:]:
            if a.shape[1:] != first.shape[1:] or a.dtype != first.dtype:
                raise ValueError(f"cannot concatenate {first.shape} {first.dtype} and {a.shape} {a.dtype}")
        if len(arrays) == 1:
            return first
        out = DeviceArray.empty((sum(a.shape[0] for a in arrays), *first.shape[1:]), first.dtype)
        n, offset = self.native, 0
        for a in arrays:
            if a.nbytes:
                n.call("dg_copy", n.ptr("void *", out.address + offset), n.ptr("void *", a.address), a.nbytes)
            offset += a.nbytes
        return out

    # -- embeddings and matmuls ----------------------------------------------------------------------

    def embed(self, table: CudaWeight, ids: np.ndarray, scale: float) -> DeviceArray:
        ids = np.asarray(ids)
        vocab, width = table.shape
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be a 1-D integer array, got {ids.shape} {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab})")
        ids_dev = DeviceArray.from_numpy(ids.astype(np.int32))
        out = DeviceArray.empty((len(ids), width))
        n = self.native
        n.call("dg_embed", n.ptr("void *", table.address), int(table.ggml_type), table.row_bytes,
               table.scale_arg, width, _i(ids_dev), len(ids), float(scale), _f(out))
        return out

    def soft_embed(self, logits: DeviceArray | np.ndarray, table: CudaWeight, scale: float) -> DeviceArray:
        """softmax(logits) @ table * scale: the self-conditioning soft embedding (table left in blocks), sparse
        where a row's mass sits on a few tokens (`numpy_backend.sparse_soft_embed_row`); the sampler step's row
        statistics when `logits` are its processed logits. `soft_embed_paths`: per row, the tokens gathered
        (-1: the dense product)."""
        vocab, width = table.shape
        stats = self._stats[1] if self._stats is not None and self._stats[0]() is logits else None
        logits = self._device_f32(logits)
        if logits.ndim != 2 or logits.shape[1] != vocab:
            raise ValueError(f"soft_embed logits {logits.shape} do not match a vocabulary of {vocab}")
        _require_k_slices("vocabulary size", vocab)
        rows = logits.shape[0]
        n = self.native
        if stats is None:
            stats = RowStats.empty(rows)
            n.call("dg_row_stats", _f(logits), rows, vocab, float(SPARSE_KEEP_LOGIT), SPARSE_MAX_KEPT, *stats.args())
        out = DeviceArray.empty((rows, width))
        paths = np.empty(rows, np.int32)
        # Sparse when mass * (1 + margin) * scale * R <= (u / 2) ||y'||: numpy_backend.sparse_soft_embed_row.
        rel_tol = 0.5 * FLOAT32_UNIT_ROUNDOFF / SPARSE_MASS_MARGIN
        n.call("dg_soft_embed", _f(logits), rows, vocab, *stats.args(), SPARSE_MAX_KEPT,
               n.ptr("void *", table.address), int(table.ggml_type), table.row_bytes, table.scale_arg, width,
               float(scale), float(scale) * table.max_row_norm, rel_tol, _f(out), n.host("int32_t *", paths),
               self._engine(table))
        self.soft_embed_paths = paths.astype(np.int64)
        return out

    def linear(self, x: DeviceArray, w: CudaWeight) -> DeviceArray:
        """x @ W^T for a [out, in] weight, over any leading shape of x."""
        _require_float(x)
        if len(w.shape) != 2 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"linear: input {x.shape} does not match weight {w.shape}")
        _require_k_slices("linear input width", w.shape[1])
        rows = x.size // w.shape[1]
        out = DeviceArray.empty((*x.shape[:-1], w.shape[0]))
        self.native.call("dg_linear", _f(x), rows, w.shape[1], self.native.ptr("void *", w.address),
                         int(w.ggml_type), w.row_bytes, w.scale_arg, w.shape[0], _f(out), self._engine(w))
        return out

    def logits(self, x: DeviceArray, w: CudaWeight, cap: float) -> DeviceArray:
        """softcap(x @ W^T, cap), soft-capped in place: one canvas x vocab array."""
        if not cap > 0:
            raise ValueError(f"softcap must be > 0, got {cap}")
        out = self.linear(x, w)
        self.native.call("dg_softcap", _f(out), out.size, float(cap), _f(out))
        return out

    def gelu_mul(self, gate: DeviceArray, up: DeviceArray) -> DeviceArray:
        """gelu_tanh(gate) * up: the gated MLP's middle."""
        _require_float(gate, up)
        if gate.shape != up.shape:
            raise ValueError(f"gelu_mul: gate {gate.shape} and up {up.shape} differ")
        out = DeviceArray.empty(gate.shape)
        self.native.call("dg_gelu_mul", _f(gate), _f(up), gate.size, _f(out))
        return out

    def gated_mlp(self, x: DeviceArray, gate: CudaWeight, up: CudaWeight, down: CudaWeight) -> DeviceArray:
        return self.linear(self.gelu_mul(self.linear(x, gate), self.linear(x, up)), down)

    # -- positions and attention ---------------------------------------------------------------------

    def rope(self, x: DeviceArray, positions: np.ndarray, inv_freq: DeviceArray) -> DeviceArray:
        """Rotate-half RoPE on [n, heads, head_dim]; zero frequencies (proportional RoPE) pass through."""
        _require_float(x, inv_freq)
        if x.ndim != 3 or x.shape[2] % 2 or inv_freq.shape != (x.shape[2] // 2,):
            raise ValueError(f"rope: x {x.shape} and inv_freq {inv_freq.shape} do not fit")
        pos = self._positions_on_device(positions, x.shape[0])
        out = DeviceArray.empty(x.shape)
        self.native.call("dg_rope", _f(x), _i(pos), _f(inv_freq), *x.shape, _f(out))
        return out

    def attention(
        self,
        q: DeviceArray,
        k: DeviceArray,
        v: DeviceArray,
        q_pos: np.ndarray,
        k_pos: np.ndarray,
        causal: bool,
        window: int | None,
    ) -> DeviceArray:
        """Softmax(q k^T) v with scaling 1.0, grouped KV heads and position masks (see numpy_backend)."""
        _require_float(q, k, v)
        n, heads, d = q.shape
        if k.ndim != 3 or k.shape != v.shape or k.shape[2] != d or heads % k.shape[1]:
            raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit")
        if d > MAX_HEAD_DIM:
            raise ValueError(f"attention: head_dim {d} exceeds the cuda backend's limit of {MAX_HEAD_DIM}")
        if window is not None and window <= 0:
            raise ValueError(f"attention window must be positive, got {window}")
        qp, kp = self._positions_on_device(q_pos, n), self._positions_on_device(k_pos, k.shape[0])
        out = DeviceArray.empty(q.shape)
        self.native.call("dg_attention", _f(q), _f(k), _f(v), _i(qp), _i(kp), n, k.shape[0], heads,
                         k.shape[1], d, int(causal), 0 if window is None else int(window), _f(out))
        return out

    # -- mixture of experts -----------------------------------------------------------------------------

    def route(
        self, x: DeviceArray, proj: CudaWeight, scale: DeviceArray, per_expert_scale: DeviceArray, top_k: int,
        eps: float,
    ) -> tuple[DeviceArray, DeviceArray]:
        """Router: unscaled RMSNorm, * scale * hidden^-0.5, softmax, top-k renormalised, per-expert scale."""
        n_experts = proj.shape[0]
        if not 0 < n_experts <= MAX_EXPERTS or not 0 < top_k <= min(32, n_experts):
            raise ValueError(f"route: {n_experts} experts / top_k {top_k} outside the cuda backend's limits")
        if per_expert_scale.shape != (n_experts,):
            raise ValueError(f"route: per-expert scale {per_expert_scale.shape} for {n_experts} experts")
        h = self.rms_norm(x, None, eps) * scale
        scaled = DeviceArray.empty(h.shape)
        self.native.call("dg_scale", _f(h), float(np.float32(x.shape[-1] ** -0.5)), h.size, _f(scaled))
        logits = self.linear(scaled, proj)
        rows = logits.size // n_experts
        weights = DeviceArray.empty((rows, top_k))
        index = DeviceArray.empty((rows, top_k), np.int32)
        self.native.call("dg_route_topk", _f(logits), rows, n_experts, top_k, _f(per_expert_scale),
                         _f(weights), _i(index))
        index.bound = n_experts
        return weights, index

    def experts(
        self, x: DeviceArray, weights: DeviceArray, index: DeviceArray, gate_up: CudaWeight, down: CudaWeight
    ) -> DeviceArray:
        """Sum over each token's experts of weight * down(gelu(gate(x)) * up(x)), tokens grouped by expert."""
        _require_float(x, weights)
        n_experts, two_inter, hidden = gate_up.shape
        inter = two_inter // 2
        if x.ndim != 2 or x.shape[1] != hidden or down.shape != (n_experts, hidden, inter) or two_inter % 2:
            raise ValueError(f"experts: x {x.shape}, gate_up {gate_up.shape}, down {down.shape} do not fit")
        _require_k_slices("hidden size", hidden)
        _require_k_slices("expert width", inter)
        if index.dtype != np.int32 or index.bound != n_experts or index.shape != weights.shape or \
                index.shape[0] != x.shape[0]:
            raise ValueError("experts: index must be the router's [tokens, top_k] output for these experts")
        out = DeviceArray.empty(x.shape)
        n = self.native
        n.call("dg_experts", _f(x), x.shape[0], hidden, _f(weights), _i(index), index.shape[1], n_experts,
               n.ptr("void *", gate_up.address), int(gate_up.ggml_type), gate_up.row_bytes, gate_up.scale_arg,
               inter, n.ptr("void *", down.address), int(down.ggml_type), down.row_bytes, down.scale_arg,
               _f(out), self._engine(gate_up))
        return out

    # -- sampler ------------------------------------------------------------------------------------------

    def _philox_state(self, rng: DefaultRng) -> list[int]:
        """[key, next step] for this RNG: the key comes from its seed through numpy's SeedSequence."""
        state = self._philox.get(rng)
        if state is None:
            seed_seq = getattr(rng.generator.bit_generator, "seed_seq", None)
            entropy = getattr(seed_seq, "entropy", None)
            if entropy is None:  # not seeded through a SeedSequence: take the key from its stream instead
                entropy = int(rng.generator.integers(0, 2**63))
            words = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
            state = self._philox[rng] = [int(words[0]) | int(words[1]) << 32, 0]
        return state

    def denoise_step(
        self,
        logits: DeviceArray | np.ndarray,
        canvas: np.ndarray,
        temp: float,
        entropy_bound: float,
        rng: Rng,
        clamp: np.ndarray | None = None,
    ) -> sampler.StepResult:
        """One sampler step. With a DefaultRng it runs on the device and `logits` become the processed logits
        (divided by `temp`, in place); any other Rng runs the numpy sampler on a host copy."""
        if type(rng) is not DefaultRng:
            return sampler.denoise_step(self.to_numpy(logits), canvas, temp, entropy_bound, rng, clamp)
        logits = self._device_f32(logits)
        if logits.ndim != 2 or not 0 < logits.shape[0] <= MAX_CANVAS:
            raise ValueError(f"the cuda sampler takes [canvas, vocab] logits with 1..{MAX_CANVAS} canvas "
                             f"positions, not {logits.shape}")
        rows, vocab = logits.shape
        canvas = np.asarray(canvas)
        if canvas.shape != (rows,) or not np.issubdtype(canvas.dtype, np.integer):
            raise ValueError(f"canvas must be {rows} integer ids, got {canvas.shape} {canvas.dtype}")
        if canvas.min() < 0 or canvas.max() >= vocab:
            raise ValueError(f"canvas ids must lie in [0, {vocab})")
        if not (math.isfinite(temp) and temp > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temp}")
        n = self.native
        canvas_dev = DeviceArray.from_numpy(canvas.astype(np.int32))
        clamp_dev = None
        if clamp is not None:
            clamp = np.asarray(clamp, dtype=bool)
            if clamp.shape != (rows,):
                raise ValueError(f"clamp must have {rows} entries, got {clamp.shape}")
            clamp_dev = _upload_bytes(clamp.astype(np.uint8))
        state = self._philox_state(rng)
        out = np.empty(3 * rows + 1, np.int32)
        clamp_ptr = n.ptr("uint8_t *", 0 if clamp_dev is None else clamp_dev.address)
        stats = RowStats.empty(rows)
        n.call("dg_sample_step", _f(logits), rows, vocab, _i(canvas_dev), clamp_ptr, float(temp),
               float(entropy_bound), state[0], state[1], float(SPARSE_KEEP_LOGIT), SPARSE_MAX_KEPT, *stats.args(),
               n.host("int32_t *", out))
        state[1] += 1
        self._stats = (weakref.ref(logits), stats)
        mean_entropy = float(out[3 * rows:].view(np.float32)[0])
        return sampler.StepResult(out[:rows].astype(np.int64), out[rows:2 * rows].astype(np.int64), logits,
                                  out[2 * rows:3 * rows].astype(bool), mean_entropy)


def _upload_bytes(data: np.ndarray) -> _Buffer:
    """A uint8 host array copied to a fresh device buffer."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    buffer = _Buffer(max(1, data.nbytes))
    n = native()
    n.call("dg_upload", n.ptr("void *", buffer.address), n.host("void *", data), data.nbytes)
    return buffer
