"""Model and generation configuration, with Hugging Face key names.

`ModelConfig` is what the model graph needs, named as in transformers' `DiffusionGemmaTextConfig` so a reader
of both can map one onto the other at a glance. It is built either from a checkpoint's `config.json`
(the converter) or from a `.dgf` file's metadata (the runtime); `METADATA_KEYS` is the single table that ties
each field to its GGUF key, used in both directions.
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
        """Build from a `config.json` of `DiffusionGemmaForBlockDiffusion` (save_pretrained or the release)."""
        if config.get("model_type") != "diffusion_gemma":
            raise ConfigError(
                f"not a DiffusionGemma checkpoint (model_type={config.get('model_type')!r}, "
                f"architectures={config.get('architectures')})")
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config.json has no text_config")
        n_layers = text.get("num_hidden_layers", 30)
        layer_types = text.get("layer_types") or [
            "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)]
        layer_types = list(layer_types)
        layer_types[-1] = "full_attention"  # transformers forces the last layer to full attention
        # Full-attention layers' head dim and KV heads: written by save_pretrained as `per_layer_config`,
        # by the original release as `global_head_dim` / `num_global_key_value_heads`.
        global_head_dim = text.get("global_head_dim", 512)
        global_kv = text.get("num_global_key_value_heads") or text.get("num_key_value_heads", 4)
        for layer_cfg in (text.get("per_layer_config") or {}).values():
            global_head_dim = layer_cfg.get("head_dim", global_head_dim)
            global_kv = layer_cfg.get("num_key_value_heads", global_kv)
        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError("use_bidirectional_attention='all' (a bidirectional encoder) is not supported")
        rope = text.get("rope_parameters") or {}
        full_rope = rope.get("full_attention") or {}
        sliding_rope = rope.get("sliding_attention") or {}
        if full_rope.get("rope_type", "proportional") != "proportional" or full_rope.get("factor", 1.0) != 1.0:
            raise ConfigError(f"unsupported full-attention RoPE {full_rope}")
        if sliding_rope.get("rope_type", "default") != "default":
            raise ConfigError(f"unsupported sliding-attention RoPE {sliding_rope}")
        if text.get("attention_bias"):
            raise ConfigError("attention_bias=True is not supported")
        out = cls(
            vocab_size=text.get("vocab_size", 262_144),
            hidden_size=text.get("hidden_size", 2304),
            intermediate_size=text.get("intermediate_size", 9216),
            num_hidden_layers=n_layers,
            num_attention_heads=text.get("num_attention_heads", 8),
            num_key_value_heads=text.get("num_key_value_heads", 4),
            head_dim=text.get("head_dim", 256),
            global_head_dim=global_head_dim,
            num_global_key_value_heads=global_kv,
            layer_types=layer_types,
            sliding_window=text.get("sliding_window", 512),
            num_experts=text.get("num_experts", 0),
            top_k_experts=text.get("top_k_experts", 0),
            moe_intermediate_size=text.get("moe_intermediate_size", 0),
            rope_theta=float(full_rope.get("rope_theta", 1_000_000.0)),
            rope_local_base_freq=float(sliding_rope.get("rope_theta", 10_000.0)),
            partial_rotary_factor=float(full_rope.get("partial_rotary_factor", 1.0)),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=float(text.get("final_logit_softcapping") or 30.0),
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
