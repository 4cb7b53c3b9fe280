"""Model and generation configuration, with Hugging Face key names.

`ModelConfig` is what the model graph needs, named as in transformers' `DiffusionGemmaTextConfig` so a reader
of both can map one onto the other at a glance. It is built either from a checkpoint's `config.json`
(the converter) or from a `.dgf` file's metadata (the runtime); `METADATA_KEYS` is the single table that ties
each field to its GGUF key, used in both directions, and `HF_ATTRIBUTES` ties each field to the attribute of
transformers' parsed config it must equal (tests/test_config.py holds dgrun to it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from dgrun.format import GGUFFile

ARCH = "diffusion-gemma"

# Transformers' `DiffusionGemmaGenerationConfig._get_default_generation_params()`: what `generate` uses
# when neither the caller nor the checkpoint's generation_config.json sets a value.
GLOBAL_GENERATION_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 256,
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}


class ConfigError(ValueError):
    """A checkpoint config or file metadata that does not describe a DiffusionGemma text model we can run."""


@dataclass
class ModelConfig:
    """Hyperparameters of the DiffusionGemma text model (HF `text_config` names, plus `canvas_length`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    global_head_dim: int
    num_global_key_value_heads: int
    layer_types: list[str]
    sliding_window: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    partial_rotary_factor: float = 0.25
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float = 30.0
    max_position_embeddings: int = 131_072
    canvas_length: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"

    @property
    def embed_scale(self) -> float:
        """Gemma scales token embeddings by sqrt(hidden); dgrun computes in float32, so no bf16 rounding."""
        return math.sqrt(self.hidden_size)

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_key_value_heads if self.is_sliding(layer) else self.num_global_key_value_heads

    def validate(self) -> None:
        """Refuse configs the graph cannot run, with a message naming the field."""
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads", "sliding_window",
            "num_experts", "top_k_experts", "moe_intermediate_size", "canvas_length", "max_position_embeddings",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        # Bounds far above any real model: they keep a hostile file from asking for absurd allocations.
        limits = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "num_hidden_layers": 1024,
                  "num_experts": 4096, "canvas_length": 1 << 14, "head_dim": 4096, "global_head_dim": 4096}
        for name, limit in limits.items():
            if getattr(self, name) > limit:
                raise ConfigError(f"config field {name}={getattr(self, name)} exceeds the supported maximum {limit}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = {t for t in self.layer_types if t not in ("sliding_attention", "full_attention")}
        if bad:
            raise ConfigError(f"unknown layer type(s) {sorted(bad)}")
        for heads_name in ("num_key_value_heads", "num_global_key_value_heads"):
            if self.num_attention_heads % getattr(self, heads_name):
                raise ConfigError(f"num_attention_heads must be a multiple of {heads_name}")
        if self.top_k_experts > self.num_experts:
            raise ConfigError("top_k_experts exceeds num_experts")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"unsupported hidden_activation {self.hidden_activation!r}")
        if self.head_dim % 2 or self.global_head_dim % 2:
            raise ConfigError("head dims must be even for RoPE")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModelConfig:
        """Build from a `config.json` of `DiffusionGemmaForBlockDiffusion` (save_pretrained or the release).

        Reads it as transformers 5.23.0's `DiffusionGemmaConfig` does (see `HF_ATTRIBUTES`); a config that
        describes a model the graph cannot run (layers of one attention type that differ from each other, RoPE
        kinds other than transformers' default / proportional ones) is a ConfigError naming what differs.
        """
        if config.get("model_type") != "diffusion_gemma":
            raise ConfigError(
                f"not a DiffusionGemma checkpoint (model_type={config.get('model_type')!r}, "
                f"architectures={config.get('architectures')})")
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config.json has no text_config")
        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError("use_bidirectional_attention='all' (a bidirectional encoder) is not supported")
        if text.get("attention_bias"):
            raise ConfigError("attention_bias=True is not supported")
        n_layers = text.get("num_hidden_layers", 30)
        if not isinstance(n_layers, int) or isinstance(n_layers, bool) or not 0 < n_layers <= 1024:
            raise ConfigError(f"config field num_hidden_layers must be a positive integer, got {n_layers!r}")
        layer_types = list(text.get("layer_types") or [
            "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)])
        if layer_types:
            layer_types[-1] = "full_attention"  # transformers forces the last layer to full attention
        if len(layer_types) != n_layers or not set(layer_types) <= {"sliding_attention", "full_attention"}:
            raise ConfigError(f"layer_types must be {n_layers} entries of sliding_attention / full_attention, "
                              f"got {text.get('layer_types')}")
        sliding, full = _layer_type_attributes(text, layer_types)
        rope = text.get("rope_parameters") or DEFAULT_ROPE_PARAMETERS
        theta, partial = _rope(rope, "full_attention", text)
        local_theta, local_partial = 10_000.0, 1.0  # unused by a model without sliding layers
        if "sliding_attention" in layer_types:
            local_theta, local_partial = _rope(rope, "sliding_attention", text)
        if local_partial != 1.0:  # the graph rotates whole heads on sliding layers
            raise ConfigError(f"sliding-attention RoPE with partial_rotary_factor={local_partial} is not supported")
        softcap = text.get("final_logit_softcapping", 30.0)
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap <= 0:
            raise ConfigError(f"final_logit_softcapping must be a positive number, got {softcap!r}")
        out = cls(
            vocab_size=text.get("vocab_size", 262_144),
            hidden_size=text.get("hidden_size", 2304),
            intermediate_size=text.get("intermediate_size", 9216),
            num_hidden_layers=n_layers,
            num_attention_heads=text.get("num_attention_heads", 8),
            num_key_value_heads=sliding["num_key_value_heads"],
            head_dim=sliding["head_dim"],
            global_head_dim=full["head_dim"],
            num_global_key_value_heads=full["num_key_value_heads"],
            layer_types=layer_types,
            sliding_window=text.get("sliding_window", 512),
            num_experts=text.get("num_experts"),
            top_k_experts=text.get("top_k_experts"),
            moe_intermediate_size=text.get("moe_intermediate_size"),
            rope_theta=theta,
            rope_local_base_freq=local_theta,
            partial_rotary_factor=partial,
            rms_norm_eps=_number("rms_norm_eps", text.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=float(softcap),
            max_position_embeddings=text.get("max_position_embeddings", 131_072),
            canvas_length=config.get("canvas_length", 256),
            hidden_activation=text.get("hidden_activation", "gelu_pytorch_tanh"),
        )
        out.validate()
        return out

    def to_metadata(self) -> dict[str, Any]:
        """GGUF key → value: every name of `METADATA_KEYS` (dgrun's and the llama.cpp fork's), plus per-layer arrays."""
        out: dict[str, Any] = {}
        for entry in METADATA_KEYS:
            for key in entry.keys:
                out[key] = getattr(self, entry.field)
        n = self.num_hidden_layers
        out[_key("attention.sliding_window_pattern")] = [self.is_sliding(i) for i in range(n)]
        out[_key("attention.head_count_kv")] = [self.layer_kv_heads(i) for i in range(n)]
        out[_key("attention.value_length")] = self.global_head_dim
        out[_key("attention.value_length_swa")] = self.head_dim
        out[_key("attention.causal")] = False  # the decoder is bidirectional (the fork reads this)
        # Full layers rotate their whole head with the `rope_freqs` factors (1e30 stops a pair turning), as
        # llama.cpp's Gemma 4 does; see `rope_freqs()`.
        out[_key("rope.dimension_count")] = self.global_head_dim
        out[_key("rope.dimension_count_swa")] = self.head_dim
        return out

    def rope_freqs(self) -> np.ndarray:
        """The `rope_freqs.weight` tensor: proportional RoPE as llama.cpp expresses it.

        ggml rotates pairs (i, i + d/2) at frequency base^(-2i/d) / factor[i]; transformers' proportional RoPE
        rotates the first `partial_rotary_factor * d / 2` pairs at base^(-2i/d) and leaves the rest. Factor 1 on
        the rotated pairs and 1e30 (frequency 0) on the rest say the same thing.
        """
        rotated = int(self.partial_rotary_factor * self.global_head_dim // 2)
        factors = np.full(self.global_head_dim // 2, ROPE_FREQS_UNROTATED, dtype=np.float32)
        factors[:rotated] = 1.0
        return factors

    @classmethod
    def from_file(cls, gguf: GGUFFile) -> ModelConfig:
        """Build from an open file: its metadata plus what other writers leave to the tensors (the vocabulary
        size as `token_embd`'s rows, partial RoPE as `rope_freqs`)."""
        embd = gguf.tensors.get("token_embd.weight")
        rope_freqs = None
        if ROPE_FREQS_TENSOR in gguf.tensors:
            try:
                rope_freqs = gguf.array(ROPE_FREQS_TENSOR)
            except ValueError:
                info = gguf.tensors[ROPE_FREQS_TENSOR]
                raise ConfigError(f"tensor {ROPE_FREQS_TENSOR} is {info.ggml_type.name}, must be F32") from None
        return cls.from_metadata(gguf.metadata, embedding_rows=None if embd is None or len(embd.shape) != 2
                                 else embd.shape[0], rope_freqs=rope_freqs)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], *, embedding_rows: int | None = None,
                      rope_freqs: np.ndarray | None = None) -> ModelConfig:
        """Build from a file's metadata; a missing, mistyped or contradictory key is a ConfigError.

        Reads dgrun's files and the llama.cpp fork's (`METADATA_KEYS` lists both names). What the fork leaves to
        tensors comes as arguments: `embedding_rows` (token_embd's row count) stands for a missing vocab_size, and
        `rope_freqs` (the `rope_freqs.weight` values) for a missing partial_rotary_factor.
        """
        arch = metadata.get("general.architecture")
        if arch != ARCH:
            raise ConfigError(f"general.architecture is {arch!r}, expected {ARCH!r}")
        kwargs: dict[str, Any] = {}
        for entry in METADATA_KEYS:
            present = [(key, _coerce(key, metadata[key], entry.kind)) for key in entry.keys if key in metadata]
            if len({value for _, value in present}) > 1:
                raise ConfigError(f"metadata keys {present[0][0]} and {present[1][0]} disagree "
                                  f"({present[0][1]!r} vs {present[1][1]!r})")
            if present:
                kwargs[entry.field] = present[0][1]
            elif entry.required:
                raise ConfigError(f"metadata key {entry.keys[0]} is missing")
        if "vocab_size" not in kwargs:
            if embedding_rows is None:
                raise ConfigError(f"metadata key {_key('vocab_size')} is missing and there is no token_embd.weight "
                                  "to infer it from")
            kwargs["vocab_size"] = int(embedding_rows)
        n_layers = kwargs["num_hidden_layers"]
        sliding = _sliding_pattern(metadata.get(_key("attention.sliding_window_pattern")), n_layers)
        kwargs["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
        try:
            kv = metadata[_key("attention.head_count_kv")]  # per layer, or one count for all (llama.cpp)
            kv = [kv] * n_layers if isinstance(kv, int) else [int(x) for x in kv]
            kwargs["num_key_value_heads"] = next(k for k, s in zip(kv, sliding, strict=True) if s)
            kwargs["num_global_key_value_heads"] = next(k for k, s in zip(kv, sliding, strict=True) if not s)
        except (KeyError, TypeError, ValueError, StopIteration) as e:
            raise ConfigError(f"metadata key {_key('attention.head_count_kv')} is missing or inconsistent") from e
        if metadata.get(_key("attention.causal"), False) is not False:
            raise ConfigError(f"metadata key {_key('attention.causal')} must be false: DiffusionGemma's decoder "
                              "is bidirectional")
        if rope_freqs is not None:
            factor = _partial_rotary_from_rope_freqs(rope_freqs, kwargs["global_head_dim"])
            half = kwargs["global_head_dim"] / 2  # compare rotated pairs: the key is a float32
            if int(kwargs.setdefault("partial_rotary_factor", factor) * half) != round(factor * half):
                raise ConfigError(f"metadata key {_key('rope.partial_rotary_factor')} is "
                                  f"{kwargs['partial_rotary_factor']} but {ROPE_FREQS_TENSOR} rotates {factor}")
        elif "partial_rotary_factor" not in kwargs:
            raise ConfigError(f"neither metadata key {_key('rope.partial_rotary_factor')} nor tensor "
                              f"{ROPE_FREQS_TENSOR} says how much of the full layers' heads RoPE rotates")
        out = cls(**kwargs)
        out.validate()
        _check_rope_dimensions(metadata, out, rope_freqs is not None)
        return out


def _key(name: str) -> str:
    return f"{ARCH}.{name}"


# transformers' `DiffusionGemmaTextConfig` RoPE when `rope_parameters` is absent.
DEFAULT_ROPE_PARAMETERS: dict[str, dict[str, Any]] = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
# What transformers 5.23.0's DiffusionGemma reads per layer: attention takes `head_dim` and `num_key_value_heads`
# from `per_layer_config[i]`, RoPE takes `head_dim` from the view of each layer type. It reads every other attribute
# from the global config (a per-layer `rope_parameters` even makes its config fail to load), so a per-layer
# override of anything else is refused, never silently dropped.
PER_LAYER_ATTRIBUTES = ("head_dim", "num_key_value_heads")

# ModelConfig field (and the converter's `tie_word_embeddings`) → the attribute of transformers' parsed
# `DiffusionGemmaConfig` (`config`) it is checked against, for every config variant in tests/test_config.py.
# `per_layer_config["<type>"]` is transformers' view of the layers of one attention type (all of them alike).
HF_ATTRIBUTES: dict[str, str] = {
    "vocab_size": "config.text_config.vocab_size",
    "hidden_size": "config.text_config.hidden_size",
    "intermediate_size": "config.text_config.intermediate_size",
    "num_hidden_layers": "config.text_config.num_hidden_layers",
    "num_attention_heads": "config.text_config.num_attention_heads",
    "num_key_value_heads": 'config.text_config.per_layer_config["sliding_attention"].num_key_value_heads',
    "head_dim": 'config.text_config.per_layer_config["sliding_attention"].head_dim',
    "global_head_dim": 'config.text_config.per_layer_config["full_attention"].head_dim',
    "num_global_key_value_heads": 'config.text_config.per_layer_config["full_attention"].num_key_value_heads',
    "layer_types": "config.text_config.layer_types",
    "sliding_window": "config.text_config.sliding_window",
    "num_experts": "config.text_config.num_experts",
    "top_k_experts": "config.text_config.top_k_experts",
    "moe_intermediate_size": "config.text_config.moe_intermediate_size",
    "rope_theta": 'config.text_config.rope_parameters["full_attention"]["rope_theta"]',
    "rope_local_base_freq": 'config.text_config.rope_parameters["sliding_attention"]["rope_theta"]',
    "partial_rotary_factor": 'config.text_config.rope_parameters["full_attention"].get("partial_rotary_factor", 1.0)',
    "rms_norm_eps": "config.text_config.rms_norm_eps",
    "final_logit_softcapping": "config.text_config.final_logit_softcapping",
    "max_position_embeddings": "config.text_config.max_position_embeddings",
    "canvas_length": "config.canvas_length",
    "hidden_activation": "config.text_config.hidden_activation",
    "tie_word_embeddings": "config.tie_word_embeddings",
}
# GenerationConfig field (from generation_config.json) → the attribute of transformers' parsed
# `DiffusionGemmaGenerationConfig` (`config`) it is checked against.
HF_GENERATION_ATTRIBUTES: dict[str, str] = {
    "max_new_tokens": "config.max_new_tokens",
    "max_denoising_steps": "config.max_denoising_steps",
    "entropy_bound": "config.sampler_config.entropy_bound if config.sampler_config else None",
    "t_min": "config.t_min",
    "t_max": "config.t_max",
    "stability_threshold": "config.stability_threshold",
    "confidence_threshold": "config.confidence_threshold",
    "eos_token_ids": "[] if config.eos_token_id is None else config.eos_token_id if isinstance(config.eos_token_id, "
                     "list) else [config.eos_token_id]",
    "pad_token_id": "config.pad_token_id",
}


def _layer_type_attributes(text: dict[str, Any], layer_types: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The per-layer attributes of (sliding, full) layers, each the same on every layer of its type or refused."""
    base = {"head_dim": text.get("head_dim", 256), "num_key_value_heads": text.get("num_key_value_heads", 4)}
    overrides = _per_layer_overrides(text, layer_types, base)
    out = []
    for kind in ("sliding_attention", "full_attention"):
        layers = [i for i, t in enumerate(layer_types) if t == kind]
        resolved = {i: {**base, **overrides.get(i, {})} for i in layers}
        for i in layers:
            differing = [k for k in PER_LAYER_ATTRIBUTES if resolved[i][k] != resolved[layers[0]][k]]
            if differing:
                k = differing[0]
                raise ConfigError(
                    f"{kind} layers {layers[0]} and {i} differ in {k} ({resolved[layers[0]][k]!r} vs "
                    f"{resolved[i][k]!r}): dgrun runs every layer of one attention type with the same shape")
        out.append(resolved[layers[0]] if layers else base)
    return out[0], out[1]


def _per_layer_overrides(text: dict[str, Any], layer_types: list[str],
                         base: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """`per_layer_config` as transformers applies it: a present one (even `{}` or null) as it stands, with the flat
    `global_*` keys ignored; an absent one (the original release's layout) built from those keys."""
    if "per_layer_config" not in text:
        override: dict[str, Any] = {"head_dim": text.get("global_head_dim", 512)}
        # transformers reads `attention_k_eq_v` before setting it, so the override applies whatever the flag says.
        if text.get("num_global_key_value_heads") is not None:
            override["num_key_value_heads"] = text["num_global_key_value_heads"]
        return {i: dict(override) for i, t in enumerate(layer_types) if t == "full_attention"}
    raw = text["per_layer_config"]
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"per_layer_config must be a mapping of layer index to overrides, got {raw!r}")
    out: dict[int, dict[str, Any]] = {}
    for key, layer_overrides in raw.items():
        try:
            layer = int(key)  # transformers writes zero-padded strings ("05")
        except (TypeError, ValueError):
            raise ConfigError(f"per_layer_config key {key!r} is not a layer index") from None
        if not 0 <= layer < len(layer_types):
            raise ConfigError(f"per_layer_config key {key!r} is outside the {len(layer_types)} layers")
        if not isinstance(layer_overrides, dict):
            raise ConfigError(f"per_layer_config[{key!r}] must be a mapping of attribute to value")
        for name, value in layer_overrides.items():
            if name == "skip" and not value:
                continue
            if name not in PER_LAYER_ATTRIBUTES and value != text.get(name):
                raise ConfigError(
                    f"per_layer_config overrides {name} on layer {layer}, which DiffusionGemma (transformers 5.23.0) "
                    f"does not support per layer; only {' and '.join(PER_LAYER_ATTRIBUTES)} may differ between layers")
        out[layer] = {k: v for k, v in layer_overrides.items() if k in PER_LAYER_ATTRIBUTES}
    return out


def _rope(rope_parameters: Any, kind: str, text: dict[str, Any]) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) of one layer type's RoPE, as transformers computes its frequencies.

    transformers' "default" RoPE equals its "proportional" one with a factor of 1.0; the default kind with a
    partial factor would rotate fewer dimensions than the head has, which transformers itself cannot apply."""
    if not isinstance(rope_parameters, dict) or kind not in rope_parameters:
        raise ConfigError(f"rope_parameters must have a {kind} entry, got {rope_parameters!r}")
    params = rope_parameters[kind]
    if not isinstance(params, dict):
        raise ConfigError(f"{kind} layers without RoPE (rope_parameters.{kind}={params!r}) are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if "rope_theta" not in params:
        raise ConfigError(f"rope_parameters.{kind} has no rope_theta")
    theta = _number(f"rope_parameters.{kind}.rope_theta", params["rope_theta"])
    if "partial_rotary_factor" not in params and text.get("partial_rotary_factor") not in (None, 1.0):
        # transformers' proportional RoPE copies the flat key into every layer type's parameters that lack one, at
        # a point that depends on the order layer types are built in: only an explicit value per type is clear.
        raise ConfigError(f"a flat partial_rotary_factor is not supported: set it in rope_parameters.{kind}")
    partial = params.get("partial_rotary_factor", 1.0)
    if rope_type == "proportional":
        if params.get("factor", 1.0) != 1.0:
            raise ConfigError(f"{kind} RoPE with factor={params['factor']} is not supported")
    elif rope_type != "default":
        raise ConfigError(f"{kind} RoPE of type {rope_type!r} is not supported (only default and proportional)")
    partial = _number(f"rope_parameters.{kind}.partial_rotary_factor", partial)
    if rope_type == "default" and partial != 1.0:
        raise ConfigError(f"{kind} RoPE of type default with partial_rotary_factor={partial} is not supported")
    if theta <= 0:
        raise ConfigError(f"rope_parameters.{kind}.rope_theta must be positive, got {theta}")
    return theta, partial


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config field {name} must be a number, got {value!r}")
    return float(value)


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is int and isinstance(value, (int,)) and not isinstance(value, bool):
        return int(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalar
        return _coerce(key, value.item(), kind)
    raise ConfigError(f"metadata key {key} must be {kind.__name__}, got {type(value).__name__}")


def _sliding_pattern(pattern: Any, n_layers: int) -> list[bool]:
    """Per-layer sliding flags from `attention.sliding_window_pattern`: an array of bools (True = sliding), as
    dgrun and the fork write it, or llama.cpp's integer period n (layer i slides unless i % n == n - 1)."""
    key = _key("attention.sliding_window_pattern")
    if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
        return [i % pattern < pattern - 1 for i in range(n_layers)]
    if isinstance(pattern, np.ndarray) and pattern.shape == (n_layers,):  # numeric arrays only (nested: lists)
        if pattern.dtype == np.bool_ or (np.issubdtype(pattern.dtype, np.integer) and set(pattern.tolist()) <= {0, 1}):
            return [bool(v) for v in pattern]
    raise ConfigError(f"metadata key {key} is missing or is not {n_layers} booleans")


def _partial_rotary_from_rope_freqs(freqs: np.ndarray, global_head_dim: int) -> float:
    """The fraction of the full layers' head that RoPE rotates, read back from `rope_freqs.weight`."""
    freqs = np.asarray(freqs, dtype=np.float32).reshape(-1)
    rotated = int(np.argmax(freqs != 1.0)) if (freqs != 1.0).any() else len(freqs)
    if (len(freqs) != global_head_dim // 2 or rotated == 0
            or not (freqs[rotated:] == np.float32(ROPE_FREQS_UNROTATED)).all()):
        raise ConfigError(f"tensor {ROPE_FREQS_TENSOR} must be {global_head_dim // 2} values, 1.0 on the rotated "
                          "pairs then 1e30 on the rest (proportional RoPE); other frequency factors are not supported")
    return 2 * rotated / global_head_dim


def _check_rope_dimensions(metadata: dict[str, Any], cfg: ModelConfig, with_rope_freqs: bool) -> None:
    """`rope.dimension_count(_swa)`, where present, must say what the graph does: sliding layers rotate the whole
    head; full layers the whole head with `rope_freqs` factors, or (dgrun's first files) their rotated part."""
    rotated = 2 * int(cfg.partial_rotary_factor * cfg.global_head_dim // 2)
    allowed = {_key("rope.dimension_count_swa"): {cfg.head_dim},
               _key("rope.dimension_count"): {cfg.global_head_dim} if with_rope_freqs
               else {cfg.global_head_dim, rotated}}
    for key, values in allowed.items():
        if key in metadata and _coerce(key, metadata[key], int) not in values:
            raise ConfigError(f"metadata key {key} is {metadata[key]}, but this model rotates "
                              f"{' or '.join(map(str, sorted(values)))} dimensions there (partial RoPE on sliding "
                              "layers and other rotary layouts are not supported)")


@dataclass(frozen=True)
class MetadataKey:
    """Where one ModelConfig field lives in a GGUF file.

    `keys` are full key names: the first is dgrun's, any others are the same value under another writer's name
    (the llama.cpp fork of PR #24423). The writer writes them all; the reader takes whichever is present and
    refuses the file when two disagree. A field that is not `required` may be absent: it is then inferred from a
    tensor (vocab_size, partial_rotary_factor) or is the dataclass default, which is DiffusionGemma's value.
    """

    field: str
    kind: type
    keys: tuple[str, ...]
    required: bool = True


def _entry(field_name: str, kind: type, name: str, *aliases: str, required: bool = True) -> MetadataKey:
    return MetadataKey(field_name, kind, (_key(name), *aliases), required)


# The one table that ties ModelConfig to GGUF keys, for the writer and the reader.
METADATA_KEYS: tuple[MetadataKey, ...] = (
    _entry("vocab_size", int, "vocab_size", required=False),  # fork: token_embd's rows
    _entry("max_position_embeddings", int, "context_length"),
    _entry("hidden_size", int, "embedding_length"),
    _entry("num_hidden_layers", int, "block_count"),
    _entry("intermediate_size", int, "feed_forward_length"),
    _entry("num_attention_heads", int, "attention.head_count"),
    _entry("global_head_dim", int, "attention.key_length"),
    _entry("head_dim", int, "attention.key_length_swa"),
    _entry("sliding_window", int, "attention.sliding_window"),
    _entry("rms_norm_eps", float, "attention.layer_norm_rms_epsilon"),
    _entry("num_experts", int, "expert_count"),
    _entry("top_k_experts", int, "expert_used_count"),
    _entry("moe_intermediate_size", int, "expert_feed_forward_length"),
    _entry("rope_theta", float, "rope.freq_base"),
    _entry("rope_local_base_freq", float, "rope.freq_base_swa"),
    _entry("partial_rotary_factor", float, "rope.partial_rotary_factor", required=False),  # fork: rope_freqs
    _entry("final_logit_softcapping", float, "final_logit_softcapping", required=False),
    _entry("canvas_length", int, "canvas_length", "diffusion.canvas_length"),
    _entry("hidden_activation", str, "hidden_activation", required=False),
)

# Proportional RoPE as a tensor (llama.cpp's Gemma 4 and the fork): see `ModelConfig.rope_freqs`.
ROPE_FREQS_TENSOR = "rope_freqs.weight"
ROPE_FREQS_UNROTATED = 1e30


@dataclass
class GenerationConfig:
    """Generation defaults stored in the file (from generation_config.json); None = transformers' global default."""

    max_new_tokens: int | None = None
    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    @classmethod
    def from_hf(cls, generation_config: dict[str, Any], text_config: dict[str, Any]) -> GenerationConfig:
        """Read generation_config.json; EOS falls back to the model config's eos_token_id when absent there."""
        sampler = generation_config.get("sampler_config") or {}
        eos = generation_config.get("eos_token_id")
        if eos is None:
            eos = text_config.get("eos_token_id")
        eos_list = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        pad = generation_config.get("pad_token_id", text_config.get("pad_token_id"))
        return cls(
            max_new_tokens=generation_config.get("max_new_tokens"),
            max_denoising_steps=generation_config.get("max_denoising_steps"),
            entropy_bound=sampler.get("entropy_bound") if isinstance(sampler, dict) else None,
            t_min=generation_config.get("t_min"),
            t_max=generation_config.get("t_max"),
            stability_threshold=generation_config.get("stability_threshold"),
            confidence_threshold=generation_config.get("confidence_threshold"),
            eos_token_ids=eos_list,
            pad_token_id=pad,
        )

    def to_metadata(self) -> dict[str, Any]:
        """dgrun's `generation.*` keys, and the fork's `diffusion.eb_*` sampler keys beside them."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "eos_token_ids" and not value):
                continue  # absent key = transformers' global default
            out[_key(f"generation.{f.name}")] = value
            if f.name in PEER_SAMPLER_KEYS:
                key, kind = PEER_SAMPLER_KEYS[f.name]
                out[key] = kind(value)
        return out

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> GenerationConfig:
        """dgrun's keys; else the fork's `diffusion.eb_*` keys and EOS from the tokenizer's ids (see
        `PEER_EOS_PIECES`); absent values stay None (transformers' global defaults)."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = _key(f"generation.{f.name}")
            if key in metadata:
                value = metadata[key]
                try:
                    if f.name == "eos_token_ids":
                        value = [int(v) for v in value]
                    elif hasattr(value, "item"):
                        value = value.item()
                except (TypeError, ValueError):
                    raise ConfigError(f"metadata key {key} is malformed") from None
                kwargs[f.name] = value
            elif f.name in PEER_SAMPLER_KEYS and PEER_SAMPLER_KEYS[f.name][0] in metadata:
                peer_key, kind = PEER_SAMPLER_KEYS[f.name]
                value = _coerce(peer_key, metadata[peer_key], kind)
                # The fork stores these as float32: take the shortest decimal that rounds to it (0.4, not
                # 0.4000000059604645), which is the value its converter read from generation_config.json.
                kwargs[f.name] = float(str(np.float32(value))) if kind is float else value
        if not written_by_dgrun(metadata):  # the fork's file: what llama.cpp takes from the tokenizer's ids
            kwargs.setdefault("eos_token_ids", _peer_eos_ids(metadata))
            pad = metadata.get("tokenizer.ggml.padding_token_id")
            if "pad_token_id" not in kwargs and isinstance(pad, int):
                kwargs["pad_token_id"] = pad
        return cls(**kwargs)

    def resolved(self) -> dict[str, Any]:
        """The file's values over transformers' global defaults."""
        out = dict(GLOBAL_GENERATION_DEFAULTS)
        for name in GLOBAL_GENERATION_DEFAULTS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


# GenerationConfig field → (the fork's key, its type). Written beside dgrun's own keys; read when those are absent.
PEER_SAMPLER_KEYS: dict[str, tuple[str, type]] = {
    "max_denoising_steps": ("diffusion.eb_max_steps", int),
    "t_min": ("diffusion.eb_t_min", float),
    "t_max": ("diffusion.eb_t_max", float),
    "entropy_bound": ("diffusion.eb_entropy_bound", float),
    "stability_threshold": ("diffusion.eb_stability_threshold", int),
    "confidence_threshold": ("diffusion.eb_confidence_threshold", float),
}

# A file without dgrun's EOS list (the fork's) ends generation where llama.cpp does for a `gemma4` vocabulary: at
# the EOS/EOT/EOM ids it names and at these pieces (llama.cpp's end-of-generation names for Gemma 4; on the
# released vocabulary they are ids 1, 106 and 50, the checkpoint's own generation_config EOS list).
PEER_EOS_ID_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
PEER_EOS_PIECES = ("<eos>", "<turn|>", "<|tool_response>")


def written_by_dgrun(metadata: dict[str, Any]) -> bool:
    """Whether dgrun wrote the file: only dgrun writes the canvas length under the architecture's prefix."""
    return _key("canvas_length") in metadata


def _peer_eos_ids(metadata: dict[str, Any]) -> list[int]:
    ids = [metadata[k] for k in PEER_EOS_ID_KEYS if isinstance(metadata.get(k), int)]
    tokens = metadata.get("tokenizer.ggml.tokens")
    if metadata.get("tokenizer.ggml.model") == "gemma4" and isinstance(tokens, list):
        ids += [i for i, piece in enumerate(tokens) if isinstance(piece, str) and piece in PEER_EOS_PIECES]
    return sorted(set(ids), key=ids.index)
