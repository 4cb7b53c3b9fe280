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

Images (`EncoderImages`, made by `dgrun.vision`): the encoder reads an image's embeddings at its run of image
tokens instead of their token embeddings, and with `use_bidirectional_attention="vision"` the mask of
transformers' `create_masks_for_generate` holds on every layer: visible = (causal, and inside the window on
sliding layers) or (both positions in the same image's run).
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
class EncoderImages:
    """Rows of an encoder pass that read images: their embeddings replace the token embeddings there."""

    runs: list[tuple[int, int]]  # [start, end) rows of each image, in order, not overlapping
    embeds: Any  # backend array [rows of all runs, hidden]: the runs' rows one after another
    bidirectional: bool  # each run also attends to itself both ways (use_bidirectional_attention="vision")

    def rows(self, start: int, end: int) -> EncoderImages:
        """The images of rows [start, end), which no run straddles, numbered from `start`."""
        before = sum(e - s for s, e in self.runs if e <= start)
        runs = [(s - start, e - start) for s, e in self.runs if start <= s and e <= end]
        return EncoderImages(runs, self.embeds[before:before + sum(e - s for s, e in runs)], self.bidirectional)


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
                   encoder: bool, output: bool = True, runs: list[tuple[int, int]] | None = None) -> Any:
        """Attention over rows that belong to `len(caches)` elements: projections, norms and RoPE run over all
        rows at once; each element's rows (`sizes[j]` of them, in order) attend to its own cache only.
        `output=False` (the encoder's last layer, whose output nothing reads) only appends K/V: returns None.
        `runs`: the bidirectional image runs of a lone encoder element's rows."""
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
                                     encoder, runs))
            start += size
        if q is None:
            return None
        out = self._linear(ops.concat(*outs).reshape(n, -1), p + "attn_output.weight", encoder)
        return ops.rms_norm(out, self.vec[p + "post_attention_norm.weight"], cfg.rms_norm_eps)

    def _attend(self, i: int, q: Any, k: Any, v: Any, positions: np.ndarray, cache: KVCache, encoder: bool,
                runs: list[tuple[int, int]] | None = None) -> Any:
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
        if runs:
            return self._attend_images(q, keys, values, positions, k_pos, window, runs)
        # The decoder attends to everything it is given: the trimmed cache already is the sliding window.
        return ops.attention(q, keys, values, positions, k_pos, causal=encoder, window=window if encoder else None)

    def _attend_images(self, q: Any, keys: Any, values: Any, positions: np.ndarray, k_pos: np.ndarray,
                       window: int | None, runs: list[tuple[int, int]]) -> Any:
        """The encoder's attention when image runs also see themselves whole (transformers' blockwise overlay).

        Text rows attend causally (within the window). A query at position p of an image spanning positions
        [s, e] sees the union of its causal window (p - window, p] and [s, e], which is one range: from
        min(s, p - window + 1) up to e (all of [.., e] on full layers). The attention op says exactly that when
        given the keys up to e (the image's last key: the new keys follow the cache in position order), no
        causal mask, and min(p, s + window - 1) as the query position its window is measured from.
        """
        ops, outs, start = self.ops, [], 0
        cached = len(k_pos) - len(positions)
        for first, end in [*runs, (len(positions), len(positions))]:
            if start < first:
                outs.append(ops.attention(q[start:first], keys, values, positions[start:first], k_pos, causal=True,
                                          window=window))
            if first < end:
                seen = cached + end
                q_pos = positions[first:end]
                if window is not None:
                    q_pos = np.minimum(q_pos, positions[first] + window - 1)
                outs.append(ops.attention(q[first:end], keys[:seen], values[:seen], q_pos, k_pos[:seen],
                                          causal=False, window=window))
            start = end
        return ops.concat(*outs)

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
               encoder: bool, runs: list[tuple[int, int]] | None = None) -> Any:
        x = x + self._attention(i, x, positions, caches, sizes, encoder, runs=runs)
        x = x + self._feed_forward(i, x, encoder)
        scalar = "enc_layer_output_scale.weight" if encoder else "layer_output_scale.weight"
        return x * self.vec[f"blk.{i}.{scalar}"]

    def encode(self, ids: np.ndarray, cache: KVCache, images: EncoderImages | None = None) -> None:
        """Causal encoder pass over new tokens: appends their K/V to `cache` (the hidden output is unused).

        Long inputs go `encode_chunk` tokens at a time: each chunk attends to the cache the previous ones left
        (the sliding layers' last window-1 rows, the full layers' every row), which is exactly what the whole
        input would have seen, so only activations of one chunk are ever alive. A chunk never ends inside an
        image's run (it runs on to the image's end), since the run's rows see each other both ways.
        `images`: rows that read image embeddings instead of token embeddings (see `EncoderImages`).
        """
        ids = np.asarray(ids, dtype=np.int64)
        runs = [] if images is None else images.runs
        start = 0
        while start < len(ids):
            end = min(start + self.encode_chunk, len(ids))
            end = next((run_end for run_start, run_end in runs if run_start < end < run_end), end)
            self._encode_chunk(ids[start:end], cache, None if images is None else images.rows(start, end))
            start = end

    def _encode_chunk(self, ids: np.ndarray, cache: KVCache, images: EncoderImages | None) -> None:
        positions = np.arange(cache.length, cache.length + len(ids), dtype=np.int64)
        x = self.ops.embed(self.w["token_embd.weight"], ids, self.cfg.embed_scale)
        runs = None
        if images is not None and images.runs:
            x = self._with_images(x, images)
            runs = images.runs if images.bidirectional else None
        last = self.cfg.num_hidden_layers - 1
        for i in range(last):
            x = self._layer(i, x, positions, [cache], [len(ids)], encoder=True, runs=runs)
        # Only the last layer's K/V matter to generation: its attention output and FFN would be thrown away.
        self._attention(last, x, positions, [cache], [len(ids)], encoder=True, output=False, runs=runs)
        cache.length += len(ids)

    def _with_images(self, x: Any, images: EncoderImages) -> Any:
        """The embedded rows with each image run's rows taken from the image embeddings (transformers'
        `masked_scatter`: the image features in order, unscaled)."""
        pieces, row, embedded = [], 0, 0
        for start, end in images.runs:
            pieces += [x[row:start], images.embeds[embedded:embedded + end - start]]
            row, embedded = end, embedded + end - start
        if embedded != len(images.embeds):
            raise ValueError(f"{len(images.embeds)} image embeddings for {embedded} image-token rows")
        return self.ops.concat(*[piece for piece in (*pieces, x[row:]) if len(piece)])

    def self_condition(self, processed_logits: Any) -> SelfCondition:
        """A step's processed logits [canvas, vocab] as the next decoder pass's self-conditioning input."""
        return SelfCondition(self.ops.soft_embed(processed_logits, self.w["token_embd.weight"], self.cfg.embed_scale))

    def decode(self, canvas: np.ndarray, cache: KVCache, self_cond_logits: Any | None) -> Any:
        """Bidirectional decoder pass over the canvas, reading `cache`: soft-capped float32 logits [canvas, vocab].

        `self_cond_logits`: None on a canvas's first step, else the previous step's processed logits (as
        transformers takes them) or the `SelfCondition` already made from them.
        """
        return self.decode_batch([canvas], [cache], [self_cond_logits])[0]

    def decode_batch(self, canvases: Sequence[np.ndarray], caches: Sequence[KVCache],
                     self_cond_logits: Sequence[Any | None]) -> list[Any]:
        """One decoder pass over several elements' canvases: each element's logits [its canvas, vocab].

        The canvases' rows are concatenated, so every matmul (projections, dense MLP, router, MoE, output) reads
        its weights once for the whole batch; attention runs per element against that element's cache, and
        elements may be at different positions. Every op is row-independent, so each element's logits are
        bit-identical to a pass of its own. An element's self-conditioning input is None on its first step, else
        as `decode` takes it.
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
        logits = ops.logits(x, self.output, cfg.final_logit_softcapping)
        ends = np.cumsum(sizes).tolist()
        return [logits[end - size:end] for size, end in zip(sizes, ends, strict=True)]

    def _self_condition(self, x: Any, sizes: list[int], self_cond: list[Any | None]) -> Any:
        """Add each element's self-conditioning signal to its embedded rows (elements without one keep theirs).

        The soft embedding runs per element (`self_condition`, unless the caller made it as its step ended): it
        contracts over the vocabulary, so batching it saves nothing but the table's decoding, and per element it
        reads the sampler step's own row statistics (the cpu backend keeps them). The gated MLP then runs over
        all those elements' rows at once.
        """
        ops, cfg = self.ops, self.cfg
        signals = [(s if isinstance(s, SelfCondition) else self.self_condition(s)).soft_embedding
                   for s in self_cond if s is not None]
        if not signals:
            return x
        soft = ops.concat(*signals)
        soft = self._gated_mlp(ops.rms_norm(soft, self.vec["self_cond_pre_norm.weight"], cfg.rms_norm_eps),
                               ("self_cond_gate.weight", "self_cond_up.weight", "self_cond_down.weight"), encoder=False)
        # Element by element, so a first-step element's rows stay exactly as embedded (no + 0.0 turning -0.0 to
        # +0.0): the same arithmetic as a pass of its own.
        pieces, row, signal_row = [], 0, 0
        for size, s in zip(sizes, self_cond, strict=True):
            piece = x[row:row + size]
            if s is not None:
                piece = piece + soft[signal_row:signal_row + size]
                signal_row += size
            pieces.append(piece)
            row += size
        return ops.concat(*pieces)
