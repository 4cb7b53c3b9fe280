"""The demo model shipped inside the package: it loads with no path, its metadata is intact, and a fixed-seed
generation is stable (the same tokens as recorded when it was trained, on the numpy reference backend).

The expected tokens belong to one particular `runtime/models/demo.dgf`: retraining or reconverting the demo
changes them, and the new list is recorded with the command quoted above `EXPECTED`.
"""

from __future__ import annotations

import pytest
import train_demo  # tools/ is on sys.path (conftest): the generation defaults the trainer writes

import dgrun
from dgrun.engine import default_model_path

pytestmark = pytest.mark.skipif(not default_model_path().is_file(),
                                reason=f"the demo model is not built ({default_model_path()}); "
                                       "see tools/train_demo.py")

PROMPT = "def fibonacci(n):"
# Recorded with: dgrun.load(backend="numpy").generate(PROMPT, max_new_tokens=32, seed=0).tokens
EXPECTED = [4, 262, 293, 948, 4028, 4014, 4027, 4, 262, 293, 294, 4044, 4043, 4034, 4, 263, 4014, 276, 294, 4025,
            1315, 334, 4, 262, 4042, 275, 329, 4, 263, 293, 294, 1891]


def test_demo_model_loads_without_a_path_and_its_metadata_is_intact() -> None:
    with dgrun.load(backend="numpy") as model:
        info = model.info
        assert info["tokenizer"] == "sentencepiece"
        assert model.config.canvas_length == 32 and model.config.num_hidden_layers == 4
        assert model.config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
        assert model.config.num_experts == 8 and model.config.top_k_experts == 2
        assert model.config.vocab_size == 4096 and model.config.sliding_window == 64
        assert default_model_path().stat().st_size <= 20 * 2**20
        gen = model.generation_config
        assert gen.eos_token_ids == [train_demo.EOS_ID] and gen.pad_token_id == train_demo.PAD_ID
        defaults = train_demo.GENERATION_DEFAULTS
        assert (gen.max_new_tokens, gen.max_denoising_steps, gen.t_min, gen.t_max) == (
            defaults["max_new_tokens"], defaults["max_denoising_steps"], defaults["t_min"], defaults["t_max"])
        assert gen.entropy_bound == defaults["sampler_config"]["entropy_bound"]


def test_demo_tokenizer_keeps_code_exactly() -> None:
    """Indentation, tabs, blank lines and digits survive a round trip: the demo writes Python, where they matter."""
    code = "class A:\n\tdef f(self, x=10):\n        return  x  # two  spaces\n\n\n    pass\n"
    with dgrun.load(backend="numpy") as model:
        ids = model.tokenize(code, add_bos=False)
        assert model.detokenize(ids) == code
        assert model.tokenize(PROMPT)[0] == train_demo.BOS_ID  # prompts start with BOS, as in training


def test_fixed_seed_generation_is_stable() -> None:
    with dgrun.load(backend="numpy") as model:
        first = model.generate(PROMPT, max_new_tokens=32, seed=0).tokens
        assert model.generate(PROMPT, max_new_tokens=32, seed=0).tokens == first
    assert first == EXPECTED
