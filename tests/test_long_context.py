"""Long prompts: the encoder in chunks, attention over visible key ranges, caches that hold only what they need.

Parity with transformers on prompts many chunks long is in test_reference.py (K/V, logits) and in the shared
GENERATION_CASES ("prompt_in_chunks", run on every backend); here, what a long prompt costs:
- the reference attention, visiting one key range per query block, equals the dense masked softmax (3e-6
  relative: the same products summed over fewer exact zeros and in another order, einsum against matmul, whose
  rounding grows like sqrt(keys) * 2^-24, 1.8e-6 for 900 keys; measured 1.3e-6);
- a cache retains exactly its arrays' own bytes (no view keeps a concatenation alive) and exactly the rows the
  decoder reads: window-1 per sliding layer, every position per full layer;
- encoding in chunks bounds the reference's peak memory by one chunk's activations plus a few copies of the
  cache, where one pass over the whole prompt grows with it.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest
from conftest import assert_close

import dgrun
from dgrun import sampler
from dgrun.backends.numpy_backend import NumpyBackend, visible_key_range

REF = NumpyBackend()


def dense_attention(q, k, v, q_pos, k_pos, causal, window):
    """The plain definition: every key scored, masked, softmaxed (what the reference did before key ranges)."""
    groups = q.shape[1] // k.shape[1]
    kh, vh = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scores = np.einsum("nhd,mhd->hnm", q, kh)
    visible = np.ones((len(q_pos), len(k_pos)), bool)
    if causal:
        visible &= k_pos[None] <= q_pos[:, None]
    if window is not None:
        visible &= k_pos[None] > q_pos[:, None] - window
    with np.errstate(invalid="ignore"):
        probs = sampler.softmax(np.where(visible[None], scores, -np.inf))
    return np.einsum("hnm,mhd->nhd", probs, vh).astype(np.float32)


@pytest.mark.parametrize("causal,window", [(True, None), (True, 9), (False, 30), (False, None), (True, 1)])
def test_reference_attention_equals_the_dense_definition(causal, window):
    rng = np.random.default_rng(3)
    n, m = 600, 900  # more queries than one block of the reference (256)
    k_pos = np.sort(rng.integers(0, 1200, m))  # gaps and repeats
    q_pos = np.sort(rng.integers(200, 1300, n))
    q, k, v = (rng.normal(0, 1, (n, 4, 16)).astype(np.float32), rng.normal(0, 1, (m, 2, 16)).astype(np.float32),
               rng.normal(0, 1, (m, 2, 16)).astype(np.float32))
    with np.errstate(invalid="ignore"):
        out = REF.attention(q, k, v, q_pos, k_pos, causal, window)
    ref = dense_attention(q, k, v, q_pos, k_pos, causal, window)
    nan = np.isnan(ref).all(axis=(1, 2))  # queries that see no key: 0/0 in both
    assert np.array_equal(np.isnan(out).all(axis=(1, 2)), nan)
    assert_close(out[~nan], ref[~nan], 3e-6, f"attention causal={causal} window={window}")


def test_visible_key_ranges_leave_out_only_keys_no_query_sees():
    rng = np.random.default_rng(4)
    k_pos = np.sort(rng.integers(0, 500, 400))
    for _ in range(300):
        q_pos = np.sort(rng.integers(0, 600, rng.integers(1, 40)))
        for causal, window in [(True, None), (True, 16), (False, 16), (False, None)]:
            lo, hi = visible_key_range(k_pos, int(q_pos.min()), int(q_pos.max()), causal, window)
            seen = np.ones((len(q_pos), len(k_pos)), bool)
            if causal:
                seen &= k_pos[None] <= q_pos[:, None]
            if window is not None:
                seen &= k_pos[None] > q_pos[:, None] - window
            outside = np.r_[0:lo, hi:len(k_pos)]
            assert not seen[:, outside].any() and 0 <= lo <= hi <= len(k_pos)


def test_reference_attention_refuses_unsorted_keys():
    q = np.ones((2, 2, 8), np.float32)
    with pytest.raises(ValueError, match="ascending"):
        REF.attention(q, q, q, np.arange(2), np.array([1, 0]), True, None)


def retained_bytes(a: Any) -> int:
    """Memory an array keeps alive: the whole buffer it views (numpy's base chain, a DeviceArray's buffer)."""
    if isinstance(a, np.ndarray):
        while isinstance(a.base, np.ndarray):
            a = a.base
        return a.nbytes
    return a.buffer.nbytes


def assert_cache_holds_only_what_it_needs(path: Any, backend: str) -> None:
    """Encode 150 tokens in chunks of 7 (and a canvas on top): every layer retains exactly its own arrays' bytes,
    and those hold window-1 rows (sliding) or every position (full)."""
    with dgrun.load(path, backend=backend) as model:
        model.graph.encode_chunk = 7
        cfg = model.config
        cache = model.graph.new_cache()
        rng = np.random.default_rng(5)
        for ids in (rng.integers(0, cfg.vocab_size, 150), rng.integers(0, cfg.vocab_size, cfg.canvas_length)):
            model.graph.encode(ids, cache)
            for i in range(cfg.num_hidden_layers):
                rows = min(cache.length, cfg.sliding_window - 1) if cfg.is_sliding(i) else cache.length
                shape = (rows, cfg.layer_kv_heads(i), cfg.layer_head_dim(i))
                for kind, a in (("keys", cache.keys[i]), ("values", cache.values[i])):
                    assert tuple(a.shape) == shape, f"layer {i} {kind}: {a.shape} != {shape}"
                    assert retained_bytes(a) == a.nbytes, f"layer {i} {kind} keeps {retained_bytes(a)} bytes " \
                                                          f"alive for {a.nbytes} of its own"
                assert np.array_equal(cache.positions[i], np.arange(cache.length - rows, cache.length))
                assert retained_bytes(cache.positions[i]) == cache.positions[i].nbytes


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_cache_holds_only_what_it_needs(checkpoints, backend):
    if backend not in dgrun.backends.available_backends():
        pytest.skip(f"backend {backend} unavailable here")
    assert_cache_holds_only_what_it_needs(checkpoints["base"].dgf("f32"), backend)


def test_encoder_peak_memory_is_bounded_by_the_chunk(checkpoints):
    """numpy reports its allocations to tracemalloc. Encoding 1024 tokens 32 at a time peaks at one chunk's
    activations, plus a few copies of the cache (the full layers' K/V repeated per query head, the copy a chunk
    appends to) and of one chunk's scores against it (masked, exponentiated, normalised): far below one pass
    over the whole prompt, whose activations grow with it."""
    rng = np.random.default_rng(6)

    def peak_and_cache(model: Any, n: int, chunk: int) -> tuple[int, int]:
        model.graph.encode_chunk = chunk
        cache = model.graph.new_cache()
        ids = rng.integers(0, model.config.vocab_size, n)
        model.graph.encode(ids[:8], model.graph.new_cache())  # first-call allocations out of the way
        tracemalloc.start()
        try:
            model.graph.encode(ids, cache)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return peak, sum(a.nbytes for a in [*cache.keys, *cache.values])

    n, chunk = 1024, 32
    with dgrun.load(checkpoints["base"].dgf("f32"), backend="numpy") as model:
        one_chunk, _ = peak_and_cache(model, chunk, chunk)
        chunked, cache_bytes = peak_and_cache(model, n, chunk)
        whole, _ = peak_and_cache(model, n, n)
        scores = 4 * model.config.num_attention_heads * chunk * n
    assert chunked <= one_chunk + 6 * cache_bytes + 6 * scores, (chunked, one_chunk, cache_bytes, scores)
    assert chunked < whole / 3, (chunked, whole)
