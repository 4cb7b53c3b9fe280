"""Sampler units against transformers' EntropyBoundSampler, LinearTemperatureScheduleLogitsProcessor and
StableAndConfidentStoppingCriteria on random logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from dgrun import sampler
from dgrun.rng import DefaultRng, ReplayRng


@pytest.mark.parametrize("steps", [1, 7, 48])
def test_temperature_schedule_matches_transformers(steps):
    proc = LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=steps)
    logits = torch.randn(3, 11)
    for remaining in range(steps, 0, -1):
        ref = proc(None, logits, cur_step=torch.tensor(remaining, dtype=torch.int32)).numpy()
        ours = logits.numpy() / np.float32(sampler.temperature(remaining, steps, 0.4, 0.8))
        np.testing.assert_allclose(ours, ref, rtol=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bound", [0.1, 1.0, 25.0])
def test_entropy_and_acceptance_match_entropy_bound_sampler(seed, bound):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 32, 50, generator=g) * torch.rand(1, 32, 1, generator=g) * 12
    current = torch.randint(0, 50, (1, 32), generator=g)
    denoised = torch.randint(0, 50, (1, 32), generator=g)
    ref_sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), 32, 50, 10)
    ref_accepted = ref_sampler.accept_canvas(current, denoised, logits, 3)
    token_entropy = sampler.entropy(logits[0].numpy())
    np.testing.assert_allclose(token_entropy, torch.distributions.Categorical(logits=logits).entropy()[0].numpy(),
                               rtol=1e-5, atol=1e-6)
    mask = sampler.accept_mask(token_entropy, bound)
    assert np.array_equal(mask, ref_sampler.accepted_token_mask[0].numpy())
    assert np.array_equal(np.where(mask, denoised[0].numpy(), current[0].numpy()), ref_accepted[0].numpy())


def test_acceptance_always_takes_the_lowest_entropy_token():
    mask = sampler.accept_mask(np.array([5.0, 3.0, 4.0], dtype=np.float32), 1e-9)
    assert mask.tolist() == [False, True, False]


@pytest.mark.parametrize("stability", [0, 1, 3])
def test_stopping_matches_stable_and_confident(stability):
    g = torch.Generator().manual_seed(stability)
    ref = StableAndConfidentStoppingCriteria(stability, confidence_threshold=2.5)
    ours = sampler.StableAndConfident(stability, 2.5)
    canvases = [torch.randint(0, 4, (1, 8), generator=g) for _ in range(3)]
    sequence = [canvases[0], canvases[0], canvases[1], canvases[1], canvases[1], canvases[1], canvases[2]]
    for step, canvas in enumerate(sequence):
        logits = torch.randn(1, 8, 6, generator=g) * (1 + step)
        expected = bool(ref(canvas, logits)[0])
        mean_entropy = float(sampler.entropy(logits[0].numpy()).mean())
        assert ours(canvas[0].numpy(), mean_entropy) == expected, f"step {step}"


def test_denoise_step_draw_order_and_clamp():
    logits = np.random.default_rng(0).normal(0, 4, (8, 20)).astype(np.float32)
    canvas = np.arange(8)
    draws = [("categorical", np.full(8, 7)), ("tokens", np.full(8, 19))]
    result = sampler.denoise_step(logits, canvas, 0.5, 0.3, ReplayRng(draws))
    assert set(result.canvas[result.accepted]) == {7} and set(result.canvas[~result.accepted]) <= {19}
    clamp = np.zeros(8, dtype=bool)
    clamp[5:] = True
    result = sampler.denoise_step(logits, canvas, 0.5, 0.3, ReplayRng(draws), clamp)
    assert np.array_equal(result.canvas[5:], canvas[5:]) and np.array_equal(result.argmax[5:], canvas[5:])
    assert result.accepted[5:].all()


def test_default_rng_categorical_follows_the_distribution():
    probs = np.array([[0.1, 0.0, 0.9]] * 20000, dtype=np.float32)
    draws = DefaultRng(0).categorical(probs)
    assert not (draws == 1).any()
    assert abs((draws == 2).mean() - 0.9) < 0.01
