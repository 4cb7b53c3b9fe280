"""The MLX backend against the numpy reference: lossless repacking, encoder K/V and decoder logits per file
type, the device sampler step, and token-exact generation with transformers' replayed draws.

Tolerance: relative L2 2e-5 on K/V and logits for every file type. The repack is exact (checked value for
value below), so both backends multiply the same float32 weights; what remains is summation order inside
matmuls, softmax, attention and the NVFP4 tensor scale (applied after the matmul here, to each weight there).
Measured on MLX CPU: K/V <= 4e-7, logits 4e-6..8e-6, no op dominating. That logit level is this fixture's
float32 noise floor, not MLX's: numpy against transformers on the same inputs measures the same 5e-6..8e-6.
The bound leaves 2.5x for other devices' kernels (Metal's matmul and attention block their sums differently).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'dgrun[mlx]')")

from conftest import assert_close  # noqa: E402
from fixtures import random_blocks  # noqa: E402
from test_reference import GENERATION_CASES, replay_case  # noqa: E402

import dgrun  # noqa: E402
from dgrun import quants  # noqa: E402
from dgrun import sampler as ref_sampler  # noqa: E402
from dgrun.backends import mlx_backend  # noqa: E402
from dgrun.backends.mlx_backend import LAYOUTS, DenseWeight, MlxBackend, repack_mxfp4, repack_nvfp4  # noqa: E402
from dgrun.backends.numpy_backend import NumpyBackend  # noqa: E402
from dgrun.backends.numpy_backend import Weight as NumpyWeight  # noqa: E402
from dgrun.rng import DefaultRng, ReplayRng  # noqa: E402

RTOL = 2e-5


@pytest.mark.parametrize("ggml_type", list(LAYOUTS), ids=lambda t: t.name)
def test_repack_decodes_to_exactly_the_ggml_values(ggml_type):
    rng = np.random.default_rng(int(ggml_type))
    shape = (3, 4, 512)  # three "experts" of four rows
    if quants.can_quantize(ggml_type, shape[-1]):
        # Magnitudes spread over three decades, and one all-zero row.
        x = rng.normal(0, 1, shape) * rng.uniform(0.01, 10, (*shape[:2], 1))
        x[0, 0] = 0
        raw, tensor_scale = quants.quantize_tensor(x.astype(np.float32), ggml_type)
    else:  # a type dgrun only reads: random bytes (every code, sign, grid index), finite fp16 scales
        raw, tensor_scale = random_blocks(ggml_type, 12, shape[-1], rng).reshape(*shape[:2], -1), None
    ref = quants.dequantize_tensor(raw, ggml_type, tensor_scale).reshape(shape)
    layout = LAYOUTS[ggml_type]
    packed, scales, biases = layout.repack(raw)
    out = mx.dequantize(mx.array(packed), mx.array(scales), None if biases is None else mx.array(biases),
                        group_size=layout.group_size, bits=layout.bits, mode=layout.mode, dtype=mx.float32)
    out = np.array(out) * np.float32(1.0 if tensor_scale is None else tensor_scale)
    # rtol 0: every value equal (a zero may carry the other sign, which no product or sum can tell apart).
    assert_close(out, ref, 0.0, f"{ggml_type.name} repacked")


def test_scale_bytes_without_an_mlx_value_are_refused():
    # No quantizer writes them, but a file could: the loader then falls back to dequantizing the tensor.
    mxfp4 = np.zeros((1, quants.MXFP4.type_size), dtype=np.uint8)
    mxfp4[0, 0] = 0xFF
    nvfp4 = np.zeros((1, quants.NVFP4.type_size), dtype=np.uint8)
    nvfp4[0, 2] = 0xFF
    for repack, raw in ((repack_mxfp4, mxfp4), (repack_nvfp4, nvfp4)):
        with pytest.raises(ValueError, match="0xFF"):
            repack(raw)


FILES = [("base", "f32"), ("base", "bf16"), ("quant", "q8_0"), ("quant", "q4_k_m"), ("quant", "mxfp4_moe"),
         ("quant", "nvfp4_moe")]
# Every matrix in one type dgrun reads but does not write, as random valid blocks (fixtures.write_retyped). The
# repack is exact, so only summation order differs again, at these heavier-tailed weights' higher noise floor:
# measured 2.5e-6..7.9e-6 (numpy itself is up to 7.5e-6 off a float64 evaluation of the same file, see
# test_cpu_backend.READ_TYPE_FILES); the cpu backend's bound, 3e-5, holds here too.
READ_TYPE_FILES = [("quant", f"all-{t}") for t in ("Q5_1", "Q5_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ2_S")]
READ_TYPE_RTOL = 3e-5
# Files with tensors in a type without an MLX layout, which is expanded to float32 at load with a notice.
DENSE_AT_LOAD = {"q4_k_m": "Q6_K", "all-IQ2_S": "IQ2_S"}


@pytest.mark.parametrize(("name", "outtype"), FILES + READ_TYPE_FILES,
                         ids=[f"{n}-{t}" for n, t in FILES + READ_TYPE_FILES])
def test_encoder_kv_and_decoder_logits_match_numpy(checkpoints, capsys, name, outtype):
    path = checkpoints[name].dgf(outtype)
    capsys.readouterr()
    ours, ref = dgrun.load(path, backend="mlx"), dgrun.load(path, backend="numpy")
    notice = capsys.readouterr().err
    # q4_k_m's Q6_K tensors (embedding, more-bits down projections) and IQ2_S have no MLX layout: dequantized.
    dense = DENSE_AT_LOAD.get(outtype)
    assert ("no lossless layout" in notice) == (dense is not None), notice
    assert dense is None or (f"{dense} (" in notice and "MiB" in notice), notice
    rtol = READ_TYPE_RTOL if outtype.startswith("all-") else RTOL
    cfg = ref.config
    rng = np.random.default_rng(7)
    prompt = rng.integers(0, cfg.vocab_size, 21)  # longer than the sliding window: the cache gets trimmed
    committed = rng.integers(0, cfg.vocab_size, cfg.canvas_length)
    canvas = rng.integers(0, cfg.vocab_size, cfg.canvas_length)
    self_cond = rng.normal(0, 3, (cfg.canvas_length, cfg.vocab_size)).astype(np.float32)
    ops = ours.backend
    cache, ref_cache = ours.graph.new_cache(), ref.graph.new_cache()
    for chunk in (prompt, committed):
        ours.graph.encode(chunk, cache)
        ref.graph.encode(chunk, ref_cache)
        for i in range(cfg.num_hidden_layers):
            for kind, ours_kv, ref_kv in (("keys", cache.keys, ref_cache.keys),
                                          ("values", cache.values, ref_cache.values)):
                assert_close(ops.to_numpy(ours_kv[i]), ref_kv[i], rtol, f"{outtype} layer {i} {kind}")
    for sc in (None, self_cond):
        out = ops.to_numpy(ours.graph.decode(canvas, cache, sc))
        what = f"{outtype} decoder logits (self-cond {'on' if sc is not None else 'off'})"
        assert_close(out, ref.graph.decode(canvas, ref_cache, sc), rtol, what)
    ours.close()
    ref.close()


# cold: most probabilities underflow to 0, so the device's float32 CDF has long flat tails.
@pytest.mark.parametrize(("temp", "bound"), [(1.3, 4.0), (0.02, 0.05)], ids=["warm", "cold"])
@pytest.mark.parametrize("clamped", [False, True])
@pytest.mark.parametrize("rng_kind", ["default", "replay"])
def test_denoise_step_matches_the_reference_sampler(temp, bound, clamped, rng_kind):
    gen = np.random.default_rng(11)
    n, vocab = 16, 200
    logits = (gen.normal(0, 4, (n, vocab)) * gen.uniform(0.2, 2, (n, 1))).astype(np.float32)
    canvas = gen.integers(0, vocab, n)
    clamp = gen.random(n) < 0.3 if clamped else None
    if rng_kind == "default":
        ours_rng, ref_rng = DefaultRng(5), DefaultRng(5)
    else:
        draws = [("categorical", gen.integers(0, vocab, n)), ("tokens", gen.integers(0, vocab, n))]
        ours_rng, ref_rng = ReplayRng(draws), ReplayRng(draws)
    backend = MlxBackend()
    out = backend.denoise_step(backend.asarray(logits), canvas, temp, bound, ours_rng, clamp)
    ref = ref_sampler.denoise_step(logits, canvas, temp, bound, ref_rng, clamp)
    assert isinstance(out.processed_logits, mx.array), "processed logits must stay on the device"
    assert_close(backend.to_numpy(out.processed_logits), ref.processed_logits, 1e-6, "processed logits")
    for field in ("canvas", "argmax", "accepted"):
        assert_close(getattr(out, field), getattr(ref, field), 0.0, field)
    assert out.accepted.any() and not out.accepted.all(), "the bound should accept some positions, not all"
    assert out.mean_entropy == pytest.approx(ref.mean_entropy, rel=1e-5)


@pytest.mark.parametrize("case", list(GENERATION_CASES))
def test_generation_is_token_exact_with_replayed_draws(checkpoints, case):
    # The same cases and damped fixture as the numpy and cpu backends' tests (see fixtures.make_model: on the
    # undamped "base" fixture, float32 noise flips an argmax by the 4th self-conditioned step, in numpy too).
    hf_tokens, out = replay_case(checkpoints, case, backend="mlx")
    assert out.tokens == hf_tokens


def test_seeded_generation_matches_the_numpy_backend(checkpoints):
    # DefaultRng's uniforms through the device's float32 inverse CDF against the host's float64 one.
    path = checkpoints["gen"].dgf("f32")
    tokens = {}
    for backend in ("numpy", "mlx"):
        with dgrun.load(path, backend=backend) as model:
            out = model.generate([2, 9, 4], max_new_tokens=32, max_denoising_steps=6, seed=3, adaptive_stopping=False)
            tokens[backend] = out.tokens
    assert tokens["mlx"] == tokens["numpy"]


# -- what a Mac does differently from this CPU build (issue 25): each test names the finding it guards ----------------


def test_float32_matmuls_stay_full_precision_unless_the_user_chose_tf32():
    # Finding 1: MLX_ENABLE_TF32 defaults to 1, which runs float32 matmuls at TF32-class precision on M5-class
    # GPUs; MLX reads it once, at the first matmul. Importing the backend must set 0, but never override a user.
    code = "import os, dgrun.backends.mlx_backend; print(os.environ['MLX_ENABLE_TF32'])"
    for user, expected in ((None, "0"), ("1", "1")):
        env = {k: v for k, v in os.environ.items() if k != "MLX_ENABLE_TF32"}
        if user is not None:
            env["MLX_ENABLE_TF32"] = user
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, f"user setting {user!r}: {out.stdout!r} {out.stderr[-500:]}"


@pytest.mark.parametrize("rng_kind", ["default", "replay"])
def test_the_step_ends_on_the_host_in_the_reference_code(monkeypatch, rng_kind):
    # Finding 3: Metal's parallel sums must not decide acceptance or the stop rule; the canvas-sized tail of the
    # step is dgrun.sampler.finish_step, fed host copies of the device's entropies, argmax and draws.
    gen = np.random.default_rng(3)
    n, vocab = 16, 200
    logits = (gen.normal(0, 4, (n, vocab)) * gen.uniform(0.2, 2, (n, 1))).astype(np.float32)
    canvas, clamp = gen.integers(0, vocab, n), gen.random(n) < 0.3
    draws = [("categorical", gen.integers(0, vocab, n)), ("tokens", gen.integers(0, vocab, n))]
    rng = DefaultRng(5) if rng_kind == "default" else ReplayRng(draws)
    calls = []
    finish_step = ref_sampler.finish_step

    def spy(processed, sampled, argmax, token_entropy, *args, **kwargs):
        calls.append((sampled, argmax, token_entropy))
        return finish_step(processed, sampled, argmax, token_entropy, *args, **kwargs)

    monkeypatch.setattr(ref_sampler, "finish_step", spy)
    backend = MlxBackend()
    out = backend.denoise_step(backend.asarray(logits), canvas, 1.3, 4.0, rng, clamp)
    assert len(calls) == 1, "the step must end in sampler.finish_step, exactly once"
    for value in calls[0]:
        assert isinstance(value, np.ndarray) and value.shape == (n,), type(value)
    entropy = calls[0][2]
    assert entropy.dtype == np.float32
    assert_close(entropy, ref_sampler.entropy(logits / np.float32(1.3)), 1e-6, "entropies handed to the host")
    assert out.mean_entropy == float(entropy[~clamp].mean()), "the mean entropy is the host's float32 mean"


def test_router_and_soft_embedding_avoid_metal_fast_exp(monkeypatch):
    # Finding 4: mx.softmax uses Metal's fast exp; the router's top-k and the soft embedding must compute
    # exp(x - max) / sum with mx.exp (precise), as the reference does.
    def refuse(*args, **kwargs):
        raise AssertionError("mx.softmax used")

    monkeypatch.setattr(mx, "softmax", refuse)
    gen = np.random.default_rng(4)
    x = gen.normal(0, 1, (6, 64)).astype(np.float32)
    proj, table = gen.normal(0, 1, (8, 64)).astype(np.float32), gen.normal(0, 1, (40, 64)).astype(np.float32)
    logits = gen.normal(0, 3, (6, 40)).astype(np.float32)
    scale, per_expert = gen.uniform(0.5, 1.5, 64).astype(np.float32), gen.uniform(0.5, 1.5, 8).astype(np.float32)
    ours, ref = MlxBackend(), NumpyBackend()

    def ref_weight(a):
        return NumpyWeight(a.view(np.uint8).reshape(a.shape[0], -1), T.F32, a.shape)

    ref_weights, ref_index = ref.route(x, ref_weight(proj), scale, per_expert, 3, 1e-6)
    weights, index = ours.route(ours.asarray(x), DenseWeight(mx.array(proj)), ours.asarray(scale),
                                ours.asarray(per_expert), 3, 1e-6)
    assert_close(np.array(index), ref_index, 0.0, "router top-k")
    assert_close(np.array(weights), ref_weights, 1e-6, "router weights")
    soft = ours.soft_embed(logits, DenseWeight(mx.array(table)), 2.0)
    assert_close(np.array(soft), ref.soft_embed(logits, ref_weight(table), 2.0), 1e-6, "soft embedding")


def test_a_long_prompt_holds_one_chunk_of_attention_scores_at_a_time():
    # Finding 5: MLX schedules a lazy graph breadth first, so unevaluated query chunks would all hold their
    # [heads, chunk, keys] scores at once (8 chunks here: 8x one chunk's scores). Each chunk is evaluated in turn.
    chunk = mlx_backend._ATTENTION_CHUNK
    n, heads, kv_heads, d = 8 * chunk, 2, 1, 16
    gen = np.random.default_rng(0)
    q, k, v = (gen.normal(0, 1, (n, h, d)).astype(np.float32) for h in (heads, kv_heads, kv_heads))
    positions = np.arange(n)
    backend = MlxBackend()
    qx, kx, vx = (backend.asarray(a) for a in (q, k, v))
    mx.eval(qx, kx, vx)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    out = backend.attention(qx, kx, vx, positions, positions, causal=True, window=None)
    mx.eval(out)
    peak = mx.get_peak_memory() - before
    one_chunk_scores = heads * chunk * n * 4
    # Bound: one chunk's scores (masked and normalised in place), its mask (1/8 of them), the chunks' outputs and
    # their concatenation (1/32 each here): under 1.5 chunks' scores, where all eight at once would be 8.
    assert peak < 1.5 * one_chunk_scores, f"peak {peak / 2**20:.1f} MiB vs {one_chunk_scores / 2**20} MiB of scores"
    # The chunked, evaluated path computes the reference's attention. 1e-5: unit q and k give scores of std 4, whose
    # float32 rounding (~2e-6 absolute at |s| ~ 20) the softmax turns into relative weight errors of that size;
    # measured 3e-6.
    ref = NumpyBackend().attention(q, k, v, positions, positions, causal=True, window=None)
    assert_close(backend.to_numpy(out), ref, 1e-5, "chunked attention")


def test_encoder_buffers_are_released_before_the_decoder_runs(checkpoints, monkeypatch):
    # Finding 7: the encoder's prompt-sized buffers sit in MLX's cache (on Metal up to 1.5x the recommended working
    # set) unless it is cleared; once per encoder pass, before the decoder's first attention runs.
    releases = []
    clear_cache = mx.clear_cache

    def spy():
        cached = mx.get_cache_memory()
        clear_cache()
        releases.append((cached, mx.get_cache_memory()))

    monkeypatch.setattr(mx, "clear_cache", spy)
    previous = mx.set_cache_limit(1 << 30)  # the CPU build keeps only 32 MiB cached; Metal's cache is far larger
    try:
        with dgrun.load(checkpoints["base"].dgf("f32"), backend="mlx") as model:
            graph, canvas = model.graph, np.arange(model.config.canvas_length)
            cache = graph.new_cache()
            graph.encode(np.arange(2, 60), cache)
            mx.eval(graph.decode(canvas, cache, None))
            assert len(releases) == 1 and releases[0][0] > 0 and releases[0][1] == 0, releases
            mx.eval(graph.decode(canvas, cache, None))
            assert len(releases) == 1, "the decoder's own buffers are reused between steps"
            graph.encode(canvas, cache)
            mx.eval(graph.decode(canvas, cache, None))
            assert len(releases) == 2, releases
    finally:
        mx.set_cache_limit(previous)


def test_weights_are_wired_up_to_the_recommended_working_set_on_metal(checkpoints, monkeypatch, capsys):
    # Finding 7: as mlx-lm does on Apple silicon; a no-op where MLX has no Metal device (this Linux build).
    limits = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda limit: limits.append(limit) or 0)
    with dgrun.load(checkpoints["base"].dgf("f32"), backend="mlx"):
        assert limits == [], "no Metal here: nothing to wire"
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda *args: {"max_recommended_working_set_size": 4096})
    capsys.readouterr()
    with dgrun.load(checkpoints["base"].dgf("f32"), backend="mlx"):
        assert limits == [4096]
    assert "recommended working set" in capsys.readouterr().err, "weights beyond 90% of it must be warned about"
