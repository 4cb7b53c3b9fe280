"""Quantization presets (`--outtype`): which ggml type each tensor gets.

Norms, the router, scales and every 1-D tensor stay F32 in all presets. `q4_k_m` adapts llama.cpp's recipe:
Q4_K by default, Q6_K for the tied embedding and for attn_v / ffn_down on the "more-bits" layers. Two
DiffusionGemma-specific choices: on full-attention layers K is also V, so attn_k gets attn_v's bits; and
the expert down projections count as ffn_down. The vision tower is stored at most as Q8_0 (`vision_recipe_type`).

A type stores rows whose width is a multiple of its block (256 for K-quants, 32 for Q8_0 / Q5_0 / MXFP4, 64 for
NVFP4). A tensor whose rows do not fit falls back as llama.cpp does: `llama-quantize` moves a K-quant to the
legacy block-32 type of similar or more bits (Q4_K → Q5_0, Q6_K → Q8_0: the released model's ffn_down, 2112
wide, and expert down, 704 wide, take this path), and whatever still does not fit goes to F16, which stores
any width (`convert_hf_to_gguf.py`'s fallback). `strict=True` stops before F16 and refuses instead.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType as T

from dgrun.quants import can_quantize, get_quant_type

PRESETS: dict[str, T] = {
    "f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0,
    "q4_k_m": T.Q4_K, "mxfp4_moe": T.Q8_0, "nvfp4_moe": T.Q8_0,
}
EXPERT_TYPES = {"mxfp4_moe": T.MXFP4, "nvfp4_moe": T.NVFP4}
K_QUANT_FALLBACK = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}
WIDTH_FALLBACK = T.F16  # the last resort: any row width
_KEEP_F32_SUFFIXES = ("_norm.weight", ".scale", "ffn_gate_inp.weight", "layer_output_scale.weight")
VISION_PREFIXES = ("v.", "mm.")  # the vision tower's and projector's .dgf names


class PresetError(ValueError):
    """The chosen outtype cannot represent a tensor (its row width is not a multiple of the block size)."""


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third in between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def vision_recipe_type(name: str, shape: tuple[int, ...], preset: str) -> T:
    """The vision tower's type, conservative as llama.cpp's mmproj files are: the float presets keep their float
    type, every quantizing one stores Q8_0; 1-D tensors and the position table stay F32, the patch embedding F32
    (F16 under f16), as llama.cpp's converter forces them."""
    if len(shape) == 1 or name == "v.position_embd.weight":
        return T.F32
    if name == "v.patch_embd.weight":
        return T.F16 if preset == "f16" else T.F32
    return PRESETS[preset] if PRESETS[preset] in (T.F32, T.F16, T.BF16) else T.Q8_0


def recipe_type(name: str, shape: tuple[int, ...], preset: str, n_layers: int, sliding: list[bool]) -> T:
    """The ggml type the preset's recipe gives `name`, before any fallback for its row width."""
    if preset not in PRESETS:
        raise PresetError(f"unknown outtype {preset!r} (choose from {', '.join(PRESETS)})")
    if name.startswith(VISION_PREFIXES):
        return vision_recipe_type(name, shape, preset)
    if len(shape) == 1 or name.endswith(_KEEP_F32_SUFFIXES):
        return T.F32
    is_expert = name.endswith(("ffn_gate_up_exps.weight", "ffn_down_exps.weight"))
    chosen = EXPERT_TYPES[preset] if is_expert and preset in EXPERT_TYPES else PRESETS[preset]
    if preset == "q4_k_m":
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        k_is_v = name.endswith("attn_k.weight") and layer >= 0 and not sliding[layer]
        down = name.endswith(("ffn_down.weight", "ffn_down_exps.weight", "attn_v.weight")) or k_is_v
        if name in ("token_embd.weight", "output.weight") or (down and use_more_bits(layer, n_layers)):
            chosen = T.Q6_K
    return chosen


def tensor_type(name: str, shape: tuple[int, ...], preset: str, n_layers: int, sliding: list[bool],
                strict: bool = False) -> T:
    """The ggml type `name` is stored as under `preset`: the recipe's, or the first fallback that stores its rows.

    With `strict`, a tensor that only F16 could store is a PresetError (the K-quant fallbacks are part of the
    recipe and still apply)."""
    chosen = recipe_type(name, shape, preset, n_layers, sliding)
    candidates = [chosen, *([K_QUANT_FALLBACK[chosen]] if chosen in K_QUANT_FALLBACK else [])]
    if not strict:
        candidates.append(WIDTH_FALLBACK)
    for candidate in candidates:
        if can_quantize(candidate, shape[-1]):
            return candidate
    raise PresetError(f"outtype {preset} cannot store {name}: its rows of {shape[-1]} values are not a multiple of "
                      f"{candidates[-1].name}'s block size ({get_quant_type(candidates[-1]).block_size}); without "
                      "--strict it would fall back to F16")
