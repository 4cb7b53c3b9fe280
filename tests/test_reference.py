"""The numpy reference against transformers 5.23.0: encoder KV, decoder logits and token-exact generation.

Tolerances (float32 compute, f32 and bf16 files): both sides run the same operations in float32; what differs
is summation order inside matmuls and softmaxes. Measured on these fixtures: K/V ≤ 3.4e-7 relative L2,
logits ≤ 6.5e-6 — the same size as transformers' own float32 error against a float64 run of the same model
(4.2e-6), so that is the floor. Bounds: K/V 2e-6, logits 2e-5 (3x the worst measurement).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_close
from fixtures import hf_generate
from transformers import DynamicCache

import dgrun
from dgrun.rng import ReplayRng

KV_RTOL = 2e-6
LOGITS_RTOL = 2e-5


def _hf_cache(model):
    return DynamicCache(config=model.config.get_text_config(decoder=True))


@pytest.mark.parametrize("name", ["base", "top1", "bf16", "uniform", "odd2600"])
@pytest.mark.parametrize("prompt_len", [5, 21])
def test_encoder_kv_and_decoder_logits_match_transformers(checkpoints, name, prompt_len):
    ckpt = checkpoints[name]
    with dgrun.load(ckpt.dgf("f32"), backend="numpy") as ours:
        compare_with_transformers(ckpt.model, ours, prompt_len, name)


def compare_with_transformers(model, ours, prompt_len, what):
    """Encode a random prompt and a second chunk (a committed canvas), then decode a random canvas without and with
    self-conditioning, in transformers' `model` and in dgrun's `ours`: K/V within KV_RTOL, logits within
    LOGITS_RTOL."""
    cfg = model.config.text_config
    rng = np.random.default_rng(prompt_len)
    prompt = rng.integers(0, cfg.vocab_size, prompt_len)
    committed = rng.integers(0, cfg.vocab_size, model.config.canvas_length)  # a second encoder chunk
    canvas = rng.integers(0, cfg.vocab_size, model.config.canvas_length)
    self_cond = rng.normal(0, 3, (model.config.canvas_length, cfg.vocab_size)).astype(np.float32)

    hf_cache = _hf_cache(model)
    cache = ours.graph.new_cache()
    with torch.no_grad():
        for chunk in (prompt, committed):
            model.model.encoder(input_ids=torch.from_numpy(chunk)[None], past_key_values=hf_cache)
            ours.graph.encode(chunk, cache)
            for i, layer in enumerate(hf_cache.layers):
                ref_k = layer.keys[0].permute(1, 0, 2).numpy()
                ref_v = layer.values[0].permute(1, 0, 2).numpy()
                assert_close(cache.keys[i], ref_k, KV_RTOL, f"{what} layer {i} keys")
                assert_close(cache.values[i], ref_v, KV_RTOL, f"{what} layer {i} values")
        for sc in (None, self_cond):
            ref = model(decoder_input_ids=torch.from_numpy(canvas)[None], past_key_values=hf_cache,
                        self_conditioning_logits=None if sc is None else torch.tensor(sc[None])).logits[0].numpy()
            out = ours.graph.decode(canvas, cache, sc)
            mode = "off" if sc is None else "on"
            assert_close(out, ref, LOGITS_RTOL, f"{what} decoder logits (self-conditioning {mode})")


@pytest.mark.parametrize("name", ["base", "top1"])
def test_encoder_in_chunks_matches_transformers_on_a_long_prompt(checkpoints, name):
    """A 150-token prompt encoded 7 tokens at a time (22 chunks, none aligned with the window of 8 or 4) against
    transformers encoding it in one call: every layer's cache (the sliding layers' last window-1 rows, the full
    layers' every row) and the decoder's logits agree to the same tolerances as an unchunked encode."""
    ckpt = checkpoints[name]
    model = ckpt.model
    rng = np.random.default_rng(24)
    prompt = rng.integers(0, model.config.text_config.vocab_size, 150)
    canvas = rng.integers(0, model.config.text_config.vocab_size, model.config.canvas_length)
    hf_cache = _hf_cache(model)
    with dgrun.load(ckpt.dgf("f32"), backend="numpy") as ours, torch.no_grad():
        ours.graph.encode_chunk = 7
        cache = ours.graph.new_cache()
        ours.graph.encode(prompt, cache)
        model.model.encoder(input_ids=torch.from_numpy(prompt)[None], past_key_values=hf_cache)
        assert cache.length == len(prompt)
        for i, layer in enumerate(hf_cache.layers):
            assert_close(cache.keys[i], layer.keys[0].permute(1, 0, 2).numpy(), KV_RTOL, f"{name} layer {i} keys")
            assert_close(cache.values[i], layer.values[0].permute(1, 0, 2).numpy(), KV_RTOL,
                         f"{name} layer {i} values")
        ref = model(decoder_input_ids=torch.from_numpy(canvas)[None], past_key_values=hf_cache).logits[0].numpy()
        assert_close(ours.graph.decode(canvas, cache, None), ref, LOGITS_RTOL, f"{name} decoder logits")


def test_encoder_and_decoder_layer_scalars_are_kept_apart(checkpoints):
    ckpt = checkpoints["base"]
    with dgrun.load(ckpt.dgf("f32"), backend="numpy") as ours:
        enc = [float(ours.graph.vec[f"blk.{i}.enc_layer_output_scale.weight"][0]) for i in range(4)]
        dec = [float(ours.graph.vec[f"blk.{i}.layer_output_scale.weight"][0]) for i in range(4)]
    hf_enc = [float(layer.layer_scalar) for layer in ckpt.model.model.encoder.language_model.layers]
    hf_dec = [float(layer.layer_scalar) for layer in ckpt.model.model.decoder.layers]
    assert enc == pytest.approx(hf_enc) and dec == pytest.approx(hf_dec)
    assert all(abs(a - b) > 1e-4 for a, b in zip(enc, dec, strict=True)), "fixture scalars must differ"


GENERATION_CASES = {
    # fixed steps, three canvases, max_new_tokens not a multiple of the canvas
    "fixed_steps": dict(max_new_tokens=40, max_denoising_steps=6, stability_threshold=None,
                        confidence_threshold=None, eos_token_id=None),
    # adaptive stopping fires mid-block: this fixture's mean entropy falls below 0.35 after ~10 steps
    "adaptive_stop": dict(max_new_tokens=32, max_denoising_steps=24, stability_threshold=0,
                          confidence_threshold=0.35, eos_token_id=None),
    # transformers' defaults for the schedule, a prompt longer than the sliding window
    "defaults_long_prompt": dict(max_new_tokens=16, eos_token_id=None),
    # a 150-token prompt that dgrun encodes in 22 chunks of 7 (transformers in one call), then two canvases
    "prompt_in_chunks": dict(max_new_tokens=32, max_denoising_steps=8, stability_threshold=None,
                             confidence_threshold=None, eos_token_id=None),
}
LONG_PROMPT = [int(t) for t in np.random.default_rng(150).integers(3, 128, 150)]


def dgrun_params(params):
    """transformers' generate() keywords as ours (EOS ids aside: they go to the model's generation_config)."""
    ours = {k: v for k, v in params.items() if k != "eos_token_id" and v is not None}
    # A null threshold is how transformers turns adaptive stopping off; ours says it with a flag.
    return {**ours, "adaptive_stopping": params.get("stability_threshold", 0) is not None}


def replay_generate(ckpt, prompt, params, backend="numpy", path=None, encode_chunk=None, model=None, lora=None):
    """(transformers' tokens, our GenerationOutput with transformers' recorded draws replayed).

    `model` (default `ckpt.model`) is the transformers model to run; ours reads `path` (default: our f32
    conversion of the checkpoint) with the adapters `lora`, and encodes `encode_chunk` tokens at a time when given."""
    hf_tokens, draws = hf_generate(ckpt.model if model is None else model, prompt, **params)
    return hf_tokens, replay(ckpt, prompt, params, draws, backend, path=path, encode_chunk=encode_chunk, lora=lora)


def replay(ckpt, prompt, params, draws, backend="numpy", path=None, encode_chunk=None, lora=None):
    """dgrun's generation on `path` (default the checkpoint's f32 file) with transformers' recorded `draws`, every
    one of them used."""
    with dgrun.load(path or ckpt.dgf("f32"), backend=backend, lora=lora) as ours:
        if encode_chunk is not None:
            ours.graph.encode_chunk = encode_chunk
        ours.generation_config.eos_token_ids = list(params.get("eos_token_id") or [])
        rng = ReplayRng(draws)
        out = ours.generate(prompt, rng=rng, **dgrun_params(params))
    assert rng.position == len(draws), f"used {rng.position} of {len(draws)} recorded draws"
    return out


def replay_case(checkpoints, case, backend="numpy"):
    """`replay_generate` for one of GENERATION_CASES on the fixture made for token-exact generation."""
    prompt = {"defaults_long_prompt": list(range(2, 24)), "prompt_in_chunks": LONG_PROMPT}.get(case, [2, 17, 33, 5, 60])
    chunk = 7 if case == "prompt_in_chunks" else None
    return replay_generate(checkpoints["gen"], prompt, GENERATION_CASES[case], backend, encode_chunk=chunk)


@pytest.mark.parametrize("case", list(GENERATION_CASES))
def test_generation_is_token_exact_with_replayed_draws(checkpoints, case):
    hf_tokens, out = replay_case(checkpoints, case)
    assert out.tokens == hf_tokens
    if case == "adaptive_stop":
        steps = out.stats["steps_per_canvas"]
        assert any(s < GENERATION_CASES[case]["max_denoising_steps"] for s in steps), \
            f"adaptive stopping never fired: {steps}"


def test_full_layers_shaped_like_sliding_ones_generate_token_exact(checkpoints):
    """The checkpoint whose `per_layer_config` is `{}` (once refused as implying 512-wide full layers)."""
    ckpt = checkpoints["uniform"]
    assert json.loads((ckpt.folder / "config.json").read_text())["text_config"]["per_layer_config"] == {}
    hf_tokens, out = replay_generate(ckpt, [2, 17, 33, 5, 60], GENERATION_CASES["fixed_steps"])
    assert out.tokens == hf_tokens


def test_generation_stops_at_one_of_several_eos_ids_inside_a_canvas(checkpoints):
    ckpt = checkpoints["gen"]
    prompt = [2, 40, 41, 42]
    base = dict(max_new_tokens=48, max_denoising_steps=5, stability_threshold=None, confidence_threshold=None)
    free_run, _ = hf_generate(ckpt.model, prompt, eos_token_id=None, **base)
    # The trajectory does not depend on the EOS ids, so pick one that first occurs mid-way into canvas 2.
    second = free_run[16:32]
    position = next(i for i in range(4, 16) if second[i] not in free_run[: 16 + i])
    absent = next(t for t in range(127, 0, -1) if t not in free_run)
    eos = [absent, second[position]]
    hf_tokens, out = replay_generate(ckpt, prompt, dict(eos_token_id=eos, **base))
    assert out.tokens == hf_tokens
    assert out.tokens[-1] == second[position] and len(out.tokens) == 16 + position + 1


def test_nan_logits_stop_generation_with_an_error(checkpoints, monkeypatch):
    with dgrun.load(checkpoints["gen"].dgf("f32"), backend="numpy") as model:
        decode_batch = model.graph.decode_batch

        def poisoned(canvases, caches, self_conds):
            logits = decode_batch(canvases, caches, self_conds)
            logits[0][3, 5] = np.nan
            return logits

        monkeypatch.setattr(model.graph, "decode_batch", poisoned)
        with pytest.raises(FloatingPointError, match="NaN logits"):
            model.generate([2, 3, 4], max_new_tokens=16, max_denoising_steps=2, seed=0)
