"""Bad input at the Python API: clear errors, nothing executed, nothing half done.

(The file reader's hostile-file tests and fuzzing are in test_format.py; the converter's refusals in
test_converter.py; the CLI's exit codes in test_cli.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import dgrun

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(checkpoints):
    with dgrun.load(checkpoints["gen"].dgf("q8_0"), backend="numpy") as m:
        yield m


@pytest.mark.parametrize("prompt, message", [
    ([], "the prompt is empty"),
    ([2, 128], "token id 128 is outside the vocabulary"),
    ([2, -1], "token id -1 is outside the vocabulary"),
    ([[2, 3]], "a prompt must be a string or a list of integer token ids"),
    ([2.5], "a prompt must be a string or a list of integer token ids"),
])
def test_bad_prompts_are_refused(model, prompt, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        model.generate(prompt, max_new_tokens=4, max_denoising_steps=1)


def test_empty_text_prompt_generates_from_bos_alone(model):
    """An empty string is a BOS-only prompt (unconditional generation), as llama.cpp treats it."""
    assert model.tokenize("") == [2]
    assert len(model.generate("", max_new_tokens=4, max_denoising_steps=1, seed=0).tokens) == 4


@pytest.mark.parametrize("params, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer"),
    (dict(max_denoising_steps=0), "max_denoising_steps must be an integer in 1..100000"),
    (dict(max_denoising_steps=10**9), "max_denoising_steps must be an integer in 1..100000"),
    (dict(t_min=0.9, t_max=0.5), "t_max must be greater than t_min"),
    (dict(t_max=float("nan")), "t_max must be a finite number"),
    (dict(entropy_bound=-1.0), "entropy_bound must be a finite number >= 0"),
    (dict(stability_threshold=-2), "stability_threshold must be an integer"),
    (dict(confidence_threshold=0.0), "confidence_threshold must be a number > 0"),
])
def test_bad_parameters_are_refused_before_any_work(model, params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        model.generate([2, 3], **params)


def test_prompt_over_the_context_limit_is_refused(model):
    too_long = [2] * (model.config.max_position_embeddings - 8)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model.generate(too_long, max_new_tokens=16, max_denoising_steps=1)


def test_nothing_in_the_load_path_can_execute_file_contents():
    """No pickle, eval/exec or torch.load anywhere in the runtime, backends or converters."""
    pattern = re.compile(r"\bimport pickle\b|\bpickle\.|(?<![\w.])eval\(|(?<![\w.])exec\(|torch\.load|"
                         r"allow_pickle=True|\bmarshal\.")
    offenders = []
    for folder in ("runtime", "backends", "converters"):
        for path in (REPO / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if pattern.search(code):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_seeded_generation_is_reproducible_and_seed_sensitive(model):
    a = model.generate([2, 5, 9], max_new_tokens=16, max_denoising_steps=3, seed=7).tokens
    b = model.generate([2, 5, 9], max_new_tokens=16, max_denoising_steps=3, seed=7).tokens
    c = model.generate([2, 5, 9], max_new_tokens=16, max_denoising_steps=3, seed=8).tokens
    assert a == b and a != c and all(0 <= t < model.config.vocab_size for t in a)


def test_closed_model_arrays_stay_valid_after_close(checkpoints):
    with dgrun.load(checkpoints["gen"].dgf("f32"), backend="numpy") as m:
        norm = m.graph.vec["output_norm.weight"]
    assert np.isfinite(norm).all()
