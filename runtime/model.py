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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dgrun.config import ModelConfig

if TYPE_CHECKING:
    from dgrun.lora import LoraSet


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


def _last_rows(ops: Any, x: Any, keep: int) -> Any:
    """The last `keep` rows of x in an array of their own. A view (`x[-keep:]`) would keep all of x alive: for a
    sliding layer, every row the chunk concatenated, where the window needs only window-1."""
    return ops.concat(x[:0], x[len(x) - keep:]) if keep < len(x) else x


class DiffusionGemma:
    """Encoder and decoder passes over one set of backend weights (and LoRA adapters, if any)."""

    # Tokens per encoder pass: a long prompt's activations are one chunk's (at the released widths, 8192 tokens
    # raise the cpu backend's RSS by ~285 MiB, 80 of them the cache). Not much smaller: every chunk reads (the cpu
    # backend: decodes) all the weights once, 128 experts included, and runs each op as one parallel region,
    # which costs most on a busy CPU (chunks of 256 took 3x as long as 4096 on a loaded 2-core machine).
    encode_chunk = 2048

    def __init__(self, cfg: ModelConfig, weights: dict[str, Any], backend: Any, lora: LoraSet | None = None):
        self.cfg = cfg
        self.w = weights
        self.ops = backend
        self.lora = lora
        self.output = weights.get("output.weight", weights["token_embd.weight"])
        # Small tensors as backend arrays once, so each pass does not re-read them.
        self.vec = {name: backend.vector(w) for name, w in weights.items() if len(w.shape) == 1}
        self.inv_freq = [backend.asarray(rope_inv_freq(cfg, i)) for i in range(cfg.num_hidden_layers)]

    def new_cache(self) -> KVCache:
        n = self.cfg.num_hidden_layers
        return KVCache([None] * n, [None] * n, 0, [np.zeros(0, dtype=np.int64) for _ in range(n)])

    def _adapted(self, name: str, encoder: bool) -> tuple[Any, Sequence[tuple[Any, Any, Any]]]:
        """The weight of matrix `name` in this pass and the adapters' unmerged (A, B, scale) terms on it."""
        return (self.w[name], ()) if self.lora is None else self.lora.for_pass(name, encoder)

    def _linear(self, x: Any, name: str, encoder: bool) -> Any:
        """x @ W^T for matrix `name` in an encoder or decoder pass: the one place adapters act, since the encoder's
        and the decoder's deltas differ. Each unmerged adapter adds scale * B(A x), as PEFT computes it."""
        w, terms = self._adapted(name, encoder)
        y = self.ops.linear(x, w)
        for a, b, scale in terms:
            y = y + self.ops.linear(self.ops.linear(x, a), b) * scale
        return y

    def _gated_mlp(self, x: Any, names: tuple[str, str, str], encoder: bool) -> Any:
        """down(gelu(gate x) * up x): the backend's fused op, unless an adapter adds terms to one of the three."""
        (gate, g), (up, u), (down, d) = (self._adapted(name, encoder) for name in names)
        if not (g or u or d):
            return self.ops.gated_mlp(x, gate, up, down)
        hidden = self.ops.gelu_mul(self._linear(x, names[0], encoder), self._linear(x, names[1], encoder))
        return self._linear(hidden, names[2], encoder)

    def _attention(self, i: int, x: Any, positions: np.ndarray, caches: list[KVCache], sizes: list[int],
                   encoder: bool, output: bool = True) -> Any:
        """Attention over rows that belong to `len(caches)` elements: projections, norms and RoPE run over all
        rows at once; each element's rows (`sizes[j]` of them, in order) attend to its own cache only.
        `output=False` (the encoder's last layer, whose output nothing reads) only appends K/V: returns None."""
        ops, cfg, p = self.ops, self.cfg, f"blk.{i}."
        n, d = x.shape[0], cfg.layer_head_dim(i)
        h = ops.rms_norm(x, self.vec[p + "attn_norm.weight"], cfg.rms_norm_eps)
        q = None
        if output:
            q = self._linear(h, p + "attn_q.weight", encoder).reshape(n, cfg.num_attention_heads, d)
            q = ops.rope(ops.rms_norm(q, self.vec[p + "attn_q_norm.weight"], cfg.rms_norm_eps), positions,
                         self.inv_freq[i])
        k_raw = self._linear(h, p + "attn_k.weight", encoder).reshape(n, -1, d)
        v_raw = self._linear(h, p + "attn_v.weight", encoder).reshape(n, -1, d) if cfg.is_sliding(i) else k_raw
        k = ops.rope(ops.rms_norm(k_raw, self.vec[p + "attn_k_norm.weight"], cfg.rms_norm_eps), positions,
                     self.inv_freq[i])
        v = ops.rms_norm(v_raw, None, cfg.rms_norm_eps)
        outs, start = [], 0
        for cache, size in zip(caches, sizes, strict=True):
            rows = slice(start, start + size)
            outs.append(self._attend(i, None if q is None else q[rows], k[rows], v[rows], positions[rows], cache,
                                     encoder))
            start += size
        if q is None:
            return None
        out = self._linear(ops.concat(*outs).reshape(n, -1), p + "attn_output.weight", encoder)
        return ops.rms_norm(out, self.vec[p + "post_attention_norm.weight"], cfg.rms_norm_eps)

    def _attend(self, i: int, q: Any, k: Any, v: Any, positions: np.ndarray, cache: KVCache, encoder: bool) -> Any:
        """One element's attention: its new rows against its cache plus themselves (the encoder also appends
        them to the cache; with no queries, that is all)."""
        ops, cfg = self.ops, self.cfg
        if cache.keys[i] is not None:
            keys, values = ops.concat(cache.keys[i], k), ops.concat(cache.values[i], v)
            k_pos = np.concatenate([cache.positions[i], positions])
        else:
            keys, values, k_pos = k, v, positions
        window = cfg.sliding_window if cfg.is_sliding(i) else None
        if encoder:
            keep = len(k_pos) if window is None else min(len(k_pos), window - 1)
            cache.keys[i], cache.values[i] = _last_rows(ops, keys, keep), _last_rows(ops, values, keep)
            cache.positions[i] = k_pos[len(k_pos) - keep:].copy()
        if q is None:
            return None
        # The decoder attends to everything it is given: the trimmed cache already is the sliding window.
        return ops.attention(q, keys, values, positions, k_pos, causal=encoder, window=window if encoder else None)

    def _feed_forward(self, i: int, x: Any, encoder: bool) -> Any:
        ops, cfg, p, eps = self.ops, self.cfg, f"blk.{i}.", self.cfg.rms_norm_eps
        dense = self._gated_mlp(ops.rms_norm(x, self.vec[p + "ffn_norm.weight"], eps),
                                (p + "ffn_gate.weight", p + "ffn_up.weight", p + "ffn_down.weight"), encoder)
        dense = ops.rms_norm(dense, self.vec[p + "post_ffw_norm_1.weight"], eps)
        weights, index = ops.route(x, self.w[p + "ffn_gate_inp.weight"], self.vec[p + "ffn_gate_inp.scale"],
                                   self.vec[p + "ffn_down_exps.scale"], cfg.top_k_experts, eps)
        moe = ops.experts(ops.rms_norm(x, self.vec[p + "pre_ffw_norm_2.weight"], eps), weights, index,
                          self.w[p + "ffn_gate_up_exps.weight"], self.w[p + "ffn_down_exps.weight"])
        moe = ops.rms_norm(moe, self.vec[p + "post_ffw_norm_2.weight"], eps)
        return ops.rms_norm(dense + moe, self.vec[p + "post_ffw_norm.weight"], eps)

    def _layer(self, i: int, x: Any, positions: np.ndarray, caches: list[KVCache], sizes: list[int],
               encoder: bool) -> Any:
        x = x + self._attention(i, x, positions, caches, sizes, encoder)
        x = x + self._feed_forward(i, x, encoder)
        scalar = "enc_layer_output_scale.weight" if encoder else "layer_output_scale.weight"
        return x * self.vec[f"blk.{i}.{scalar}"]

    def encode(self, ids: np.ndarray, cache: KVCache) -> None:
        """Causal encoder pass over new tokens: appends their K/V to `cache` (the hidden output is unused).

        Long inputs go `encode_chunk` tokens at a time: each chunk attends to the cache the previous ones left
        (the sliding layers' last window-1 rows, the full layers' every row), which is exactly what the whole
        input would have seen, so only activations of one chunk are ever alive.
        """
        ids = np.asarray(ids, dtype=np.int64)
        for start in range(0, len(ids), self.encode_chunk):
            self._encode_chunk(ids[start:start + self.encode_chunk], cache)

    def _encode_chunk(self, ids: np.ndarray, cache: KVCache) -> None:
        positions = np.arange(cache.length, cache.length + len(ids), dtype=np.int64)
        x = self.ops.embed(self.w["token_embd.weight"], ids, self.cfg.embed_scale)
        last = self.cfg.num_hidden_layers - 1
        for i in range(last):
            x = self._layer(i, x, positions, [cache], [len(ids)], encoder=True)
        # Only the last layer's K/V matter to generation: its attention output and FFN would be thrown away.
        self._attention(last, x, positions, [cache], [len(ids)], encoder=True, output=False)
        cache.length += len(ids)

    def decode(self, canvas: np.ndarray, cache: KVCache, self_cond_logits: Any | None) -> Any:
        """Bidirectional decoder pass over the canvas, reading `cache`: soft-capped float32 logits [canvas, vocab]."""
        return self.decode_batch([canvas], [cache], [self_cond_logits])[0]

    def decode_batch(self, canvases: Sequence[np.ndarray], caches: Sequence[KVCache],
                     self_cond_logits: Sequence[Any | None]) -> list[Any]:
        """One decoder pass over several elements' canvases: each element's logits [its canvas, vocab].

        The canvases' rows are concatenated, so every matmul (projections, dense MLP, router, MoE, output) reads
        its weights once for the whole batch; attention runs per element against that element's cache, and
        elements may be at different positions. Every op is row-independent, so each element's logits are
        bit-identical to a pass of its own. An element's self-conditioning logits are None on its first step.
        """
        ops, cfg = self.ops, self.cfg
        canvases = [np.asarray(c, dtype=np.int64) for c in canvases]
        sizes = [len(c) for c in canvases]
        caches = list(caches)
        positions = np.concatenate([np.arange(c.length, c.length + n, dtype=np.int64)
                                    for c, n in zip(caches, sizes, strict=True)])
        x = ops.embed(self.w["token_embd.weight"], np.concatenate(canvases), cfg.embed_scale)
        x = self._self_condition(x, sizes, list(self_cond_logits))
        # On the first step the signal is zero, and the MLP of zero is zero: only the post-norm remains.
        x = ops.rms_norm(x, None, cfg.rms_norm_eps)
        for i in range(cfg.num_hidden_layers):
            x = self._layer(i, x, positions, caches, sizes, encoder=False)
        x = ops.rms_norm(x, self.vec["output_norm.weight"], cfg.rms_norm_eps)
        logits = ops.softcap(ops.linear(x, self.output), cfg.final_logit_softcapping)
        ends = np.cumsum(sizes).tolist()
        return [logits[end - size:end] for size, end in zip(sizes, ends, strict=True)]

    def _self_condition(self, x: Any, sizes: list[int], self_cond_logits: list[Any | None]) -> Any:
        """Add each element's self-conditioning signal to its embedded rows (elements without one keep theirs).

        The soft embedding runs per element: it contracts over the vocabulary, so batching it saves nothing but
        the table's decoding, and per element it reads the sampler's own probabilities (the cpu backend keeps
        them). The gated MLP then runs over all those elements' rows at once.
        """
        ops, cfg = self.ops, self.cfg
        signals = [ops.soft_embed(logits, self.w["token_embd.weight"], cfg.embed_scale)
                   for logits in self_cond_logits if logits is not None]
        if not signals:
            return x
        soft = ops.concat(*signals)
        soft = self._gated_mlp(ops.rms_norm(soft, self.vec["self_cond_pre_norm.weight"], cfg.rms_norm_eps),
                               ("self_cond_gate.weight", "self_cond_up.weight", "self_cond_down.weight"), encoder=False)
        # Element by element, so a first-step element's rows stay exactly as embedded (no + 0.0 turning -0.0 to
        # +0.0): the same arithmetic as a pass of its own.
        pieces, row, signal_row = [], 0, 0
        for size, logits in zip(sizes, self_cond_logits, strict=True):
            piece = x[row:row + size]
            if logits is not None:
                piece = piece + soft[signal_row:signal_row + size]
                signal_row += size
            pieces.append(piece)
            row += size
        return ops.concat(*pieces)
