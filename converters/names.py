"""Hugging Face → .dgf tensor names, as data.

Names follow gguf-py's GEMMA4 map (llama.cpp's Gemma 4 names) so that files flow both ways; the
DiffusionGemma-only tensors get `self_cond_*` and `enc_layer_output_scale`, as llama.cpp's drafts name them.
Encoder and decoder share every weight except `layer_scalar` (kept apart) and the decoder-only
self-conditioning MLP; the shared weights may be stored under either prefix and map to one .dgf tensor.
The vision tower maps to llama.cpp's `v.*` / `mm.*` names (its Gemma 4 mmproj converter's).
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

# The vision tower and its projector, under llama.cpp's names (gguf-py's MMPROJ map for Gemma 4, `clip.*` keys).
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
VISION_TENSORS: dict[str, str] = {
    "model.encoder.vision_tower.patch_embedder.input_proj.weight": "v.patch_embd.weight",
    "model.encoder.vision_tower.patch_embedder.position_embedding_table": "v.position_embd.weight",
    "model.encoder.vision_tower.std_bias": "v.std_bias",
    "model.encoder.vision_tower.std_scale": "v.std_scale",
    "model.encoder.embed_vision.embedding_projection.weight": "mm.input_projection.weight",
}
VISION_LAYER_TENSORS: dict[str, str] = {
    "self_attn.q_proj.linear.weight": "attn_q.weight",
    "self_attn.k_proj.linear.weight": "attn_k.weight",
    "self_attn.v_proj.linear.weight": "attn_v.weight",
    "self_attn.o_proj.linear.weight": "attn_out.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "input_layernorm.weight": "ln1.weight",
    "post_attention_layernorm.weight": "attn_post_norm.weight",
    "pre_feedforward_layernorm.weight": "ln2.weight",
    "post_feedforward_layernorm.weight": "ffn_post_norm.weight",
    "mlp.gate_proj.linear.weight": "ffn_gate.weight",
    "mlp.up_proj.linear.weight": "ffn_up.weight",
    "mlp.down_proj.linear.weight": "ffn_down.weight",
}

_LAYER_RE = [re.compile(p + r"(.+)$") for p in _LAYER_PREFIXES]
_VISION_LAYER_RE = re.compile(r"model\.encoder\.vision_tower\.encoder\.layers\.(\d+)\.(.+)$")


def vision_dgf_name(hf_name: str) -> str:
    """The .dgf name of an HF vision-tower or projector tensor (KeyError for one dgrun does not know)."""
    if hf_name in VISION_TENSORS:
        return VISION_TENSORS[hf_name]
    match = _VISION_LAYER_RE.match(hf_name)
    if match and match.group(2) in VISION_LAYER_TENSORS:
        return f"v.blk.{int(match.group(1))}.{VISION_LAYER_TENSORS[match.group(2)]}"
    raise KeyError(hf_name)


def dgf_name(hf_name: str) -> str | None:
    """The .dgf name of a text-model HF tensor, or None for a vision one (see `vision_dgf_name`)."""
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
