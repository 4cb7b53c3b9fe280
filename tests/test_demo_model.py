"""The demo model shipped inside the package: it loads with no path, its metadata is intact, and a fixed-seed
generation is stable (the same tokens as recorded when it was trained, on the numpy reference backend)."""

from __future__ import annotations

import pytest

import dgrun
from dgrun.engine import default_model_path

pytestmark = pytest.mark.skipif(not default_model_path().is_file(),
                                reason=f"the demo model is not built ({default_model_path()})")

PROMPT = "def fibonacci(n):"
# Recorded with: dgrun.load(backend="numpy").generate(PROMPT, max_new_tokens=32, seed=0).tokens
EXPECTED = [4, 262, 328, 4, 262, 605, 443, 1725, 3125, 4, 4, 1]


def test_demo_model_loads_without_a_path_and_its_metadata_is_intact():
    with dgrun.load(backend="numpy") as model:
        info = model.info
        assert info["tokenizer"] == "sentencepiece"
        assert model.config.canvas_length == 64 and model.config.num_hidden_layers == 4
        assert {"sliding_attention", "full_attention"} == set(model.config.layer_types)
        assert model.generation_config.eos_token_ids == [1]
        assert model.generation_config.max_denoising_steps is not None
        assert default_model_path().stat().st_size <= 20 * 2**20
        assert model.detokenize(model.tokenize(PROMPT, add_bos=False)) == PROMPT


def test_fixed_seed_generation_is_stable():
    with dgrun.load(backend="numpy") as model:
        first = model.generate(PROMPT, max_new_tokens=32, seed=0).tokens
        assert model.generate(PROMPT, max_new_tokens=32, seed=0).tokens == first
    assert first == EXPECTED

