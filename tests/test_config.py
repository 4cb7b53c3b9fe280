"""`ModelConfig.from_hf` against transformers 5.23.0's own `DiffusionGemmaConfig`, the parser of record.

Every variant is written as a user's config.json would be (the literal dict, and what `save_pretrained` writes
after transformers parsed it) and read by both. For every field dgrun reads, `dgrun.config.HF_ATTRIBUTES` names
the transformers attribute it must equal; per layer, the model transformers builds from the config (on the meta
device: shapes only) gives head dim, KV heads, sliding or full, whether V is its own projection, and the shape of
every text tensor; transformers' rotary module gives each layer type's inverse frequencies. Each config dgrun
refuses is listed with whether transformers builds it: most it cannot (per-type differences, per-layer overrides
of globally read attributes), some fail at transformers' first forward (a partial default RoPE, no soft-cap), a
few run there but not in dgrun's graph (a scaled RoPE, a bidirectional encoder, a `skip` override that
transformers' DiffusionGemma silently ignores).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from make_random_dgf import RELEASED
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextRotaryEmbedding

from dgrun.config import HF_ATTRIBUTES, HF_GENERATION_ATTRIBUTES, ConfigError, GenerationConfig, ModelConfig
from dgrun.converters.convert_hf import tied_output
from dgrun.converters.names import dgf_name
from dgrun.model import rope_inv_freq, tensor_shapes

# RoPE inverse frequencies: both sides compute theta ** (2i/d) in float32 (numpy's and torch's pow): ≤ 1 ulp apart
# (measured: equal on every variant here); 1e-6 relative is a few ulps of float32.
INV_FREQ_RTOL = 1e-6


def small(**overrides: Any) -> dict[str, Any]:
    """A 6-layer text config (5 sliding : 1 full) small enough to build in milliseconds."""
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, sliding_window=8, num_experts=4, top_k_experts=2,
               moe_intermediate_size=16)
    cfg.update(overrides)
    return cfg


def release(layers: int = 6) -> dict[str, Any]:
    """The released checkpoint's text_config as its config.json writes it (flat `global_head_dim` /
    `num_global_key_value_heads`, no `per_layer_config`, no `attention_k_eq_v`), cut to `layers` layers."""
    return dict(
        vocab_size=RELEASED["vocab_size"], hidden_size=RELEASED["hidden_size"],
        intermediate_size=RELEASED["intermediate_size"], num_hidden_layers=layers,
        num_attention_heads=RELEASED["num_attention_heads"], num_key_value_heads=RELEASED["num_key_value_heads"],
        head_dim=RELEASED["head_dim"], global_head_dim=RELEASED["global_head_dim"],
        num_global_key_value_heads=RELEASED["num_global_key_value_heads"], sliding_window=RELEASED["sliding_window"],
        num_experts=RELEASED["num_experts"], top_k_experts=RELEASED["top_k_experts"],
        moe_intermediate_size=RELEASED["moe_intermediate_size"], hidden_activation="gelu_pytorch_tanh",
        final_logit_softcapping=30.0, rms_norm_eps=1e-6, max_position_embeddings=262_144,
        use_bidirectional_attention="vision", attention_bias=False, tie_word_embeddings=True,
        layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)],
        rope_parameters={
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": RELEASED["partial_rotary_factor"],
                               "rope_theta": RELEASED["rope_theta"]},
            "sliding_attention": {"rope_type": "default", "rope_theta": RELEASED["rope_local_base_freq"]}},
    )


FULL_ROPE_DEFAULT = {"full_attention": {"rope_type": "default", "rope_theta": 50_000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}

# Text configs dgrun must read exactly as transformers does.
READ: dict[str, dict[str, Any]] = {
    "release_flat_keys": release(),
    "release_flat_keys_12_layers": release(12),
    "overrides_equal_base": small(global_head_dim=16, num_global_key_value_heads=2),  # per_layer_config {} on save
    "overrides_differ": small(global_head_dim=32, num_global_key_value_heads=1),
    "only_head_dim_differs": small(global_head_dim=32, num_global_key_value_heads=2),
    "only_kv_heads_differ": small(global_head_dim=16, num_global_key_value_heads=1),
    "global_kv_absent": small(global_head_dim=32),  # full layers keep the base KV heads
    "global_head_dim_absent": small(num_global_key_value_heads=1),  # transformers' default 512
    "present_empty_ignores_flat_keys": small(per_layer_config={}, global_head_dim=64, num_global_key_value_heads=1),
    "present_null": small(per_layer_config=None, global_head_dim=64),
    "present_overrides_ignore_flat_keys": small(per_layer_config={"5": {"head_dim": 32}}, global_head_dim=64,
                                                num_global_key_value_heads=1),
    "zero_padded_keys": small(num_hidden_layers=12, per_layer_config={
        "05": {"head_dim": 32, "num_key_value_heads": 1}, "11": {"head_dim": 32, "num_key_value_heads": 1}}),
    "k_eq_v_true": small(global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True),
    "k_eq_v_false": small(global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=False),
    "sliding_layers_overridden_alike": small(per_layer_config={str(i): {"head_dim": 8} for i in range(5)}),
    "rope_parameters_absent": small(global_head_dim=32),
    "full_rope_default_type": small(global_head_dim=32, rope_parameters=FULL_ROPE_DEFAULT),
    "flat_partial_rotary_factor_overridden": small(partial_rotary_factor=0.5, rope_parameters={
        "full_attention": {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0}}),
    "layer_types_absent": small(num_hidden_layers=8, global_head_dim=32),
    "last_layer_forced_full": small(layer_types=["sliding_attention"] * 6, global_head_dim=32),
    "only_full_layers": small(num_hidden_layers=2, layer_types=["full_attention"] * 2, global_head_dim=32,
                              rope_parameters={"full_attention": {"rope_type": "proportional", "rope_theta": 1e6,
                                                                  "partial_rotary_factor": 0.5}}),
    "text_config_unties_but_top_level_ties": small(tie_word_embeddings=False),
    "defaults_for_the_rest": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                  head_dim=8, global_head_dim=8, intermediate_size=16, vocab_size=64,
                                  num_experts=2, top_k_experts=1, moe_intermediate_size=8),
}


# Top-level keys for some variants (the rest take transformers' defaults); a small vision tower keeps builds fast.
TOP_LEVEL: dict[str, dict[str, Any]] = {
    "text_config_unties_but_top_level_ties": {"tie_word_embeddings": True},
    "untied_canvas_32": {"tie_word_embeddings": False, "canvas_length": 32},
}
READ["untied_canvas_32"] = small(global_head_dim=32, num_global_key_value_heads=1)
VISION = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=2, head_dim=8)


def _user_files(tmp_path: Path, text: dict[str, Any], top: dict[str, Any]) -> dict[str, Path]:
    """The variant as a user's config.json: the literal dict, and transformers' save_pretrained of it."""
    literal = tmp_path / "literal"
    literal.mkdir()
    config = {"model_type": "diffusion_gemma", "text_config": text, "vision_config": VISION, **top}
    (literal / "config.json").write_text(json.dumps(config))
    saved = tmp_path / "saved"
    DiffusionGemmaConfig.from_pretrained(literal).save_pretrained(saved)
    return {"literal": literal, "save_pretrained": saved}


def _transformers_model(config: DiffusionGemmaConfig) -> Any:
    with torch.device("meta"):  # shapes only, no memory: the release's 262,144 x 2,816 embedding costs nothing
        return DiffusionGemmaForBlockDiffusion(config)


def _hf_value(expr: str, config: Any) -> Any:
    return eval(expr, {"config": config})  # the expressions of dgrun.config.HF_*ATTRIBUTES, nothing else


@pytest.mark.parametrize("name", list(READ))
def test_from_hf_agrees_with_transformers(tmp_path, name):
    built: dict[str, tuple[DiffusionGemmaConfig, Any, Any]] = {}
    for how, folder in _user_files(tmp_path, READ[name], TOP_LEVEL.get(name, {})).items():
        raw = json.loads((folder / "config.json").read_text())
        ours = ModelConfig.from_hf(raw)
        ref = DiffusionGemmaConfig.from_pretrained(folder)
        # One oracle per distinct parse (transformers mostly reads its own save back as it read the literal file,
        # but not always: `per_layer_config: null` is saved as absent, which reloads as the release's layout).
        key = json.dumps(ref.to_diff_dict(), sort_keys=True)
        if key not in built:
            # Built before the attributes are read: building RoPE completes the config as the model sees it
            # (transformers' proportional RoPE standardizes rope_parameters in place).
            built[key] = (ref, _transformers_model(ref), DiffusionGemmaTextRotaryEmbedding(ref.text_config))
        ref, model, rotary = built[key]
        text = ref.text_config
        has_sliding = "sliding_attention" in text.layer_types
        for field, expr in HF_ATTRIBUTES.items():
            if not has_sliding and "sliding_attention" in expr:
                continue  # a model without sliding layers has no sliding view (and dgrun never reads those fields)
            value = tied_output(raw) if field == "tie_word_embeddings" else getattr(ours, field)
            assert value == _hf_value(expr, ref), f"{name} ({how}): {field}"
        for i, layer in enumerate(model.model.decoder.layers):
            attn, what = layer.self_attn, f"{name} ({how}) layer {i}"
            assert ours.is_sliding(i) == attn.is_sliding, what
            assert ours.layer_head_dim(i) == attn.head_dim, what
            assert ours.layer_kv_heads(i) == attn.k_proj.out_features // attn.head_dim, what
            assert (f"blk.{i}.attn_v.weight" in tensor_shapes(ours)) == (attn.v_proj is not None), what
            ref_inv = getattr(rotary, f"{text.layer_types[i]}_inv_freq").numpy()
            inv = rope_inv_freq(ours, i)
            assert inv.shape == ref_inv.shape, what
            np.testing.assert_allclose(inv, ref_inv, rtol=INV_FREQ_RTOL, atol=0, err_msg=what)
        # Every text tensor transformers' model holds has the shape dgrun's graph expects, and nothing is missing.
        theirs = {}
        for hf_name, tensor in model.state_dict().items():
            dgf = dgf_name(hf_name)
            if dgf is not None and not (dgf == "output.weight" and tied_output(raw)):
                theirs[dgf] = tuple(tensor.shape)
        assert theirs == tensor_shapes(ours, tied_output=tied_output(raw)), f"{name} ({how})"


def test_release_text_config_reads_as_tools_released():
    """The release's HF config and make_random_dgf's RELEASED describe the same model."""
    cfg = vars(ModelConfig.from_hf({"model_type": "diffusion_gemma", "text_config": release(30)}))
    assert {k: cfg[k] for k in RELEASED if k != "num_hidden_layers"} == {
        k: v for k, v in RELEASED.items() if k != "num_hidden_layers"}


def _transformers_runs(text: dict[str, Any]) -> bool:
    """Whether transformers parses the config and builds the model and its RoPE from it."""
    try:
        config = DiffusionGemmaConfig(text_config=text)
        _transformers_model(config)
        DiffusionGemmaTextRotaryEmbedding(config.text_config)
    except (ValueError, KeyError, TypeError, RuntimeError):
        return False
    return True


# Configs dgrun refuses: (text config, words of the one-line error, whether transformers builds the model and its
# RoPE from it).
REFUSED: dict[str, tuple[dict[str, Any], str, bool]] = {
    "full_layers_differ": (small(num_hidden_layers=12, per_layer_config={
        "05": {"head_dim": 32}, "11": {"head_dim": 64}}), "full_attention layers 5 and 11 differ in head_dim", False),
    "full_layers_differ_in_kv_heads": (small(num_hidden_layers=12, per_layer_config={
        "05": {"num_key_value_heads": 1}}), "full_attention layers 5 and 11 differ in num_key_value_heads", False),
    "sliding_layers_differ": (small(per_layer_config={"0": {"head_dim": 8}}),
                              "sliding_attention layers 0 and 1 differ in head_dim", False),
    "override_transformers_ignores": (small(per_layer_config={"5": {"intermediate_size": 96}}),
                                      "overrides intermediate_size on layer 5", False),
    "override_rope_parameters": (small(per_layer_config={"5": {"rope_parameters": FULL_ROPE_DEFAULT}}),
                                 "overrides rope_parameters on layer 5", False),
    "override_skip": (small(per_layer_config={"5": {"skip": ["mlp"]}}), "overrides skip on layer 5", True),
    "layer_index_out_of_range": (small(per_layer_config={"6": {"head_dim": 32}}), "outside the 6 layers", False),
    "yarn_rope": (small(rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
                  "RoPE of type 'yarn' is not supported", False),
    "scaled_proportional_rope": (small(rope_parameters={
        "full_attention": {"rope_type": "proportional", "rope_theta": 1e6, "factor": 8.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), "factor=8.0", True),
    "partial_default_rope": (small(rope_parameters={
        "full_attention": {"rope_type": "proportional", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}),
        "partial_rotary_factor=0.5", True),
    "rope_without_theta": (small(rope_parameters={"full_attention": {"rope_type": "proportional"},
                                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
                           "has no rope_theta", False),
    "flat_rope_parameters": (small(rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
                             "rope_parameters must have a full_attention entry", False),
    # transformers copies the flat key into the sliding layers' RoPE too, which then cannot rotate whole heads.
    "flat_partial_rotary_factor": (small(partial_rotary_factor=0.5, rope_parameters={
        "full_attention": {"rope_type": "proportional", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), "flat partial_rotary_factor", True),
    "no_softcap": (small(final_logit_softcapping=None), "final_logit_softcapping must be a positive number", True),
    "bidirectional_encoder": (small(use_bidirectional_attention="all"), "bidirectional encoder", True),
    "missing_experts": (dict(small(), num_experts=None), "num_experts must be a positive integer", False),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_configs_dgrun_cannot_run_are_refused_in_one_line(name):
    text, message, transformers_builds = REFUSED[name]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        ModelConfig.from_hf({"model_type": "diffusion_gemma", "text_config": text})
    assert "\n" not in str(info.value)
    assert _transformers_runs(text) == transformers_builds, "transformers' own verdict on this config changed"


@pytest.mark.parametrize("values", [
    dict(max_denoising_steps=48, entropy_bound=0.1, t_min=0.4, t_max=0.8, stability_threshold=1,
         confidence_threshold=0.005, eos_token_id=[1, 106, 50], pad_token_id=0),  # the release's defaults
    dict(max_new_tokens=300, eos_token_id=7),  # one EOS id, the rest left to transformers' global defaults
    dict(),
], ids=["release", "partial", "empty"])
def test_generation_config_agrees_with_transformers(tmp_path, values):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    values = dict(values)
    if "entropy_bound" in values:
        values["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=values.pop("entropy_bound"))
    DiffusionGemmaGenerationConfig(**values).save_pretrained(tmp_path)
    ref = DiffusionGemmaGenerationConfig.from_pretrained(tmp_path)
    ours = GenerationConfig.from_hf(json.loads((tmp_path / "generation_config.json").read_text()), {})
    for field, expr in HF_GENERATION_ATTRIBUTES.items():
        assert getattr(ours, field) == _hf_value(expr, ref), field
