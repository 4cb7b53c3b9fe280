"""convert-lora-to-dgf: a PEFT LoRA adapter (what PEFT and Unsloth save: adapter_config.json and
adapter_model.safetensors) as one adapter file in llama.cpp's adapter GGUF convention (see `dgrun.lora`).

Every delta is checked against the base model's shapes; the encoder's and the decoder's copies of each layer keep
their own deltas (`enc.blk.N.*` and `blk.N.*`), the self-conditioning MLP's go under `self_cond_*`, vision-tower
deltas are skipped with a notice. What an unmerged `W x + scale * B(A x)` term cannot express is refused with one
line: DoRA and the other LoRA variants, expert deltas (`target_parameters`), whole replaced modules, biases,
targets this graph has no linear for, pickle (`.bin`) adapters.

The scale. PEFT scales a term by alpha / r, or alpha / sqrt(r) with rsLoRA (`use_rslora`), per module with
`rank_pattern` / `alpha_pattern`. llama.cpp's format has one `adapter.lora.alpha` and always divides by r (read
from lora_b), so the file stores alpha_eff = scale * r: for rsLoRA alpha * sqrt(r), which every reader of the
format then turns into the right scale. A module whose alpha_eff differs from the file's (per-module patterns)
has its lora_b multiplied by the ratio, which keeps the product exact up to float32 rounding.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T

from dgrun.config import ARCH, ConfigError, ModelConfig
from dgrun.converters.convert_hf import (
    ConversionError,
    StreamedTensor,
    add_metadata,
    atomic_writer,
    read_json_object,
    run_converter,
    write_file,
)
from dgrun.converters.names import VISION_PREFIXES, dgf_name
from dgrun.converters.presets import PresetError, tensor_type
from dgrun.converters.safetensors_reader import CheckpointError, SafeTensor, read_header
from dgrun.format import FormatError, GGUFFile
from dgrun.lora import ALPHA_KEY, PEFT_ALPHA_KEY, RSLORA_KEY, adapter_name, targets
from dgrun.model import tensor_shapes
from dgrun.quants import get_quant_type, row_bytes

OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # llama.cpp's convert_lora_to_gguf.py offers the same
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_VARIANT = "a LoRA variant whose forward is not W x + scale * B(A x), which is all the adapter format expresses"
# adapter_config.json keys that, when set, make an adapter something this format cannot hold.
REFUSED_OPTIONS: dict[str, str] = {
    "use_dora": "DoRA adapters (use_dora) are not supported: their magnitude vectors rescale the adapted weight's "
                "columns, which an unmerged LoRA term cannot express (llama.cpp refuses them too); merge the adapter "
                "with PEFT (merge_and_unload) instead",
    "target_parameters": "expert deltas (target_parameters) are not supported yet: dgrun applies LoRA to the "
                         "attention and dense-MLP projections only",
    "modules_to_save": "the adapter replaces whole modules (modules_to_save), which is a fine-tuned checkpoint, "
                       "not a LoRA adapter",
    "trainable_token_indices": "the adapter trains embedding rows (trainable_token_indices), which a LoRA adapter "
                               "file cannot hold",
    "layer_replication": "the adapter replicates layers (layer_replication), which changes the base's graph",
    "lora_bias": "the adapter trains a bias on lora_B (lora_bias), which llama.cpp's adapter format has no place for",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after its invocation tokens: "
                               + _VARIANT,
    "use_qalora": f"QALoRA (use_qalora) is {_VARIANT}",
    "use_bdlora": f"block-diagonal LoRA (use_bdlora) is {_VARIANT}",
    "arrow_config": f"Arrow routing (arrow_config) is {_VARIANT}",
    "kasa_config": f"KaSA (kasa_config) is {_VARIANT}",
    "monteclora_config": f"MonteCLoRA (monteclora_config) is {_VARIANT}",
    "velora_config": f"VeLoRA (velora_config) is {_VARIANT}",
    "fan_in_fan_out": "fan_in_fan_out stores transposed weights (GPT-2's Conv1D); DiffusionGemma's linears are not",
}
# base_model.model.<module>.lora_A.weight, optionally with the adapter's name before .weight (raw state dicts).
_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.(?P<half>lora_A|lora_B)(?:\.[^.]+)?\.weight")
_TARGETS_HINT = ("dgrun adapts q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj of the text layers "
                 "(encoder and decoder) and of the self-conditioning MLP")


@dataclass
class Delta:
    """One module's delta: its name in the adapter file, its PEFT tensors and rank, and the factor baked into B."""

    name: str
    a: SafeTensor
    b: SafeTensor
    rank: int
    alpha_eff: float  # PEFT's scale for this module times its rank
    factor: float = 1.0  # alpha_eff / the file's alpha, multiplied into lora_b


def base_config(base: Path) -> ModelConfig:
    """The base model's config, from a Hugging Face checkpoint folder (config.json) or a .dgf file."""
    try:
        if base.is_dir():
            config_path = base / "config.json"
            if not config_path.is_file():
                raise ConversionError(f"base {base} has no config.json: not a Hugging Face checkpoint folder")
            return ModelConfig.from_hf(read_json_object(config_path, f"base {config_path}"))
        if not base.is_file():
            raise ConversionError(f"base {base} does not exist (give a checkpoint folder or a .dgf file)")
        with GGUFFile(base) as gguf:
            arch, kind = gguf.get("general.architecture"), gguf.get("general.type")
            if kind == "adapter":
                raise ConversionError(f"base {base} is itself an adapter, not a model")
            if arch != ARCH:
                raise ConversionError(f"base {base} is a {arch!r} model, not {ARCH!r}")
            return ModelConfig.from_metadata(gguf.metadata)
    except (ConfigError, FormatError) as e:
        raise ConversionError(f"base {base}: {e}") from None


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json, refused unless it describes a plain LoRA adapter."""
    if not adapter_dir.is_dir():
        raise ConversionError(f"{adapter_dir} is not a directory (expected a PEFT adapter folder)")
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise ConversionError(f"{adapter_dir} has no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    config = read_json_object(path, ADAPTER_CONFIG)
    if config.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"the adapter is {config.get('peft_type')}, not LoRA (peft_type); only LoRA adapters "
                              "convert")
    for key, why in REFUSED_OPTIONS.items():
        if config.get(key):
            raise ConversionError(why)
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConversionError(f"{ADAPTER_CONFIG}: {key} must be a positive number, got {value!r}")
    return config


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key that matches
    the end of the module name at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def plan(adapter_dir: Path, base: Path) -> tuple[dict[str, Any], list[Delta], float, int]:
    """Check the adapter against the base: (adapter config, deltas, the file's alpha, vision deltas skipped)."""
    config = read_adapter_config(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in adapter_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise ConversionError(f"refusing pickle adapter {pickles[0]}: loading it can run arbitrary code; save it "
                                  "with safe_serialization=True (PEFT's default) or convert it to safetensors")
        raise ConversionError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}")
    cfg = base_config(base)
    allowed, shapes = set(targets(cfg).values()), tensor_shapes(cfg)
    halves: dict[str, dict[str, SafeTensor]] = {}
    skipped_vision = 0
    for key, tensor in read_header(weights).items():
        if "lora_magnitude_vector" in key:
            raise ConversionError(REFUSED_OPTIONS["use_dora"])
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            raise ConversionError(f"unexpected tensor {key} in {ADAPTER_WEIGHTS} (only lora_A / lora_B weights "
                                  "convert)")
        module = match.group("module")
        if module.startswith(VISION_PREFIXES):
            skipped_vision += 1
            continue
        halves.setdefault(module, {})[match.group("half")] = tensor
    deltas = []
    for module, half in halves.items():
        try:
            base_name = dgf_name(module + ".weight")
        except KeyError:
            base_name = None
        encoder = module.startswith("model.encoder.")
        name = adapter_name(base_name, encoder) if base_name and (encoder, base_name) in allowed else None
        if name is None:
            raise ConversionError(f"the adapter targets {module}, which dgrun cannot adapt: {_TARGETS_HINT}")
        if len(half) != 2:
            raise ConversionError(f"{module} has {next(iter(half))} but not its other half")
        a, b = half["lora_A"], half["lora_B"]
        out, width = shapes[base_name]
        if (len(a.shape), len(b.shape), a.shape[1], b.shape[0], a.shape[0]) != (2, 2, width, out, b.shape[1]):
            raise ConversionError(f"{module}: lora_A {a.shape} and lora_B {b.shape} do not fit the base's {base_name} "
                                  f"{shapes[base_name]} (expected [r, {width}] and [{out}, r]): is --base the model "
                                  "this adapter was trained on?")
        rank = a.shape[0]
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        deltas.append(Delta(name, a, b, rank, scale * rank))
    if not deltas:
        raise ConversionError(f"the adapter has no deltas for the text model ({_TARGETS_HINT})")
    # The file's alpha: the most common alpha_eff, so most deltas are written unchanged.
    alpha_file = Counter(d.alpha_eff for d in deltas).most_common(1)[0][0]
    for d in deltas:
        d.factor = d.alpha_eff / alpha_file
    return config, sorted(deltas, key=lambda d: _order(d.name)), alpha_file, skipped_vision


def _order(name: str) -> tuple[int, int, str]:
    """Decoder, then encoder, then self-conditioning deltas; layers in order."""
    match = re.search(r"blk\.(\d+)\.", name)
    side = 0 if name.startswith("blk.") else 1 if name.startswith("enc.") else 2
    return side, int(match.group(1)) if match else 0, name


def _chunks(tensor: SafeTensor, factor: float, ggml_type: T) -> Iterator[np.ndarray]:
    """The tensor (times `factor`) in its file type, as one chunk: LoRA halves are small."""
    values = tensor.read_rows(0, tensor.n_rows)
    if factor != 1.0:
        values = values * np.float32(factor)
    if not np.isfinite(values).all():
        raise ConversionError(f"tensor {tensor.name} contains NaN or Inf")
    try:
        yield get_quant_type(ggml_type).quantize(values)
    except ValueError as e:  # F16's range
        raise ConversionError(f"tensor {tensor.name}: {e}") from None


def convert_lora(adapter_dir: Path, base: Path, outfile: Path, outtype: str = "f32",
                 quiet: bool = False) -> dict[str, Any]:
    """Convert the PEFT adapter in `adapter_dir` (trained on `base`) to `outfile`; returns a summary."""
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown outtype {outtype!r} (choose from {', '.join(OUTTYPES)})")
    try:
        config, deltas, alpha, skipped_vision = plan(adapter_dir, base)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    tensors: list[tuple[str, SafeTensor, float]] = []
    for d in deltas:
        tensors += [(d.name + ".lora_a", d.a, 1.0), (d.name + ".lora_b", d.b, d.factor)]
    types: dict[str, T] = {}
    for name, tensor, _ in tensors:
        try:
            types[name] = tensor_type(name, tensor.shape, outtype, 0, [])
        except PresetError as e:
            raise ConversionError(str(e)) from None
    if not quiet:
        if skipped_vision:
            print(f"note: skipping {skipped_vision} vision-tower tensors (dgrun's runtime is text-only)",
                  file=sys.stderr)
        fallback = sorted({t.shape[-1] for name, t, _ in tensors if types[name] != T[outtype.upper()]})
        if fallback:
            print(f"note: LoRA tensors with rows of {', '.join(map(str, fallback))} values stored as F16 instead of "
                  f"{outtype.upper()} (not a multiple of its 32-value blocks)", file=sys.stderr)
        baked = sum(d.factor != 1.0 for d in deltas)
        if baked:
            print(f"note: {baked} deltas have their own alpha (alpha_pattern / rank_pattern with rsLoRA): their "
                  "lora_b carries the ratio to the file's alpha", file=sys.stderr)
    outfile = outfile.resolve()
    with atomic_writer(outfile) as writer:
        writer.add_type("adapter")
        writer.add_name(adapter_dir.resolve().name)
        add_metadata(writer, "adapter.type", "lora")
        add_metadata(writer, ALPHA_KEY, float(alpha))
        add_metadata(writer, PEFT_ALPHA_KEY, float(config["lora_alpha"]))
        add_metadata(writer, RSLORA_KEY, bool(config.get("use_rslora")))
        add_metadata(writer, "dgrun.outtype", outtype)
        payloads: list[Any] = []
        for name, tensor, factor in tensors:
            nbytes = tensor.shape[0] * row_bytes(types[name], tensor.shape[1])
            writer.add_tensor_info(name, tensor.shape, np.dtype(np.float32), nbytes, raw_dtype=types[name])
            payloads.append(StreamedTensor(nbytes, partial(_chunks, tensor, factor, types[name])))
        write_file(writer, payloads)
    sides = Counter("encoder" if d.name.startswith("enc.") else "self_conditioning" if d.name.startswith(
        "self_cond_") else "decoder" for d in deltas)
    return {"outfile": str(outfile), "bytes": outfile.stat().st_size, "deltas": dict(sides), "alpha": alpha,
            "ranks": sorted({d.rank for d in deltas}), "use_rslora": bool(config.get("use_rslora")),
            "skipped_vision": skipped_vision}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert-lora-to-dgf",
        description="Convert a PEFT / Unsloth LoRA adapter of DiffusionGemma to an adapter .dgf (llama.cpp's adapter "
                    "GGUF convention), for dgrun --lora.")
    parser.add_argument("adapter_dir", type=Path, help="folder with adapter_config.json and adapter_model.safetensors")
    parser.add_argument("--base", required=True, type=Path,
                        help="the base model the adapter was trained on: its checkpoint folder or its .dgf")
    parser.add_argument("--outfile", "-o", type=Path, help="output path (default: <adapter_dir>-<outtype>.dgf)")
    parser.add_argument("--outtype", default="f32", choices=OUTTYPES, help="type of the LoRA tensors (default f32)")
    parser.add_argument("--quiet", action="store_true", help="no notices")
    args = parser.parse_args(argv)
    outfile = args.outfile or Path(f"{str(args.adapter_dir).rstrip('/')}-{args.outtype}.dgf")
    summary = run_converter("convert-lora-to-dgf", partial(convert_lora, args.adapter_dir, args.base, outfile,
                                                           args.outtype, args.quiet))
    if isinstance(summary, int):
        return summary
    deltas = ", ".join(f"{n} {side}" for side, n in summary["deltas"].items())
    print(f"wrote {summary['outfile']}: {summary['bytes'] / 2**20:.1f} MiB, {deltas} deltas, rank "
          f"{'/'.join(map(str, summary['ranks']))}, alpha {summary['alpha']:g}"
          f"{' (rsLoRA: alpha * sqrt(r))' if summary['use_rslora'] else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
