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

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'dgrun[mlx]')")

from conftest import assert_close  # noqa: E402
from fixtures import hf_generate, random_blocks  # noqa: E402

import dgrun  # noqa: E402
from dgrun import quants  # noqa: E402
from dgrun import sampler as ref_sampler  # noqa: E402
from dgrun.backends.mlx_backend import LAYOUTS, MlxBackend, repack_mxfp4, repack_nvfp4  # noqa: E402
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


# Kept to 4 denoising steps: the fixture's self-conditioning loop amplifies float32 noise 5-8x per step (a 1e-6
# perturbation of the numpy reference's own logits reaches ~1e-2 by step 6 and changes tokens), so longer runs
# would test the fixture's chaos, not the backend. By step 4 the backends differ by ~5e-4: no flips.
GENERATION_CASES = {
    # three canvases, max_new_tokens not a multiple of the canvas; self-conditioning on the device's logits
    "fixed_steps": dict(max_new_tokens=40, max_denoising_steps=4, stability_threshold=None,
                        confidence_threshold=None),
    # adaptive stopping fires mid-block (the confidence test alone)
    "adaptive_stop": dict(max_new_tokens=40, max_denoising_steps=4, stability_threshold=0,
                          confidence_threshold=0.6),
}


@pytest.mark.parametrize("case", list(GENERATION_CASES))
def test_generation_is_token_exact_with_replayed_draws(checkpoints, case):
    params = GENERATION_CASES[case]
    ckpt = checkpoints["base"]
    prompt = [2, 17, 33, 5, 60]
    hf_tokens, draws = hf_generate(ckpt.model, prompt, eos_token_id=None, **params)
    adaptive = params["stability_threshold"] is not None
    ours_params = {k: v for k, v in params.items() if v is not None}
    tokens, steps = {}, {}
    for backend in ("numpy", "mlx"):
        with dgrun.load(ckpt.dgf("f32"), backend=backend) as model:
            model.generation_config.eos_token_ids = []
            rng = ReplayRng(draws)
            out = model.generate(prompt, rng=rng, adaptive_stopping=adaptive, **ours_params)
            tokens[backend], steps[backend] = out.tokens, out.stats["steps_per_canvas"]
        assert rng.position == len(draws), f"{backend}: used {rng.position} of {len(draws)} recorded draws"
    # Against the reference first, so a failure here is the backend's and a failure below is shared.
    assert tokens["mlx"] == tokens["numpy"]
    assert tokens["mlx"] == hf_tokens
    if adaptive:
        assert min(steps["mlx"]) < params["max_denoising_steps"], f"adaptive stopping never fired: {steps}"


def test_seeded_generation_matches_the_numpy_backend(checkpoints):
    # DefaultRng's uniforms through the device's float32 inverse CDF against the host's float64 one.
    path = checkpoints["base"].dgf("f32")
    tokens = {}
    for backend in ("numpy", "mlx"):
        with dgrun.load(path, backend=backend) as model:
            out = model.generate([2, 40, 41], max_new_tokens=32, max_denoising_steps=4, seed=3)
            tokens[backend] = out.tokens
    assert tokens["mlx"] == tokens["numpy"]
