"""The cpu backend against the numpy reference: every native kernel, per ggml type and per kernel set this CPU
runs (avx512 / avx2 / generic), then encoder K/V and decoder logits per file type, then token-exact generation
with transformers' replayed draws.

Tolerances, and why:
- Decoding weights (dequant_rows, embed): bit-exact. Each ggml value is one float32 product, rounded once, in the
  same order as gguf-py (Q4_K's d*sc*q and dmin*m are exact, so a fused multiply-add rounds the same too).
- Matmuls (linear, soft embedding, MLP, experts, attention): relative L2 2e-6. Both sides multiply the same
  float32 values and differ only in summation order (the kernels accumulate in registers, in tiles, with FMA);
  each output is a K-term dot product whose rounding differences grow like sqrt(K) * 2^-24 — measured 1e-7 to
  8e-7 for K = 64..1024; the MLPs add GELU's tanh (a few ulp, see below).
- route: the same experts (a tie goes to the lower index, as numpy's stable argsort); weights 1e-6 relative, the
  softmax's exp being the kernels' and numpy's (a few ulp each).
- Elementwise kernels: ulp bounds against numpy's own float32 results. exp/tanh are Cephes' single-precision
  algorithms (<= 2 ulp from correctly rounded, numpy's are within ~1-2 ulp too): softcap <= 4 ulp, rms_norm
  <= 8 ulp (the sum of squares accumulates in double here, pairwise float32 there), softmax <= 16 ulp relative
  (exp plus the row sum). Where the reference formula itself cancels (gelu_tanh's 1 + tanh for x < -4,
  RoPE's x cos - y sin) the bound is on the absolute error in units of the operands' size instead.
- Model, every file type: relative L2 2e-6 on encoder K/V, 1e-5 on logits (3e-5 on the random-block files of
  the types dgrun only reads, see READ_TYPE_FILES). Weights decode exactly and activations stay float32
  (nothing is quantized to int8), so what differs is float32 summation order in every matmul, grown over the
  layers and the soft-capped vocabulary: measured K/V <= 3.6e-7, logits 2.9e-6..5.4e-6 — the float32 noise
  floor of these chaotic random fixtures (numpy vs transformers measures up to 6.5e-6, transformers' own
  float32 vs float64 4.2e-6; see test_reference.py).
- Generation with replayed draws: token-exact, as the numpy backend.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, assert_close
from fixtures import FP16_FIELDS, quantized_or_random, random_blocks
from test_reference import GENERATION_CASES, replay_case

import dgrun
from dgrun import quants
from dgrun import sampler as ref_sampler
from dgrun.backends.numpy_backend import NumpyBackend, gelu_tanh
from dgrun.rng import DefaultRng, ReplayRng

cpu_backend = pytest.importorskip("dgrun.backends.cpu_backend")

try:
    cpu_backend.load_library()
except RuntimeError as e:  # no C compiler here: the error says so, and how to fix it
    pytest.skip(f"cpu backend unavailable: {e}", allow_module_level=True)

CpuBackend, CpuWeight = cpu_backend.CpuBackend, cpu_backend.CpuWeight

MATMUL_RTOL = 2e-6
KV_RTOL = 2e-6
LOGITS_RTOL = 1e-5
EPS32 = float(np.finfo(np.float32).eps)


def _kernel_sets() -> list[str]:
    """Every kernel set this CPU and build run."""
    out = []
    for isa in ("avx512", "avx2", "generic"):
        try:
            CpuBackend(isa=isa)
            out.append(isa)
        except RuntimeError:
            pass
    return out


KERNEL_SETS = _kernel_sets()
TYPES = sorted(CpuBackend.supported_types)
REF = NumpyBackend()


@pytest.fixture(params=KERNEL_SETS)
def cpu(request):
    return CpuBackend(threads=2, isa=request.param, int8=False)


def _weight(x: np.ndarray, ggml_type) -> CpuWeight:
    """`x` quantized to `ggml_type`; for a type dgrun only reads, random valid blocks of x's shape instead."""
    raw, scale = quantized_or_random(x, ggml_type)
    return CpuWeight(raw, quants.get_quant_type(ggml_type).ggml_type, x.shape, scale)


def _matrix(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Rows of spread magnitudes (three decades) and one all-zero row: every block-scale path gets used."""
    x = rng.normal(0, 1, shape) * rng.uniform(0.01, 10, (*shape[:-1], 1))
    x.reshape(-1, shape[-1])[0] = 0
    return x.astype(np.float32)


def _row_width(ggml_type, want: int = 512) -> int:
    return max(want, quants.get_quant_type(ggml_type).block_size)


def _ulps(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance in float32 units in the last place (+0 and -0 are equal)."""
    def ordered(x):
        i = np.asarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)
    return int(np.abs(ordered(a) - ordered(b)).max())


# -- kernels, per ggml type -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_decode_rows_is_bit_exact(cpu, ggml_type):
    rng = np.random.default_rng(int(ggml_type))
    width = _row_width(ggml_type)
    x = _matrix(rng, (41, width))
    w = _weight(x, ggml_type)
    ref = quants.dequantize_tensor(w.raw, ggml_type, w.tensor_scale)
    ids = np.arange(41)
    out = cpu.embed(w, ids, 1.0)
    np.testing.assert_array_equal(out, ref)  # every value equal (+0 == -0)
    ids = rng.integers(0, 41, 77)
    np.testing.assert_array_equal(cpu.embed(w, ids, 2.5), REF.embed(w, ids, 2.5))


@pytest.mark.parametrize("ggml_type", [t for t in TYPES if t.name in FP16_FIELDS], ids=lambda t: t.name)
def test_decode_random_valid_blocks_is_bit_exact(cpu, ggml_type):
    """Random bytes with finite fp16 scales (normal and subnormal): every code, sign and grid index."""
    raw = random_blocks(ggml_type, 9, 1024, np.random.default_rng(int(ggml_type)))
    w = CpuWeight(raw, quants.get_quant_type(ggml_type).ggml_type, (9, 1024))
    np.testing.assert_array_equal(cpu.embed(w, np.arange(9), 1.0), quants.dequantize_tensor(raw, ggml_type))


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 37, 256])
def test_linear(cpu, ggml_type, m):
    rng = np.random.default_rng(m)
    k = _row_width(ggml_type)
    w = _weight(_matrix(rng, (45, k)), ggml_type)  # 45 outputs: a partial panel for every kernel set
    a = rng.normal(0, 1, (m, k)).astype(np.float32)
    assert_close(cpu.linear(a, w), REF.linear(a, w), MATMUL_RTOL, f"linear {ggml_type.name} m={m}")


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_soft_embedding(cpu, ggml_type):
    rng = np.random.default_rng(1)
    n = _row_width(ggml_type, 64)
    table = _weight(_matrix(rng, (300, n)), ggml_type)  # 300 rows: a partial block of decoded rows
    logits = rng.normal(0, 3, (29, 300)).astype(np.float32)
    assert_close(cpu.soft_embed(logits, table, 1.7), REF.soft_embed(logits, table, 1.7), MATMUL_RTOL,
                 f"soft_embed {ggml_type.name}")


def test_soft_embedding_with_a_partial_column_panel(cpu):
    rng = np.random.default_rng(2)
    table = _weight(_matrix(rng, (130, 40)), quants.F32.ggml_type)
    logits = rng.normal(0, 3, (13, 130)).astype(np.float32)
    assert_close(cpu.soft_embed(logits, table, 1.0), REF.soft_embed(logits, table, 1.0), MATMUL_RTOL, "soft_embed")


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_gated_mlp_and_experts(cpu, ggml_type):
    rng = np.random.default_rng(3)
    hidden = _row_width(ggml_type, 256)
    inter = _row_width(ggml_type, 64)
    n, experts, top_k = 70, 6, 2
    x = rng.normal(0, 1, (n, hidden)).astype(np.float32)
    gate, up = (_weight(rng.normal(0, 0.1, (inter, hidden)), ggml_type) for _ in range(2))
    down = _weight(rng.normal(0, 0.1, (hidden, inter)), ggml_type)
    assert_close(cpu.gated_mlp(x, gate, up, down), REF.gated_mlp(x, gate, up, down), MATMUL_RTOL,
                 f"gated_mlp {ggml_type.name}")
    gate_up = _weight(rng.normal(0, 0.1, (experts, 2 * inter, hidden)), ggml_type)
    down_e = _weight(rng.normal(0, 0.1, (experts, hidden, inter)), ggml_type)
    # Experts 4 and 5 never chosen; expert 0 gets most tokens (several token panels).
    probs = rng.random((n, experts)) * np.array([4, 1, 1, 1, 0, 0])
    index = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = rng.uniform(0.2, 1.5, (n, top_k)).astype(np.float32)
    assert_close(cpu.experts(x, weights, index, gate_up, down_e), REF.experts(x, weights, index, gate_up, down_e),
                 MATMUL_RTOL, f"experts {ggml_type.name}")


@pytest.mark.parametrize("experts,top_k,proj_type", [(6, 2, quants.F32.ggml_type), (16, 4, quants.F32.ggml_type),
                                                     (128, 8, quants.F32.ggml_type), (20, 3, quants.F16.ggml_type)])
def test_route_chooses_the_reference_experts(cpu, experts, top_k, proj_type):
    """The same experts in the same order (ties to the lower index), weights within the softmax's exp rounding."""
    rng = np.random.default_rng(experts)
    hidden, n = 256, 37
    x = rng.normal(0, 2, (n, hidden)).astype(np.float32)
    proj_rows = rng.normal(0, 0.2, (experts, hidden)).astype(np.float32)
    proj_rows[2] = proj_rows[1]  # experts 1 and 2 always tie
    proj = _weight(proj_rows, proj_type)
    scale = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
    per_expert = rng.uniform(0.5, 2, experts).astype(np.float32)
    weights, index = cpu.route(x, proj, scale, per_expert, top_k, 1e-6)
    ref_weights, ref_index = REF.route(x, proj, scale, per_expert, top_k, 1e-6)
    assert any(1 in row and 2 in row for row in ref_index), "the tied experts are never both chosen"
    np.testing.assert_array_equal(index, ref_index)
    assert_close(weights, ref_weights, 1e-6, f"route weights ({experts} experts, top {top_k})")


@pytest.mark.parametrize("case", [
    # n, m, heads, kv heads, head dim, value dim, causal, window
    (300, 300, 8, 4, 64, 64, True, 128),    # encoder: causal + sliding window, more queries than a block
    (256, 383, 8, 4, 64, 64, False, None),  # decoder over cache + canvas
    (256, 576, 8, 2, 128, 128, False, None),  # full layer
    (5, 21, 4, 1, 32, 32, True, None),      # fewer queries than a block
    (17, 40, 4, 2, 16, 16, False, None),    # head dim below a tile
])
def test_attention(cpu, case):
    n, m, hq, hkv, d, dv, causal, window = case
    rng = np.random.default_rng(n + m)
    q = rng.normal(0, 1, (n, hq, d)).astype(np.float32)
    k = rng.normal(0, 1, (m, hkv, d)).astype(np.float32)
    v = rng.normal(0, 1, (m, hkv, dv)).astype(np.float32)
    q_pos, k_pos = np.arange(m - n, m), np.arange(m)
    assert_close(cpu.attention(q, k, v, q_pos, k_pos, causal, window),
                 REF.attention(q, k, v, q_pos, k_pos, causal, window), MATMUL_RTOL, f"attention {case}")


@pytest.mark.parametrize("causal,window", [(True, 7), (True, None), (True, 1), (False, 40)])
def test_attention_over_visible_key_ranges(cpu, causal, window):
    """Long key arrays where each query block sees a small range (a window far into a prompt, a causal chunk
    after a cache), positions with gaps and repeats, ranges that start and end inside a tile of keys."""
    rng = np.random.default_rng(11)
    m, n, hq, hkv, d = 700, 61, 4, 2, 32
    k_pos = np.sort(rng.integers(0, 900, m))
    q_pos = np.sort(rng.integers(300, 1000, n))
    q = rng.normal(0, 1, (n, hq, d)).astype(np.float32)
    k, v = rng.normal(0, 1, (m, hkv, d)).astype(np.float32), rng.normal(0, 1, (m, hkv, d)).astype(np.float32)
    out = cpu.attention(q, k, v, q_pos, k_pos, causal, window)
    with np.errstate(invalid="ignore"):  # the reference's softmax over masked keys only
        ref = REF.attention(q, k, v, q_pos, k_pos, causal, window)
    # A query whose window holds no key gets NaN (0/0) from both.
    empty = np.isnan(ref).all(axis=(1, 2))
    assert np.array_equal(np.isnan(out).all(axis=(1, 2)), empty) and not np.isnan(ref[~empty]).any()
    assert_close(out[~empty], ref[~empty], MATMUL_RTOL, f"attention causal={causal} window={window}")


def test_attention_refuses_unsorted_key_positions(cpu):
    q, k = np.ones((2, 2, 16), np.float32), np.ones((3, 1, 16), np.float32)
    with pytest.raises(ValueError, match="ascending"):
        cpu.attention(q, k, k, np.arange(2), np.array([0, 2, 1]), True, None)


# -- elementwise and row kernels ----------------------------------------------------------------------------------


def test_softcap_within_4_ulp(cpu):
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(0, s, 50_001) for s in (0.01, 1, 30, 300)] + [[0, -0.0, 1e-30, 88, -88]])
    x = x.astype(np.float32)
    assert _ulps(cpu.softcap(x, 30.0), REF.softcap(x, 30.0)) <= 4


def test_rms_norm_within_8_ulp(cpu):
    rng = np.random.default_rng(5)
    x = rng.normal(0, 2, (300, 8, 64)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    assert _ulps(cpu.rms_norm(x, w, 1e-6), REF.rms_norm(x, w, 1e-6)) <= 8
    x2 = rng.normal(0, 2, (7, 1000)).astype(np.float32)  # width not a multiple of any vector
    assert _ulps(cpu.rms_norm(x2, None, 1e-6), REF.rms_norm(x2, None, 1e-6)) <= 8


def test_gelu_mul(cpu):
    rng = np.random.default_rng(6)
    g = rng.normal(0, 3, 100_003).astype(np.float32)
    u = rng.normal(0, 1, g.size).astype(np.float32)
    out = np.empty_like(g)
    assert cpu.lib.dg_gelu_mul(cpu._p(g), cpu._p(u), g.size, cpu._p(out)) == 0
    ref = gelu_tanh(g) * u
    # 1 + tanh(.) cancels for g < -4 in both implementations: bound the error by the operands' size.
    assert np.all(np.abs(out - ref) <= 8 * EPS32 * (np.abs(g * u) + np.abs(ref)))


def test_rope(cpu):
    rng = np.random.default_rng(7)
    x = rng.normal(0, 1, (300, 8, 64)).astype(np.float32)
    positions = np.arange(300) * 37  # angles up to ~1e4 rad
    inv_freq = (1.0 / 10000 ** (np.arange(0, 64, 2) / 64)).astype(np.float32)
    inv_freq[24:] = 0  # proportional RoPE: zero frequencies pass through
    out, ref = cpu.rope(x, positions, inv_freq), REF.rope(x, positions, inv_freq)
    # x cos - y sin cancels: bound by the size of the two rotated inputs.
    scale = np.abs(x) + np.abs(np.concatenate([x[..., 32:], x[..., :32]], axis=-1))
    assert np.all(np.abs(out - ref) <= 8 * EPS32 * scale)


def test_rope_angle_tables_are_reused_and_bounded():
    """The angles' cos / sin are kept per (positions, frequencies): a kept table turns rows exactly as a fresh
    one, other positions or frequencies get their own, and only the most recently used few are kept."""
    rng = np.random.default_rng(9)
    x = rng.normal(0, 1, (40, 2, 16)).astype(np.float32)
    inv_freq = (1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)
    cpu = CpuBackend(threads=2)
    first = cpu.rope(x, np.arange(40), inv_freq)
    np.testing.assert_array_equal(cpu.rope(x, np.arange(40), inv_freq), first)
    np.testing.assert_array_equal(CpuBackend(threads=2).rope(x, np.arange(40), inv_freq), first)
    assert not np.array_equal(cpu.rope(x, np.arange(1, 41), inv_freq), first)
    assert not np.array_equal(cpu.rope(x, np.arange(40), inv_freq * 2), first)
    for start in range(3 * cpu_backend._ROPE_TABLES):
        cpu.rope(x, np.arange(start, start + 40), inv_freq)
    assert len(cpu._rope_cache) == cpu_backend._ROPE_TABLES


def test_softmax_within_16_ulp(cpu):
    rng = np.random.default_rng(8)
    x = rng.normal(0, 5, (33, 3001)).astype(np.float32)
    out, ref = cpu.softmax(x), ref_sampler.softmax(x)
    np.testing.assert_allclose(out, ref, rtol=16 * EPS32, atol=1e-37)


@pytest.mark.parametrize("clamped", [False, True])
def test_denoise_step(cpu, clamped):
    rng = np.random.default_rng(9)
    logits = (np.tanh(rng.normal(0, 1, (64, 5000))) * 30).astype(np.float32)
    canvas = rng.integers(0, 5000, 64)
    clamp = (np.arange(64) % 5 == 0) if clamped else None
    ours = cpu.denoise_step(logits.copy(), canvas, 0.7, 3.0, DefaultRng(11), clamp)
    ref = ref_sampler.denoise_step(logits, canvas, 0.7, 3.0, DefaultRng(11), clamp)
    np.testing.assert_array_equal(ours.processed_logits, ref.processed_logits)  # one IEEE division
    np.testing.assert_array_equal(ours.argmax, ref.argmax)
    # Identical draws: a uniform would have to land within ~1e-7 of a CDF step to differ (none does here).
    np.testing.assert_array_equal(ours.canvas, ref.canvas)
    np.testing.assert_array_equal(ours.accepted, ref.accepted)
    assert ours.mean_entropy == pytest.approx(ref.mean_entropy, rel=1e-5)


def test_fused_sampler_is_in_place_and_draws_as_default_rng(cpu):
    """The step overwrites its logits with the processed logits (no other canvas x vocab array); its native
    inverse CDF is DefaultRng.categorical itself on the kernels' probabilities (`softmax`, made on the fly
    with the same bits); its entropy is the reference's within 1e-5."""
    rng = np.random.default_rng(12)
    logits = (rng.normal(0, 4, (37, 3001)) * rng.uniform(0.1, 3, (37, 1))).astype(np.float32)
    logits[5, 100] = 80  # a row with all its mass on one token
    x = logits.copy()
    result = cpu.denoise_step(x, np.zeros(37, np.int64), 0.7, 1.0, DefaultRng(12))
    assert result.processed_logits is x
    assert cpu._stats[id(x)][0]() is x  # its row statistics, kept for this element's next soft embedding
    np.testing.assert_array_equal(x, logits / np.float32(0.7))
    probs = cpu.softmax(x)
    np.testing.assert_allclose(probs, ref_sampler.softmax(x), rtol=16 * EPS32, atol=1e-37)
    draws = DefaultRng(12).categorical(probs)
    argmax, entropy, sampled = np.empty(37, np.int64), np.empty(37, np.float32), np.empty(37, np.int64)
    stats = cpu_backend.RowStats.empty(37)
    y = logits.copy()
    u = DefaultRng(12).uniform(37)
    assert cpu.lib.dg_sampler(cpu._p(y), 37, 3001, 0.7, cpu._p(argmax, "int64_t *"), cpu._p(entropy),
                              cpu._p(u, "double *"), cpu._p(sampled, "int64_t *"), 20.0, 8,
                              *cpu._stats_args(stats)) == 0
    np.testing.assert_array_equal(sampled, draws)
    np.testing.assert_array_equal(argmax, x.argmax(axis=-1))
    np.testing.assert_allclose(entropy, ref_sampler.entropy(x), rtol=1e-5, atol=1e-6)
    # The soft embedding's split: tokens within 20 of the row's maximum, and the mass of the rest.
    keep = x - x.max(axis=-1, keepdims=True) >= np.float32(-20.0)
    np.testing.assert_array_equal(stats.kept_n, keep.sum(axis=-1))
    ref_mass = np.where(keep, 0, ref_sampler.softmax(x)).sum(axis=-1, dtype=np.float64)
    np.testing.assert_allclose(stats.mass, ref_mass, rtol=1e-5, atol=1e-300)
    kept = stats.kept.reshape(-1)[:37 * 8].reshape(37, 8)  # max_kept 8 per row here
    for i in np.flatnonzero(stats.kept_n <= 8):
        np.testing.assert_array_equal(kept[i, :stats.kept_n[i]], np.flatnonzero(keep[i]))
    assert stats.kept_n[5] == 1 and stats.mass[5] < 1e-20


@pytest.mark.parametrize("vocab", [3, 8, 17, 1000, 4099])
def test_native_draw_resumes_at_the_right_mark(cpu, vocab):
    """The inverse CDF's second pass resumes the running sums at the last mark (every vocab / 64 values) at or
    below the target: targets just below, at and above the marks, at 0 and near 1 draw what the whole-row
    definition draws (cdf = cumsum(float64(p)), the count of cdf <= u * cdf[-1])."""
    rng = np.random.default_rng(vocab)
    x = rng.normal(0, 3, (1, vocab)).astype(np.float32)
    x[0, rng.integers(0, vocab, 2)] = -200  # probabilities that underflow: flat stretches of the cdf
    cdf = np.cumsum(cpu.softmax(x)[0].astype(np.float64))
    lanes = {"avx512": 16, "avx2": 8}.get(cpu.isa, 4)  # the kernel set's vector width (VL)
    chunk = math.ceil(math.ceil(vocab / 64) / lanes) * lanes  # dg_kernels.c's inverse_cdf
    ks = [k for c in range(1, vocab // chunk + 1) for k in (c * chunk - 2, c * chunk - 1, c * chunk) if k < vocab]
    us = [0.0, 1 - 2**-53, 0.5] + [float(np.nextafter(cdf[k] / cdf[-1], d)) for k in ks for d in (0, 2)]
    us += [cdf[k] / cdf[-1] for k in ks]
    u = np.array(us)
    rows = np.repeat(x, len(u), axis=0)
    want = np.minimum((cdf[None, :] <= u[:, None] * cdf[-1]).sum(axis=1), vocab - 1)
    sampled, argmax = np.empty(len(u), np.int64), np.empty(len(u), np.int64)
    entropy, stats = np.empty(len(u), np.float32), cpu_backend.RowStats.empty(len(u))
    assert cpu.lib.dg_sampler(cpu._p(rows), len(u), vocab, 1.0, cpu._p(argmax, "int64_t *"), cpu._p(entropy),
                              cpu._p(u, "double *"), cpu._p(sampled, "int64_t *"), 20.0, 8,
                              *cpu._stats_args(stats)) == 0
    np.testing.assert_array_equal(sampled, want)


def test_denoise_step_with_another_rng_gets_the_probabilities(cpu):
    rng = np.random.default_rng(10)
    logits = rng.normal(0, 4, (16, 300)).astype(np.float32)
    canvas = rng.integers(0, 300, 16)
    draws = [("categorical", rng.integers(0, 300, 16)), ("tokens", rng.integers(0, 300, 16))]
    ours = cpu.denoise_step(logits.copy(), canvas, 1.3, 1.0, ReplayRng(draws))
    ref = ref_sampler.denoise_step(logits, canvas, 1.3, 1.0, ReplayRng(draws))
    np.testing.assert_array_equal(ours.canvas, ref.canvas)
    np.testing.assert_array_equal(ours.accepted, ref.accepted)


def test_thread_count_changes_nothing_but_summation_order():
    rng = np.random.default_rng(11)
    w = _weight(_matrix(rng, (300, 256)), quants.Q4_K.ggml_type)
    a = rng.normal(0, 1, (70, 256)).astype(np.float32)
    p = rng.normal(0, 3, (70, 300)).astype(np.float32)
    one, three = CpuBackend(threads=1), CpuBackend(threads=3)
    # Every output element of linear is one thread's dot product: identical for any thread count.
    np.testing.assert_array_equal(one.linear(a, w), three.linear(a, w))
    # The soft embedding splits the vocabulary over threads: repeatable per count, close across counts.
    np.testing.assert_array_equal(three.soft_embed(p, w, 1.0), three.soft_embed(p, w, 1.0))
    assert_close(one.soft_embed(p, w, 1.0), three.soft_embed(p, w, 1.0), MATMUL_RTOL, "soft_embed threads")


def test_fewer_threads_than_asked_for_are_enough():
    """OpenMP may give a region fewer threads than asked (OMP_THREAD_LIMIT, a caller's own parallel region): the
    soft embedding's per-thread partial sums are then those of the team it got (it read missing ones: a crash),
    in float32 (an f32 table) and in integers (a Q8_0 one)."""
    script = (
        "import numpy as np\n"
        "from dgrun import quants\n"
        "from dgrun.backends.cpu_backend import CpuBackend\n"
        "rng = np.random.default_rng(12)\n"
        "table = rng.normal(0, 1, (5000, 64)).astype(np.float32)\n"
        "p = rng.normal(0, 0.01, (9, 5000)).astype(np.float32)  # flat rows: the dense product\n"
        "two, one = CpuBackend(threads=2), CpuBackend(threads=1)\n"
        "for raw, t in ((table.view(np.uint8), 0), (quants.quantize_tensor(table, 8)[0], 8)):\n"
        "    out = two.soft_embed(p, two.weight(raw, t, table.shape), 1.0)\n"
        "    assert (two.soft_embed_paths < 0).all()\n"
        "    assert np.array_equal(out, one.soft_embed(p, one.weight(raw, t, table.shape), 1.0))\n"
        "print('ok')\n")
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_recycled_output_arrays_never_change_under_a_holder():
    cpu = CpuBackend(threads=2)
    rng = np.random.default_rng(12)
    w = _weight(rng.normal(0, 1, (4096, 64)), quants.F32.ggml_type)
    xs = [rng.normal(0, 1, (300, 64)).astype(np.float32) for _ in range(4)]  # outputs of 1.2M floats: pooled
    first = cpu.linear(xs[0], w)
    view = cpu.linear(xs[1], w)[:, :7]  # only a view survives: its array must not be reused either
    kept, kept_view = first.copy(), view.copy()
    third = cpu.linear(xs[2], w)
    assert not np.shares_memory(third, first) and not np.shares_memory(third, view)
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_array_equal(view, kept_view)
    pooled = len(cpu._pool)
    del third  # nobody holds it now: the next output reuses it
    fourth = cpu.linear(xs[3], w)
    assert len(cpu._pool) == pooled
    assert_close(fourth, REF.linear(xs[3], w), MATMUL_RTOL, "recycled output")


# -- the model -----------------------------------------------------------------------------------------------------

FILES = [("base", "f32"), ("top1", "f32"), ("base", "f16"), ("bf16", "bf16"), ("quant", "q8_0"),
         ("quant", "q4_k_m"), ("quant", "mxfp4_moe"), ("quant", "nvfp4_moe")]
# Every matrix in one type dgrun reads but does not write (llama-quantize's fallback on the 64-wide rows), random
# valid blocks of the f32 file's spread (fixtures.write_retyped). Decoding is covered per kernel set above, so
# these run on the default one only. Their logits tolerance: the decoders are exact, so again only float32
# summation order differs, but these heavier-tailed random-block weights sit at a higher noise floor. Measured
# against a float64 evaluation of the same file, numpy and cpu are each 1.7e-6..9.3e-6 off (the f32 file: 5e-6),
# often on opposite sides: cpu vs numpy 2.1e-6..1.5e-5 (IQ3_S, self-conditioning on). Bound 2x that.
READ_TYPE_FILES = [("quant", f"all-{t}") for t in ("Q5_1", "Q5_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ2_S")]
READ_TYPE_LOGITS_RTOL = 3e-5
MODEL_CASES = [(isa, *f) for isa in KERNEL_SETS for f in FILES] + [(KERNEL_SETS[0], *f) for f in READ_TYPE_FILES]


@pytest.mark.parametrize("isa,name,outtype", MODEL_CASES)
def test_encoder_kv_and_decoder_logits_match_numpy(checkpoints, name, outtype, isa, monkeypatch):
    monkeypatch.setenv("DGRUN_CPU_ISA", isa)
    ckpt = checkpoints[name]
    path = ckpt.dgf(outtype)
    cfg = ckpt.model.config.text_config
    canvas_length = ckpt.model.config.canvas_length
    rng = np.random.default_rng(len(outtype))
    prompt = rng.integers(0, cfg.vocab_size, 21)  # longer than the sliding window
    committed = rng.integers(0, cfg.vocab_size, canvas_length)
    canvas = rng.integers(0, cfg.vocab_size, canvas_length)
    self_cond = rng.normal(0, 3, (canvas_length, cfg.vocab_size)).astype(np.float32)
    with dgrun.load(path, backend="numpy") as ref, dgrun.load(path, backend="cpu") as ours:
        assert ours.backend.isa == isa
        ref_cache, cache = ref.graph.new_cache(), ours.graph.new_cache()
        for chunk in (prompt, committed):
            ref.graph.encode(chunk, ref_cache)
            ours.graph.encode(chunk, cache)
        for i in range(cfg.num_hidden_layers):
            assert_close(cache.keys[i], ref_cache.keys[i], KV_RTOL, f"{name}/{outtype} layer {i} keys")
            assert_close(cache.values[i], ref_cache.values[i], KV_RTOL, f"{name}/{outtype} layer {i} values")
        rtol = READ_TYPE_LOGITS_RTOL if outtype.startswith("all-") else LOGITS_RTOL
        for sc in (None, self_cond):
            assert_close(ours.graph.decode(canvas, cache, sc), ref.graph.decode(canvas, ref_cache, sc), rtol,
                         f"{name}/{outtype} logits (self-cond {'on' if sc is not None else 'off'})")


def test_weights_stay_in_the_file_mapping(checkpoints):
    with dgrun.load(checkpoints["quant"].dgf("q4_k_m"), backend="cpu") as model:
        data = model._file._data
        for name, w in model.graph.w.items():
            assert isinstance(w, CpuWeight) and np.shares_memory(w.raw, data), name


@pytest.mark.parametrize("case", list(GENERATION_CASES))
def test_generation_is_token_exact_with_replayed_draws(checkpoints, case):
    hf_tokens, out = replay_case(checkpoints, case, backend="cpu")
    assert out.tokens == hf_tokens


def test_default_rng_generation_matches_numpy_backend(checkpoints):
    path = checkpoints["gen"].dgf("f32")
    outs = []
    for backend in ("numpy", "cpu"):
        with dgrun.load(path, backend=backend) as model:
            outs.append(model.generate([2, 9, 4], max_new_tokens=32, max_denoising_steps=6, seed=3,
                                       adaptive_stopping=False).tokens)
    assert outs[0] == outs[1]


def test_nan_logits_stop_generation_with_an_error(checkpoints, monkeypatch):
    with dgrun.load(checkpoints["gen"].dgf("f32"), backend="cpu") as model:
        decode_batch = model.graph.decode_batch

        def poisoned(canvases, caches, self_conds):
            logits = [x.copy() for x in decode_batch(canvases, caches, self_conds)]
            logits[0][3, 5] = np.nan
            return logits

        monkeypatch.setattr(model.graph, "decode_batch", poisoned)
        with pytest.raises(FloatingPointError, match="NaN logits"):
            model.generate([2, 3, 4], max_new_tokens=16, max_denoising_steps=2, seed=0)


# -- construction ---------------------------------------------------------------------------------------------------


def test_threads_from_argument_and_environment(monkeypatch):
    monkeypatch.setenv("DGRUN_THREADS", "3")
    assert CpuBackend().threads == 3
    assert CpuBackend(threads=1).threads == 1
    monkeypatch.setenv("DGRUN_THREADS", "many")
    with pytest.raises(RuntimeError, match="DGRUN_THREADS"):
        CpuBackend()


def test_registry_names_the_backend():
    from dgrun.backends import get_backend

    backend = get_backend("cpu")
    assert backend.name == "cpu" and backend.isa in KERNEL_SETS


def test_unknown_kernel_set_is_refused():
    with pytest.raises(RuntimeError, match="kernel set"):
        CpuBackend(isa="sse9")


def test_without_a_compiler_the_backend_says_how_to_fix_it(tmp_path):
    script = ("from dgrun.backends import get_backend, BackendUnavailable\n"
              "try:\n    get_backend('cpu')\nexcept BackendUnavailable as e:\n    print(e)\n")
    env = {"PATH": "/nonexistent", "CC": "no-such-cc", "DGRUN_CACHE_DIR": str(tmp_path), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO)
    assert "no C compiler found" in proc.stdout and "gcc" in proc.stdout, proc.stdout + proc.stderr
