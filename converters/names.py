"""Hugging Face → .dgf tensor names, as data.

Names follow gguf-py's GEMMA4 map (llama.cpp's Gemma 4 names) so that files flow both ways; the
DiffusionGemma-only tensors get `self_cond_*` and `enc_layer_output_scale`, as llama.cpp's drafts name them.
Encoder and decoder share every weight except `layer_scalar` (kept apart) and the decoder-only
self-conditioning MLP; the shared weights may be stored under either prefix and map to one .dgf tensor.
"""

from __future__ import annotations

import re

_LAYER_PREFIXES = (r"model\.decoder\.layers\.(\d+)\.", r"model\.encoder\.language_model\.layers\.(\d+)\.")

# Per-layer suffix → .dgf suffix (prefixed with "blk.N.").
LAYER_TENSORS: dict[str, str] = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight",
    "experts.down_proj": "ffn_down_exps.weight",
}

# Whole-model tensors.
GLOBAL_TENSORS: dict[str, str] = {
    "model.decoder.embed_tokens.weight": "token_embd.weight",
    "model.encoder.language_model.embed_tokens.weight": "token_embd.weight",
    "model.decoder.norm.weight": "output_norm.weight",
    "model.encoder.language_model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.decoder.self_conditioning.pre_norm.weight": "self_cond_pre_norm.weight",
    "model.decoder.self_conditioning.gate_proj.weight": "self_cond_gate.weight",
    "model.decoder.self_conditioning.up_proj.weight": "self_cond_up.weight",
    "model.decoder.self_conditioning.down_proj.weight": "self_cond_down.weight",
}

# The one per-layer buffer that encoder and decoder do not share.
LAYER_SCALAR = {"decoder": "layer_output_scale.weight", "encoder": "enc_layer_output_scale.weight"}

# Skipped for the text-only runtime (kept representable: a later version maps them to `v.*` / `mm.*`).
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")

_LAYER_RE = [re.compile(p + r"(.+)$") for p in _LAYER_PREFIXES]


def dgf_name(hf_name: str) -> str | None:
    """The .dgf name of an HF tensor, or None for a tensor the text runtime does not use (vision)."""
    if hf_name.startswith(VISION_PREFIXES):
        return None
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    for side, pattern in zip(("decoder", "encoder"), _LAYER_RE, strict=True):
        match = pattern.match(hf_name)
        if match:
            layer, suffix = int(match.group(1)), match.group(2)
            if suffix == "layer_scalar":
                return f"blk.{layer}.{LAYER_SCALAR[side]}"
            if suffix in LAYER_TENSORS:
                return f"blk.{layer}.{LAYER_TENSORS[suffix]}"
    raise KeyError(hf_name)
