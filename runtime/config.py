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
        """GGUF key → value, llama.cpp's standard names where one exists."""
        out: dict[str, Any] = {}
        for key, (attr, _) in METADATA_KEYS.items():
            out[f"{ARCH}.{key}"] = getattr(self, attr)
        # llama.cpp describes heterogeneous layers with per-layer arrays.
        out[f"{ARCH}.attention.sliding_window_pattern"] = [self.is_sliding(i) for i in range(self.num_hidden_layers)]
        out[f"{ARCH}.attention.head_count_kv"] = [self.layer_kv_heads(i) for i in range(self.num_hidden_layers)]
        out[f"{ARCH}.attention.value_length"] = self.global_head_dim
        out[f"{ARCH}.attention.value_length_swa"] = self.head_dim
        # Rotated dimensions of the full layers' proportional RoPE (the rest of the head passes through).
        out[f"{ARCH}.rope.dimension_count"] = 2 * int(self.partial_rotary_factor * self.global_head_dim // 2)
        out[f"{ARCH}.rope.dimension_count_swa"] = self.head_dim
        return out

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> ModelConfig:
        """Build from a `.dgf` file's metadata; every missing or mistyped key is a ConfigError."""
        arch = metadata.get("general.architecture")
        if arch != ARCH:
            raise ConfigError(f"general.architecture is {arch!r}, expected {ARCH!r}")
        kwargs: dict[str, Any] = {}
        for key, (attr, kind) in METADATA_KEYS.items():
            full = f"{ARCH}.{key}"
            if full not in metadata:
                raise ConfigError(f"metadata key {full} is missing")
            kwargs[attr] = _coerce(full, metadata[full], kind)
        pattern = metadata.get(f"{ARCH}.attention.sliding_window_pattern")
        if pattern is None or len(pattern) != kwargs["num_hidden_layers"]:
            raise ConfigError(f"metadata key {ARCH}.attention.sliding_window_pattern is missing or mis-sized")
        kwargs["layer_types"] = ["sliding_attention" if bool(p) else "full_attention" for p in pattern]
        try:
            kv = [int(x) for x in metadata[f"{ARCH}.attention.head_count_kv"]]
            kwargs["num_key_value_heads"] = next(k for k, p in zip(kv, pattern, strict=True) if p)
            kwargs["num_global_key_value_heads"] = next(k for k, p in zip(kv, pattern, strict=True) if not p)
        except (KeyError, TypeError, ValueError, StopIteration) as e:
            raise ConfigError(f"metadata key {ARCH}.attention.head_count_kv is missing or inconsistent") from e
        out = cls(**kwargs)
        out.validate()
        return out


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


# GGUF key (without the "diffusion-gemma." prefix) → (ModelConfig field, type). One table serves writer and reader.
METADATA_KEYS: dict[str, tuple[str, type]] = {
    "vocab_size": ("vocab_size", int),
    "context_length": ("max_position_embeddings", int),
    "embedding_length": ("hidden_size", int),
    "block_count": ("num_hidden_layers", int),
    "feed_forward_length": ("intermediate_size", int),
    "attention.head_count": ("num_attention_heads", int),
    "attention.key_length": ("global_head_dim", int),
    "attention.key_length_swa": ("head_dim", int),
    "attention.sliding_window": ("sliding_window", int),
    "attention.layer_norm_rms_epsilon": ("rms_norm_eps", float),
    "expert_count": ("num_experts", int),
    "expert_used_count": ("top_k_experts", int),
    "expert_feed_forward_length": ("moe_intermediate_size", int),
    "rope.freq_base": ("rope_theta", float),
    "rope.freq_base_swa": ("rope_local_base_freq", float),
    "rope.partial_rotary_factor": ("partial_rotary_factor", float),
    "final_logit_softcapping": ("final_logit_softcapping", float),
    "canvas_length": ("canvas_length", int),
    "hidden_activation": ("hidden_activation", str),
}


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
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "eos_token_ids" and not value):
                continue  # absent key = transformers' global default
            out[f"{ARCH}.generation.{f.name}"] = value
        return out

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> GenerationConfig:
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f"{ARCH}.generation.{f.name}"
            if key in metadata:
                value = metadata[key]
                if f.name == "eos_token_ids":
                    value = [int(v) for v in value]
                elif hasattr(value, "item"):
                    value = value.item()
                kwargs[f.name] = value
        return cls(**kwargs)

    def resolved(self) -> dict[str, Any]:
        """The file's values over transformers' global defaults."""
        out = dict(GLOBAL_GENERATION_DEFAULTS)
        for name in GLOBAL_GENERATION_DEFAULTS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out
