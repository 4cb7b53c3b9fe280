"""The DiffusionGemma text model graph, written once against the backend op interface.

One causal encoder and one bidirectional decoder share every weight except the per-layer `layer_scalar`
(`enc_layer_output_scale` / `layer_output_scale`) and the decoder-only self-conditioning MLP. The encoder
writes K/V into `KVCache`; the decoder reads it and never writes it.

Traps this file handles (all from transformers 5.23.0 `modeling_diffusion_gemma.py`):
- sliding layers keep only the last `sliding_window - 1` cached positions (DynamicSlidingWindowLayer);
  in the decoder they see exactly those plus the whole canvas, with no further mask;
- full layers use `global_head_dim`, their own KV head count, K as V (no v_proj) and proportional RoPE
  (the first `partial_rotary_factor` of the frequencies rotate, the rest are zero);
- attention scaling is 1.0; q/k norms have a scale, v_norm has none;
- every layer runs the dense MLP and the MoE in parallel; the router reads the un-normed residual;
- logits are soft-capped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dgrun.config import ModelConfig


def tensor_shapes(cfg: ModelConfig, tied_output: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor the graph reads, with its numpy-order shape: the contract between converter and runtime."""
    h, v = cfg.hidden_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (v, h),
        "output_norm.weight": (h,),
        "self_cond_pre_norm.weight": (h,),
        "self_cond_gate.weight": (cfg.intermediate_size, h),
        "self_cond_up.weight": (cfg.intermediate_size, h),
        "self_cond_down.weight": (h, cfg.intermediate_size),
    }
    if not tied_output:
        shapes["output.weight"] = (v, h)
    for i in range(cfg.num_hidden_layers):
        d, kv, heads = cfg.layer_head_dim(i), cfg.layer_kv_heads(i), cfg.num_attention_heads
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": (h,),
            p + "attn_q.weight": (heads * d, h),
            p + "attn_k.weight": (kv * d, h),
            p + "attn_output.weight": (h, heads * d),
            p + "attn_q_norm.weight": (d,),
            p + "attn_k_norm.weight": (d,),
            p + "post_attention_norm.weight": (h,),
            p + "ffn_norm.weight": (h,),
            p + "ffn_gate.weight": (cfg.intermediate_size, h),
            p + "ffn_up.weight": (cfg.intermediate_size, h),
            p + "ffn_down.weight": (h, cfg.intermediate_size),
            p + "post_ffw_norm_1.weight": (h,),
            p + "pre_ffw_norm_2.weight": (h,),
            p + "post_ffw_norm_2.weight": (h,),
            p + "post_ffw_norm.weight": (h,),
            p + "ffn_gate_inp.weight": (cfg.num_experts, h),
            p + "ffn_gate_inp.scale": (h,),
            p + "ffn_down_exps.scale": (cfg.num_experts,),
            p + "ffn_gate_up_exps.weight": (cfg.num_experts, 2 * cfg.moe_intermediate_size, h),
            p + "ffn_down_exps.weight": (cfg.num_experts, h, cfg.moe_intermediate_size),
            p + "layer_output_scale.weight": (1,),
            p + "enc_layer_output_scale.weight": (1,),
        })
        if cfg.is_sliding(i):
            shapes[p + "attn_v.weight"] = (kv * d, h)
    return shapes


def rope_inv_freq(cfg: ModelConfig, layer: int) -> np.ndarray:
    """Inverse frequencies (float32, head_dim/2 entries) as transformers computes them for this layer type."""
    if cfg.is_sliding(layer):
        d = cfg.head_dim
        return (1.0 / (np.float32(cfg.rope_local_base_freq) ** (np.arange(0, d, 2, dtype=np.float32) / d))).astype(
            np.float32)
    d = cfg.global_head_dim
    rotated = int(cfg.partial_rotary_factor * d // 2)
    inv = np.zeros(d // 2, dtype=np.float32)
    # Proportional RoPE divides by the full head dim, not the rotated width.
    inv[:rotated] = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, 2 * rotated, 2, dtype=np.float32) / d))
    return inv


@dataclass
class KVCache:
    """Encoder K/V per layer ([positions, kv_heads, head_dim]); sliding layers keep the last window-1."""

    keys: list[Any]
    values: list[Any]
    length: int = 0  # positions encoded so far (the decoder's first position)
    positions: list[np.ndarray] = field(default_factory=list)  # absolute position of each cached row, per layer

    def copy(self) -> KVCache:
        return KVCache(list(self.keys), list(self.values), self.length, list(self.positions))


@dataclass
class SelfCondition:
    """The self-conditioning input of a decoder pass, softmax(processed logits) @ embedding * embed_scale, made
    as soon as a step ends (`DiffusionGemma.self_condition`) so that the step's canvas x vocab logits need not
    stay alive until the next pass has made its own."""

    soft_embedding: Any


class DiffusionGemma:
    """Encoder and decoder passes over one set of backend weights."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, Any], backend: Any):
        self.cfg = cfg
        self.w = weights
        self.ops = backend
        self.output = weights.get("output.weight", weights["token_embd.weight"])
        # Small tensors as backend arrays once, so each pass does not re-read them.
        self.vec = {name: backend.vector(w) for name, w in weights.items() if len(w.shape) == 1}
        self.inv_freq = [backend.asarray(rope_inv_freq(cfg, i)) for i in range(cfg.num_hidden_layers)]

    def new_cache(self) -> KVCache:
        n = self.cfg.num_hidden_layers
        return KVCache([None] * n, [None] * n, 0, [np.zeros(0, dtype=np.int64) for _ in range(n)])

    def _attention(self, i: int, x: Any, positions: np.ndarray, cache: KVCache, encoder: bool) -> Any:
        ops, cfg, p = self.ops, self.cfg, f"blk.{i}."
        n, d = x.shape[0], cfg.layer_head_dim(i)
        h = ops.rms_norm(x, self.vec[p + "attn_norm.weight"], cfg.rms_norm_eps)
        q = ops.linear(h, self.w[p + "attn_q.weight"]).reshape(n, cfg.num_attention_heads, d)
        q = ops.rope(ops.rms_norm(q, self.vec[p + "attn_q_norm.weight"], cfg.rms_norm_eps), positions,
                     self.inv_freq[i])
        k_raw = ops.linear(h, self.w[p + "attn_k.weight"]).reshape(n, -1, d)
        v_raw = ops.linear(h, self.w[p + "attn_v.weight"]).reshape(n, -1, d) if cfg.is_sliding(i) else k_raw
        k = ops.rope(ops.rms_norm(k_raw, self.vec[p + "attn_k_norm.weight"], cfg.rms_norm_eps), positions,
                     self.inv_freq[i])
        v = ops.rms_norm(v_raw, None, cfg.rms_norm_eps)
        if cache.keys[i] is not None:
            keys, values = ops.concat(cache.keys[i], k), ops.concat(cache.values[i], v)
            k_pos = np.concatenate([cache.positions[i], positions])
        else:
            keys, values, k_pos = k, v, positions
        window = cfg.sliding_window if cfg.is_sliding(i) else None
        if encoder:
            keep = keys.shape[0] if window is None else min(keys.shape[0], window - 1)
            cache.keys[i], cache.values[i] = keys[-keep:], values[-keep:]
            cache.positions[i] = k_pos[-keep:]
        # The decoder attends to everything it is given: the trimmed cache already is the sliding window.
        out = ops.attention(q, keys, values, positions, k_pos, causal=encoder, window=window if encoder else None)
        out = ops.linear(out.reshape(n, -1), self.w[p + "attn_output.weight"])
        return ops.rms_norm(out, self.vec[p + "post_attention_norm.weight"], cfg.rms_norm_eps)

    def _feed_forward(self, i: int, x: Any) -> Any:
        ops, cfg, p, eps = self.ops, self.cfg, f"blk.{i}.", self.cfg.rms_norm_eps
        dense = ops.gated_mlp(ops.rms_norm(x, self.vec[p + "ffn_norm.weight"], eps), self.w[p + "ffn_gate.weight"],
                              self.w[p + "ffn_up.weight"], self.w[p + "ffn_down.weight"])
        dense = ops.rms_norm(dense, self.vec[p + "post_ffw_norm_1.weight"], eps)
        weights, index = ops.route(x, self.w[p + "ffn_gate_inp.weight"], self.vec[p + "ffn_gate_inp.scale"],
                                   self.vec[p + "ffn_down_exps.scale"], cfg.top_k_experts, eps)
        moe = ops.experts(ops.rms_norm(x, self.vec[p + "pre_ffw_norm_2.weight"], eps), weights, index,
                          self.w[p + "ffn_gate_up_exps.weight"], self.w[p + "ffn_down_exps.weight"])
        moe = ops.rms_norm(moe, self.vec[p + "post_ffw_norm_2.weight"], eps)
        return ops.rms_norm(dense + moe, self.vec[p + "post_ffw_norm.weight"], eps)

    def _layer(self, i: int, x: Any, positions: np.ndarray, cache: KVCache, encoder: bool) -> Any:
        x = x + self._attention(i, x, positions, cache, encoder)
        x = x + self._feed_forward(i, x)
        scalar = "enc_layer_output_scale.weight" if encoder else "layer_output_scale.weight"
        return x * self.vec[f"blk.{i}.{scalar}"]

    def encode(self, ids: np.ndarray, cache: KVCache) -> None:
        """Causal encoder pass over new tokens: appends their K/V to `cache` (the hidden output is unused)."""
        ids = np.asarray(ids, dtype=np.int64)
        positions = np.arange(cache.length, cache.length + len(ids), dtype=np.int64)
        x = self.ops.embed(self.w["token_embd.weight"], ids, self.cfg.embed_scale)
        last = self.cfg.num_hidden_layers - 1
        for i in range(last):
            x = self._layer(i, x, positions, cache, encoder=True)
        # Only the last layer's K/V matter to generation: its attention output and FFN would be thrown away.
        self._attention(last, x, positions, cache, encoder=True)
        cache.length += len(ids)

    def self_condition(self, processed_logits: Any) -> SelfCondition:
        """A step's processed logits [canvas, vocab] as the next decoder pass's self-conditioning input."""
        return SelfCondition(self.ops.soft_embed(processed_logits, self.w["token_embd.weight"], self.cfg.embed_scale))

    def decode(self, canvas: np.ndarray, cache: KVCache, self_cond_logits: Any | None) -> Any:
        """Bidirectional decoder pass over the canvas, reading `cache`: soft-capped float32 logits [canvas, vocab].

        `self_cond_logits`: None on a canvas's first step, else the previous step's processed logits (as
        transformers takes them) or the `SelfCondition` already made from them.
        """
        ops, cfg = self.ops, self.cfg
        canvas = np.asarray(canvas, dtype=np.int64)
        positions = np.arange(cache.length, cache.length + len(canvas), dtype=np.int64)
        x = ops.embed(self.w["token_embd.weight"], canvas, cfg.embed_scale)
        if self_cond_logits is not None:
            # Self-conditioning: the previous step's processed logits as a soft embedding through a gated MLP.
            if not isinstance(self_cond_logits, SelfCondition):
                self_cond_logits = self.self_condition(self_cond_logits)
            soft = self_cond_logits.soft_embedding
            soft = ops.gated_mlp(ops.rms_norm(soft, self.vec["self_cond_pre_norm.weight"], cfg.rms_norm_eps),
                                 self.w["self_cond_gate.weight"], self.w["self_cond_up.weight"],
                                 self.w["self_cond_down.weight"])
            x = x + soft
        # On the first step the signal is zero, and the MLP of zero is zero: only the post-norm remains.
        x = ops.rms_norm(x, None, cfg.rms_norm_eps)
        for i in range(cfg.num_hidden_layers):
            x = self._layer(i, x, positions, cache, encoder=False)
        x = ops.rms_norm(x, self.vec["output_norm.weight"], cfg.rms_norm_eps)
        return ops.logits(x, self.output, cfg.final_logit_softcapping)
