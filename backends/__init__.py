"""Compute backends for dgrun, each one module behind one small op interface.

A backend provides `load_weights` (weights stay in their .dgf types) and `weight` (one tensor from its stored
bytes: LoRA halves, merged weights), the graph ops (`embed`, `soft_embed`, `rms_norm`, `linear`, `gelu_mul`,
`gated_mlp`, `rope`, `attention`, `route`, `experts`, `softcap`, `logits`, `concat`, `vector`, `asarray`,
`to_numpy`), the sampler step (`denoise_step`) and `supported_types`, the ggml tensor types it can run; optionally
`k_multiple`, what every matmul's reduced dimension must be a multiple of (LoRA ranks are padded to it). `numpy`
is the reference; every other backend is tested against it. `attention` takes key positions in ascending order
(the model's cache always is) and may visit only the keys each block of queries can see. `denoise_step` may
overwrite its `logits` with the processed logits (cpu and cuda do: a canvas x vocab array saved per step).

Every op is row-independent: a row's (token's) result is the same bits whatever other rows share the call, so
a batch's elements get exactly the tokens they get alone (`DiffusionGemma.decode_batch`). A kernel that
switches code paths, blocking or split-K on the number of rows, or lets one row's expert grouping change the
order of another's sums, breaks that; tests/test_batch.py checks each op with rows in calls of several sizes.
`attention`, `soft_embed` and `denoise_step` are called per element (one canvas), so they need only be
deterministic.
"""

from __future__ import annotations

import importlib
import platform
import sys
from typing import Any

# name → (module, class, how to get it when it is missing)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "numpy": ("dgrun.backends.numpy_backend", "NumpyBackend", "always available"),
    "cpu": ("dgrun.backends.cpu_backend", "CpuBackend",
            "needs the native CPU kernels: reinstall with a C compiler available (pip install .)"),
    "cuda": ("dgrun.backends.cuda_backend", "CudaBackend",
             "needs an NVIDIA GPU and the native extension: reinstall with nvcc on PATH (pip install .)"),
    "mlx": ("dgrun.backends.mlx_backend", "MlxBackend", "needs the mlx package: pip install 'dgrun[mlx]'"),
}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine; the message says how to get it."""


def _auto_order() -> list[str]:
    order = ["cuda"]
    if sys.platform == "darwin" and platform.machine() == "arm64":
        order.append("mlx")
    return [*order, "cpu", "numpy"]


def get_backend(name: str = "auto") -> Any:
    """An instance of the named backend; "auto" picks the fastest one that works here. Never falls back silently."""
    if name == "auto":
        for candidate in _auto_order():
            try:
                return get_backend(candidate)
            except BackendUnavailable:
                continue
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r} (choose from auto, {', '.join(BACKENDS)})")
    module_name, class_name, hint = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
        return getattr(module, class_name)()
    except (ImportError, OSError, RuntimeError) as e:
        raise BackendUnavailable(f"backend {name} is not available here ({e}); {hint}") from None


def available_backends() -> list[str]:
    """Names of the backends that start on this machine."""
    out = []
    for name in BACKENDS:
        try:
            get_backend(name)
            out.append(name)
        except BackendUnavailable:
            pass
    return out
