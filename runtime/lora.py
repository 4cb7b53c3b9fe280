"""LoRA adapters in llama.cpp's adapter GGUF convention, applied to a loaded model pass by pass.

An adapter file (`convert-lora-to-dgf` writes them) is a GGUF file with `general.type = "adapter"`,
`adapter.type = "lora"`, `adapter.lora.alpha` and the base's `general.architecture`; for each adapted matrix it
holds `<name>.lora_a` [r, in] and `<name>.lora_b` [out, r] (numpy order, PEFT's layout, as llama.cpp stores them).
A term's scale is the user's scale x alpha / r (r from lora_b), or the user's scale alone when alpha is 0 or
absent, as llama.cpp's `llama-adapter.cpp` computes it.

The catch of this model: encoder and decoder share every layer weight, but PEFT wraps each copy's modules on its
own, so an adapter carries *different* deltas for the two. Merging both into one shared weight is wrong; the
encoder's deltas belong to encoder passes and the decoder's to decoder passes. The file keeps them apart by name:
the decoder's under the base names (`blk.N.attn_q.weight`), the encoder's under gguf-py's encoder names
(`enc.blk.N.attn_q.weight`; the output projection is `enc.blk.N.attn_o.weight`, as gguf-py names T5's), the
decoder-only self-conditioning MLP's under `self_cond_{gate,up,down}.weight`.

Deltas are applied unmerged, y = W x + scale * B (A x), so a quantized base stays quantized; `merge=True` instead
adds them into float32 copies of a float base's weights at load, one copy per pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES
from gguf import GGMLQuantizationType as T

from dgrun import quants
from dgrun.config import ARCH, ModelConfig
from dgrun.format import FormatError, GGUFFile
from dgrun.model import tensor_shapes

ALPHA_KEY = "adapter.lora.alpha"
SUFFIXES = (".lora_a", ".lora_b")
# What convert-lora-to-dgf also records, for `dgrun info` (the runtime reads only llama.cpp's keys).
PEFT_ALPHA_KEY, RSLORA_KEY = "dgrun.lora.peft_alpha", "dgrun.lora.use_rslora"

# The linears of a layer an adapter may adapt (.dgf name between "blk.N." and ".weight"), with gguf-py's name for
# the encoder's copy; and the decoder-only self-conditioning MLP. Nothing else (router, experts, embedding,
# output) takes a delta.
LAYER_TARGETS: dict[str, MODEL_TENSOR] = {
    "attn_q": MODEL_TENSOR.ENC_ATTN_Q, "attn_k": MODEL_TENSOR.ENC_ATTN_K, "attn_v": MODEL_TENSOR.ENC_ATTN_V,
    "attn_output": MODEL_TENSOR.ENC_ATTN_OUT, "ffn_gate": MODEL_TENSOR.ENC_FFN_GATE,
    "ffn_up": MODEL_TENSOR.ENC_FFN_UP, "ffn_down": MODEL_TENSOR.ENC_FFN_DOWN,
}
SELF_COND_TARGETS = ("self_cond_gate.weight", "self_cond_up.weight", "self_cond_down.weight")
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_FLOAT_TYPES = (T.F32, T.F16, T.BF16)

LoraSpec = str | Path | tuple[str | Path, float]


def adapter_name(base: str, encoder: bool) -> str:
    """The name an adapter file gives the delta of the .dgf matrix `base` in one pass (before `.lora_a/b`)."""
    if not encoder:
        return base
    match = _LAYER_NAME.fullmatch(base)
    assert match is not None and match.group(2) in LAYER_TARGETS, f"{base} has no encoder copy"
    return TENSOR_NAMES[LAYER_TARGETS[match.group(2)]].format(bid=match.group(1)) + ".weight"


def targets(cfg: ModelConfig) -> dict[str, tuple[bool, str]]:
    """Every name an adapter may adapt for this config → (encoder pass?, the .dgf matrix it adds to)."""
    out: dict[str, tuple[bool, str]] = {}
    for name in tensor_shapes(cfg):
        match = _LAYER_NAME.fullmatch(name)
        if name in SELF_COND_TARGETS:
            out[name] = (False, name)
        elif match and match.group(2) in LAYER_TARGETS:
            out[name] = (False, name)
            out[adapter_name(name, True)] = (True, name)
    return out


def scale_factor(alpha: float, rank: int) -> float:
    """alpha / r, or 1 when the file has no alpha (llama.cpp's rule)."""
    return alpha / rank if alpha else 1.0


@dataclass(frozen=True)
class LoraPair:
    """One delta: the pass it belongs to, the .dgf matrix it adds to, its two tensors in the file and its rank."""

    encoder: bool
    base: str
    a: str
    b: str
    rank: int


class LoraAdapter:
    """One adapter file, opened (memory-mapped) and checked against a base model's config.

    Every problem is a `FormatError` naming the file: not a LoRA adapter, another architecture, a tensor that adapts
    nothing this graph has (expert deltas included), a half pair, or shapes that do not fit the base.
    """

    def __init__(self, path: str | Path, cfg: ModelConfig):
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        try:
            self.alpha, self.pairs = _check(self.file, targets(cfg), tensor_shapes(cfg))
        except FormatError as e:
            self.file.close()
            raise FormatError(f"{self.path}: {e}") from None

    def close(self) -> None:
        self.file.close()


def _check(gguf: GGUFFile, allowed: dict[str, tuple[bool, str]],
           shapes: dict[str, tuple[int, ...]]) -> tuple[float, list[LoraPair]]:
    kind, adapter_type, arch = (gguf.get(k) for k in ("general.type", "adapter.type", "general.architecture"))
    if kind != "adapter" or adapter_type != "lora":
        raise FormatError(f"not a LoRA adapter (general.type {kind!r}, adapter.type {adapter_type!r}; expected "
                          "'adapter' and 'lora')")
    if arch != ARCH:
        raise FormatError(f"the adapter is for architecture {arch!r}, the model is {ARCH!r}")
    alpha = gguf.get(ALPHA_KEY, 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise FormatError(f"{ALPHA_KEY} must be a finite number >= 0, got {alpha!r}")
    halves: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, info in gguf.tensors.items():
        target, suffix = name[:-len(".lora_a")], name[-len(".lora_a"):]
        if suffix not in SUFFIXES:
            raise FormatError(f"tensor {name} is not a LoRA half (<name>.lora_a / <name>.lora_b)")
        if len(info.shape) != 2:
            raise FormatError(f"tensor {name} is {len(info.shape)}-D: expert deltas (3-D) and other non-matrix deltas "
                              "are not supported")
        if target not in allowed:
            raise FormatError(f"tensor {name} adapts {target}, which is not a linear dgrun's DiffusionGemma graph "
                              "adapts (attention and dense-MLP projections, self-conditioning MLP)")
        halves.setdefault(target, {})[suffix] = tuple(info.shape)
    if not halves:
        raise FormatError("the adapter has no LoRA tensors")
    pairs = []
    for target, half in halves.items():
        if len(half) != 2:
            missing = next(s for s in SUFFIXES if s not in half)
            raise FormatError(f"tensor {target}{missing} is missing (every delta needs lora_a and lora_b)")
        encoder, base = allowed[target]
        (rank, width), (out, rank_b) = half[".lora_a"], half[".lora_b"]
        if rank != rank_b or (out, width) != shapes[base]:
            raise FormatError(f"{target}: lora_a {half['.lora_a']} and lora_b {half['.lora_b']} do not fit the base's "
                              f"{shapes[base]} (expected [r, {shapes[base][1]}] and [{shapes[base][0]}, r])")
        pairs.append(LoraPair(encoder, base, target + ".lora_a", target + ".lora_b", rank))
    return float(alpha), pairs


def describe(gguf: GGUFFile) -> dict[str, Any]:
    """What `dgrun info` says about an adapter file, without a base: alpha, ranks, and how many deltas go to the
    decoder, the encoder and the self-conditioning MLP."""
    count = {"decoder": 0, "encoder": 0, "self_conditioning": 0}
    ranks: set[int] = set()
    for name, info in gguf.tensors.items():
        if name.endswith(".lora_b"):
            ranks.add(int(info.shape[-1]))
            side = "encoder" if name.startswith("enc.") else "self_conditioning" if name.startswith(
                "self_cond_") else "decoder"
            count[side] += 1
    return {"adapter_type": gguf.get("adapter.type"), "alpha": gguf.get(ALPHA_KEY), "ranks": sorted(ranks),
            "deltas": count, "peft_alpha": gguf.get(PEFT_ALPHA_KEY), "use_rslora": gguf.get(RSLORA_KEY)}


def parse_specs(lora: Sequence[LoraSpec] | None) -> list[tuple[Path, float]]:
    """`dgrun.load`'s `lora=`: paths, or (path, scale) pairs, as [(path, scale)]; a bad entry is a ValueError."""
    out = []
    for spec in lora or ():
        path, scale = spec if isinstance(spec, tuple) else (spec, 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"a LoRA scale must be a finite number, got {scale!r} for {path}")
        out.append((Path(path), float(scale)))
    return out


class LoraSet:
    """The adapters applied to one model, and what the graph multiplies for each matrix in each pass.

    `for_pass(name, encoder)` gives (the weight, [(A, B, scale), ...]): the base weight and the unmerged terms of
    every adapter with a delta for that matrix in that pass and a non-zero scale; or, when merged, the pass's own
    merged weight and no terms. Every element of a batch shares them: adapters belong to the model.
    """

    def __init__(self, adapters: list[LoraAdapter], scales: list[float], backend: Any, weights: dict[str, Any],
                 base: GGUFFile, merge: bool = False):
        self.adapters, self.scales, self.merged = adapters, list(scales), merge
        self._backend, self._weights = backend, weights
        for adapter in adapters:
            bad = {adapter.file.tensors[n].ggml_type.name for p in adapter.pairs for n in (p.a, p.b)
                   if adapter.file.tensors[n].ggml_type not in backend.supported_types}
            if bad:
                raise FormatError(f"{adapter.path}: backend {backend.name} cannot run tensor types {sorted(bad)}")
        self._merged: dict[tuple[bool, str], Any] = self._merge(base) if merge else {}
        self._halves = {} if merge else {(i, p): self._load_pair(a, p) for i, a in enumerate(adapters)
                                         for p in a.pairs}
        self._terms: dict[tuple[bool, str], list[tuple[Any, Any, Any]]] = {}
        self.set_scales(self.scales)

    @classmethod
    def load(cls, specs: list[tuple[Path, float]], cfg: ModelConfig, backend: Any, weights: dict[str, Any],
             base: GGUFFile, merge: bool = False) -> LoraSet:
        """Open and check every adapter file against `cfg`, then load its tensors on `backend`."""
        adapters: list[LoraAdapter] = []
        try:
            for path, _ in specs:
                adapters.append(LoraAdapter(path, cfg))
            return cls(adapters, [scale for _, scale in specs], backend, weights, base, merge)
        except BaseException:
            for adapter in adapters:
                adapter.close()
            raise

    def for_pass(self, name: str, encoder: bool) -> tuple[Any, list[tuple[Any, Any, Any]]]:
        key = (encoder, name)
        return self._merged.get(key, self._weights[name]), self._terms.get(key, [])

    def set_scales(self, scales: Sequence[float]) -> None:
        """New user scales, one per adapter (0 disables one); refused once merged."""
        if len(scales) != len(self.adapters):
            raise ValueError(f"{len(scales)} scales for {len(self.adapters)} adapters")
        if self.merged and list(scales) != self.scales:
            raise ValueError("the adapters were merged into the weights at load: their scales cannot change (load "
                             "them unmerged to change scales)")
        terms: dict[tuple[bool, str], list[tuple[Any, Any, Any]]] = {}
        for (index, pair), (a, b) in self._halves.items():
            scale = scales[index] * scale_factor(self.adapters[index].alpha, pair.rank)
            if scale:
                terms.setdefault((pair.encoder, pair.base), []).append(
                    (a, b, self._backend.asarray(np.array([scale], dtype=np.float32))))
        self.scales, self._terms = list(scales), terms  # one assignment: a pass sees the old set or the new

    def _dense(self, adapter: LoraAdapter, name: str) -> np.ndarray:
        info = adapter.file.tensors[name]
        return quants.dequantize_tensor(adapter.file.raw(name), info.ggml_type).reshape(info.shape)

    def _load_pair(self, adapter: LoraAdapter, pair: LoraPair) -> tuple[Any, Any]:
        """lora_a and lora_b on the backend, as stored; a backend whose matmuls need the reduced dimension to be a
        multiple of k (cuda: 32) gets the rank padded with zero rows of A and zero columns of B, whose products
        are exact zeros."""
        multiple = getattr(self._backend, "k_multiple", 1)
        if pair.rank % multiple == 0:
            return tuple(self._backend.weight(adapter.file.raw(n), adapter.file.tensors[n].ggml_type,
                                              adapter.file.tensors[n].shape) for n in (pair.a, pair.b))
        padded = -(-pair.rank // multiple) * multiple
        a, b = self._dense(adapter, pair.a), self._dense(adapter, pair.b)
        a = np.concatenate([a, np.zeros((padded - pair.rank, a.shape[1]), np.float32)])
        b = np.concatenate([b, np.zeros((b.shape[0], padded - pair.rank), np.float32)], axis=1)
        return tuple(self._backend.weight(x.reshape(-1).view(np.uint8), T.F32, x.shape) for x in (a, b))

    def _merge(self, base: GGUFFile) -> dict[tuple[bool, str], Any]:
        """W + sum of scale * B A per (pass, matrix), in float32, for float bases only (a quantized weight would
        have to be requantized, changing the whole matrix)."""
        deltas: dict[tuple[bool, str], list[tuple[LoraAdapter, LoraPair, float]]] = {}
        for adapter, user_scale in zip(self.adapters, self.scales, strict=True):
            for pair in adapter.pairs:
                scale = user_scale * scale_factor(adapter.alpha, pair.rank)
                deltas.setdefault((pair.encoder, pair.base), []).append((adapter, pair, scale))
        merged = {}
        for key, terms in deltas.items():
            info = base.tensors[key[1]]
            if info.ggml_type not in _FLOAT_TYPES:
                raise ValueError(f"merging adapters needs a float base (F32, F16 or BF16): {key[1]} is "
                                 f"{info.ggml_type.name}; load the adapters unmerged instead")
            dense = np.array(quants.dequantize_tensor(base.raw(key[1]), info.ggml_type), np.float32).reshape(info.shape)
            for adapter, pair, scale in terms:
                dense += np.float32(scale) * (self._dense(adapter, pair.b) @ self._dense(adapter, pair.a))
            merged[key] = self._backend.weight(dense.reshape(-1).view(np.uint8), T.F32, dense.shape)
        return merged

    def describe(self) -> list[dict[str, Any]]:
        """Each adapter as `Model.info` and the server's `/lora-adapters` show it."""
        return [{"id": i, "path": str(a.path), "scale": s, "alpha": a.alpha, "ranks": sorted({p.rank for p in a.pairs}),
                 "deltas": len(a.pairs), "merged": self.merged}
                for i, (a, s) in enumerate(zip(self.adapters, self.scales, strict=True))]

    def close(self) -> None:
        for adapter in self.adapters:
            adapter.close()
