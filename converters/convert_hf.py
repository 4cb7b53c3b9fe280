"""convert-hf-to-dgf: pack a DiffusionGemma checkpoint into one quantized .dgf (GGUF v3) file.

Streams one tensor chunk at a time through gguf-py's GGUFWriter (`add_tensor_info`, then
`write_tensor_data`), writes to a temporary file and renames it only on success: a failure or Ctrl-C never
leaves a partial .dgf behind.

The vision tower and its projector go into the same file (llama.cpp's `v.*` / `mm.*` tensors and `clip.*` keys,
with the image processor's settings) when the checkpoint has the processor's settings (preprocessor_config.json or
processor_config.json, without which transformers cannot process an image either); `--no-vision` leaves them out,
`--mmproj-out FILE` also writes them alone as a llama.cpp-style mmproj file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFEndian, GGUFValueType, GGUFWriter
from tqdm import tqdm

from dgrun.config import ARCH, ROPE_FREQS_TENSOR, ConfigError, GenerationConfig, ModelConfig
from dgrun.converters.names import VISION_PREFIXES, dgf_name, vision_dgf_name
from dgrun.converters.presets import PRESETS, PresetError, recipe_type, tensor_type
from dgrun.converters.safetensors_reader import CheckpointError, SafeTensor, open_checkpoint
from dgrun.converters.tokenizer_pack import TokenizerError, pack_tokenizer
from dgrun.model import tensor_shapes
from dgrun.quants import NVFP4, get_quant_type, row_bytes
from dgrun.vision import ImageTokens, VisionConfig, vision_tensor_shapes

ALIGNMENT = 64  # lets every backend load tensor data with aligned vector loads straight from the mapping


class ConversionError(ValueError):
    """Anything that makes a checkpoint unconvertible; the CLI prints it as one line."""


@dataclass
class PlannedTensor:
    """One .dgf tensor: where its values come from, its shape, the type it is stored as and the type the preset's
    recipe wanted (they differ after a row-width fallback), and the other stored copies that must equal it."""

    name: str
    source: SafeTensor
    shape: tuple[int, ...]
    ggml_type: T
    recipe_type: T
    copies: list[SafeTensor] = field(default_factory=list)
    tensor_scale: float | None = None
    transform: Callable[[np.ndarray], np.ndarray] | None = None  # applied to each chunk of rows before storing

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * row_bytes(self.ggml_type, self.shape[-1])


class StreamedTensor:
    """Quacks like the ndarray `GGUFWriter.write_tensor_data` expects, but writes chunk by chunk."""

    def __init__(self, nbytes: int, chunks: Callable[[], Iterator[np.ndarray]]):
        self.nbytes = nbytes
        self._chunks = chunks

    def tofile(self, fout: BinaryIO) -> None:
        written = 0
        for chunk in self._chunks():
            chunk.tofile(fout)
            written += chunk.nbytes
        if written != self.nbytes:
            raise ConversionError(f"internal error: wrote {written} bytes for a {self.nbytes}-byte tensor")


def tied_output(hf_config: dict[str, Any]) -> bool:
    """Whether lm_head is the embedding: the top-level `tie_word_embeddings`, the flag transformers' tying reads
    for `DiffusionGemmaForBlockDiffusion` (the text config's own flag is not consulted)."""
    return bool(hf_config.get("tie_word_embeddings", True))


@dataclass
class VisionPlan:
    """The vision tower's part of a conversion: its config and tensors, or why it is left out."""

    tokens: ImageTokens | None  # None when the vocabulary has no image tokens
    config: VisionConfig | None = None
    tensors: list[PlannedTensor] = field(default_factory=list)
    left_out: str | None = None  # the reason, when the checkpoint has a tower that is not converted


def plan(model_dir: Path, outtype: str, strict: bool = False,
         vision: bool = True) -> tuple[ModelConfig, dict[str, Any], list[PlannedTensor], VisionPlan]:
    """Read config and checkpoint headers, map names, check shapes, pick types. Reads no tensor data.

    Returns the config, the raw config.json, the text model's tensors to write, and the vision tower's part.
    """
    config_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir} is not a directory")
    if not config_path.is_file():
        raise ConversionError(f"{model_dir} has no config.json: not a Hugging Face checkpoint folder")
    hf_config = read_json_object(config_path, "config.json")
    cfg = ModelConfig.from_hf(hf_config)
    tensors = open_checkpoint(model_dir)
    tied = tied_output(hf_config)
    expected = tensor_shapes(cfg, tied_output=tied)
    sliding = [cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)]
    # Every stored copy of each .dgf tensor: encoder and decoder each store the weights they share when untied (or
    # when a tool wrote both), and a tied lm_head may be stored too. The first is written, the others compared.
    stored: dict[str, list[SafeTensor]] = {}
    vision_sources: dict[str, SafeTensor] = {}
    for hf_name, source in tensors.items():
        if hf_name.startswith(VISION_PREFIXES):
            vision_sources[hf_name] = source
            continue
        try:
            name = dgf_name(hf_name)
        except KeyError:
            raise ConversionError(f"unexpected tensor {hf_name} (not part of DiffusionGemma)") from None
        if name == "output.weight" and tied:
            name = "token_embd.weight"  # transformers would use a stored lm_head: it must be the embedding
        if name not in expected:
            raise ConversionError(_unexpected(hf_name, name, sliding))
        if tuple(source.shape) != expected[name]:
            raise ConversionError(
                f"tensor {hf_name} has shape {tuple(source.shape)}, but config.json implies {expected[name]}")
        stored.setdefault(name, []).append(source)
    missing = [n for n in expected if n not in stored]
    if missing:
        raise ConversionError(f"checkpoint is missing tensor {missing[0]} ({len(missing)} missing in all)")
    planned = []
    for name, shape in expected.items():
        # A tied lm_head is only compared: the embedding is what gets written.
        source, *copies = sorted(stored[name], key=lambda t: t.name == "lm_head.weight")
        ggml_type = tensor_type(name, shape, outtype, cfg.num_hidden_layers, sliding, strict)
        planned.append(PlannedTensor(name, source, shape, ggml_type,
                                     recipe_type(name, shape, outtype, cfg.num_hidden_layers, sliding), copies))
    vision_plan = _plan_vision(model_dir, hf_config, cfg, vision_sources, outtype, strict, vision)
    return cfg, hf_config, planned, vision_plan


def _processor_settings(model_dir: Path) -> dict[str, Any] | None:
    """The image processor's settings: preprocessor_config.json, else processor_config.json's image_processor."""
    for filename, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = model_dir / filename
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConversionError(f"{filename} is not valid JSON ({e})") from None
            data = data.get(key) if key and isinstance(data, dict) else data
            if isinstance(data, dict):
                return data
    return None


def _plan_vision(model_dir: Path, hf_config: dict[str, Any], cfg: ModelConfig, sources: dict[str, SafeTensor],
                 outtype: str, strict: bool, wanted: bool) -> VisionPlan:
    tokens = ImageTokens.from_hf(hf_config)
    if not sources:
        return VisionPlan(tokens)
    outside = [t for t in (tokens.image_token_id, tokens.boi_token_id, tokens.eoi_token_id) if t >= cfg.vocab_size]
    if outside:  # a text model shaped like DiffusionGemma (tests, distillations) whose vocabulary has no image tokens
        return VisionPlan(None, left_out=f"leaving out the {len(sources)} vision-tower tensors: image token id "
                                         f"{outside[0]} is outside the vocabulary of {cfg.vocab_size}")
    if not wanted:
        return VisionPlan(tokens, left_out=f"leaving out the {len(sources)} vision-tower tensors (--no-vision)")
    processor = _processor_settings(model_dir)
    if processor is None:
        return VisionPlan(tokens, left_out=f"leaving out the {len(sources)} vision-tower tensors: the checkpoint has "
                                           "no preprocessor_config.json (the image processor's settings)")
    vcfg = VisionConfig.from_hf(hf_config, processor)
    if vcfg.projection_dim != cfg.hidden_size:
        raise ConversionError(f"the vision projector maps to {vcfg.projection_dim} values, the text model's hidden "
                              f"size is {cfg.hidden_size}")
    expected = vision_tensor_shapes(vcfg)
    planned = []
    for hf_name, source in sources.items():
        try:
            name = vision_dgf_name(hf_name)
        except KeyError:
            raise ConversionError(f"unexpected tensor {hf_name} (not part of the Gemma 4 vision tower)") from None
        if name not in expected:
            raise ConversionError(f"tensor {hf_name} is not expected by the vision config")
        shape, transform = expected[name], None
        hf_shape = shape
        if name == "v.patch_embd.weight":  # HF's rows are (y, x, channel); llama.cpp's convolution (channel, y, x)
            hf_shape, transform = (shape[0], 3 * shape[2] * shape[3]), partial(_patch_rows, vcfg.patch_size)
        if tuple(source.shape) != hf_shape:
            raise ConversionError(f"tensor {hf_name} has shape {tuple(source.shape)}, but the vision config implies "
                                  f"{hf_shape}")
        ggml_type = tensor_type(name, shape, outtype, cfg.num_hidden_layers, [], strict)
        planned.append(PlannedTensor(name, source, shape, ggml_type,
                                     recipe_type(name, shape, outtype, cfg.num_hidden_layers, []),
                                     transform=transform))
    missing = sorted(set(expected) - {t.name for t in planned})
    if missing:
        raise ConversionError(f"checkpoint is missing vision tensor {missing[0]} ({len(missing)} missing in all)")
    order = list(expected)
    planned.sort(key=lambda t: order.index(t.name))
    return VisionPlan(tokens, vcfg, planned)


def _patch_rows(patch_size: int, rows: np.ndarray) -> np.ndarray:
    """Patch-embedding rows from HF's (y, x, channel) order to llama.cpp's (channel, y, x)."""
    p = patch_size
    return np.ascontiguousarray(rows.reshape(-1, p, p, 3).transpose(0, 3, 1, 2).reshape(len(rows), -1))


def read_json_object(path: Path, label: str) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is a ConversionError naming `label`."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{label} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{label} is not a JSON object")
    return value


def _unexpected(hf_name: str, name: str, sliding: list[bool]) -> str:
    parts = name.split(".")
    if name.endswith("attn_v.weight") and not sliding[int(parts[1])]:
        return (f"tensor {hf_name}: DiffusionGemma's full-attention layers use K as V and have no v_proj "
                "(transformers 5.23.0 would drop this weight), so this checkpoint is not one dgrun can run")
    return f"tensor {hf_name} is not expected by this config"


def _compared_chunks(t: PlannedTensor) -> Iterator[np.ndarray]:
    """The source's float32 chunks, each checked bit for bit against the same rows of every other stored copy:
    copies are read in step with the source, so differing copies cost no extra pass and no whole tensor."""
    others = [copy.chunks() for copy in t.copies]
    row = 0
    for chunk in t.source.chunks():
        for copy, stream in zip(t.copies, others, strict=True):
            other = next(stream)
            if not np.array_equal(chunk.view(np.uint32), other.view(np.uint32)):
                first = row + int(np.argmax((chunk.view(np.uint32) != other.view(np.uint32)).any(axis=1)))
                raise ConversionError(_copies_differ(t.source.name, copy.name, first))
        row += len(chunk)
        yield chunk


def _copies_differ(kept: str, other: str, row: int) -> str:
    if other == "lm_head.weight":
        return (f"lm_head.weight differs from the embedding {kept} (first at row {row}) although config.json ties "
                "them (tie_word_embeddings): refusing to drop the output matrix transformers would use")
    return (f"{other} differs from {kept} (first at row {row}): dgrun shares one copy of each weight between "
            "encoder and decoder, so it cannot run this checkpoint merged; if it is a LoRA fine-tune with the adapter "
            "merged in, convert the base checkpoint, convert the adapter with convert-lora-to-dgf and load it unmerged "
            "(dgrun --lora)")


def _quantized_chunks(t: PlannedTensor, progress: tqdm) -> Iterator[np.ndarray]:
    quant = get_quant_type(t.ggml_type)
    for chunk in _compared_chunks(t):
        if t.transform is not None:
            chunk = t.transform(chunk)
        if not np.isfinite(chunk).all():
            raise ConversionError(f"tensor {t.source.name} contains NaN or Inf")
        if t.tensor_scale is not None:
            chunk = chunk / np.float32(t.tensor_scale)
        try:
            yield quant.quantize(chunk)
        except ValueError as e:  # F16's range
            raise ConversionError(f"tensor {t.source.name}: {e}") from None
        progress.update(sum(x.nbytes for x in (t.source, *t.copies)) * len(chunk) // t.source.n_rows)


def _nvfp4_scale(t: PlannedTensor) -> float:
    """The per-tensor NVFP4 scale needs the whole tensor's max |x|: one extra streaming pass."""
    amax = np.float32(0)
    for chunk in t.source.chunks():
        amax = max(amax, np.float32(np.abs(chunk).max(initial=0)))
    return NVFP4.tensor_scale(np.array([amax], dtype=np.float32))


def add_metadata(writer: GGUFWriter, key: str, value: Any) -> None:
    """Write one metadata value with its GGUF type (also used by tools/make_random_dgf.py).

    Generation floats go in as float64: the sampler's schedule is double arithmetic; so does the image processor's
    rescale factor, which scales pixels in float64."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_int32(key, value) if value < 0 else writer.add_uint32(key, value)
    elif isinstance(value, float):
        if key.startswith(f"{ARCH}.generation.") or key == "dgrun.vision.rescale_factor":
            writer.add_key_value(key, value, GGUFValueType.FLOAT64)
        else:
            writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"cannot store metadata {key}={value!r}")


def add_rope_freqs(writer: GGUFWriter, cfg: ModelConfig, payloads: list[Any]) -> None:
    """The `rope_freqs.weight` tensor llama.cpp's Gemma 4 graphs read for proportional RoPE (beside dgrun's
    `rope.partial_rotary_factor` key, which says the same)."""
    freqs = cfg.rope_freqs()
    writer.add_tensor_info(ROPE_FREQS_TENSOR, freqs.shape, freqs.dtype, freqs.nbytes)
    payloads.append(freqs)


@contextmanager
def atomic_writer(path: Path, arch: str = ARCH) -> Iterator[GGUFWriter]:
    """A GGUFWriter (dgrun's architecture, or `arch`, and alignment) on a temporary file beside `path`, moved onto
    `path` only when the block completes: an error or Ctrl-C part-way leaves no half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, arch)
    try:
        writer.add_custom_alignment(ALIGNMENT)
        yield writer
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def write_file(writer: GGUFWriter, payloads: list[Any]) -> None:
    """Header, metadata and tensor infos, then each tensor's data in the order its info was added. A payload is an
    ndarray or quacks like one for write_tensor_data (`.nbytes`, `.tofile`), so data can be streamed."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for payload in payloads:
        # Little-endian data as given: GGUFWriter must not byteswap.
        writer.write_tensor_data(payload, tensor_endianess=GGUFEndian.LITTLE)


def convert(model_dir: Path, outfile: Path, outtype: str = "q8_0", with_tokenizer: bool = True,
            quiet: bool = False, strict: bool = False, vision: bool = True,
            mmproj_out: Path | None = None) -> dict[str, Any]:
    """Convert a checkpoint folder to `outfile`. Returns a summary (sizes, bits per weight, type mix, fallbacks).

    A tensor the preset's type cannot store falls back to the next type that can (see `presets`), with one notice
    per kind of fallback on stderr (unless `quiet`); `strict` refuses instead of falling back to F16. The vision
    tower goes into `outfile` unless `vision` is False, and into `mmproj_out` alone when that is given."""
    try:
        cfg, hf_config, planned, vplan = plan(model_dir, outtype, strict, vision or mmproj_out is not None)
        tokenizer_meta, spm_bytes = pack_tokenizer(model_dir, cfg, hf_config) if with_tokenizer else ({}, None)
        gen_path = model_dir / "generation_config.json"
        gen_json = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    except (ConfigError, CheckpointError, PresetError, TokenizerError) as e:
        raise ConversionError(str(e)) from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"generation_config.json is not valid JSON ({e})") from None
    if mmproj_out is not None and vplan.config is None:
        raise ConversionError(f"--mmproj-out: there is no vision tower to write "
                              f"({vplan.left_out or 'the checkpoint has none'})")
    generation = GenerationConfig.from_hf(gen_json, hf_config.get("text_config", {}))
    tensors = [*planned, *(vplan.tensors if vision else [])]
    fallbacks = _fallbacks([*planned, *vplan.tensors])
    if not quiet:
        if vplan.left_out:
            print(f"note: {vplan.left_out}", file=sys.stderr)
        elif vplan.config is not None and not vision:
            print(f"note: the vision tower goes to {mmproj_out} only (--no-vision)", file=sys.stderr)
        for (wanted, got), group in fallbacks.items():
            widths = ", ".join(str(w) for w in sorted({t.shape[-1] for t in group}))
            print(f"note: {len(group)} tensor(s) stored as {got.name} instead of {wanted.name}: rows of {widths} "
                  f"values are not a multiple of {wanted.name}'s {get_quant_type(wanted).block_size}-value blocks",
                  file=sys.stderr)

    for t in tensors:
        if t.ggml_type == T.NVFP4:
            t.tensor_scale = _nvfp4_scale(t)
    name = hf_config.get("_name_or_path") or model_dir.name
    metadata = {**cfg.to_metadata(), **generation.to_metadata(), **tokenizer_meta,
                **({} if vplan.tokens is None else vplan.tokens.to_metadata())}
    if vplan.config is not None and vision:
        metadata.update(vplan.config.to_metadata())
    outfile = outfile.resolve()
    # llama.cpp's Gemma 4 graphs read rope_freqs for proportional RoPE (beside dgrun's partial_rotary_factor key).
    blobs = [(ROPE_FREQS_TENSOR, cfg.rope_freqs())]
    if spm_bytes is not None:
        blobs.append(("tokenizer.sentencepiece_model", np.frombuffer(spm_bytes, dtype=np.int8)))
    _write(outfile, ARCH, name, outtype, metadata, tensors, blobs, quiet)
    if mmproj_out is not None and vplan.config is not None:
        _write(mmproj_out.resolve(), "clip", name, outtype, {"general.type": "mmproj", **vplan.config.to_metadata()},
               vplan.tensors, [], quiet)
    mix: dict[str, int] = {}
    counts: dict[str, int] = {}
    for t in tensors:
        mix[t.ggml_type.name] = mix.get(t.ggml_type.name, 0) + t.nbytes
        counts[t.ggml_type.name] = counts.get(t.ggml_type.name, 0) + 1
    n_weights = sum(math.prod(t.shape) for t in tensors)
    size = outfile.stat().st_size
    return {"outfile": str(outfile), "bytes": size, "bits_per_weight": 8 * sum(mix.values()) / n_weights,
            "parameters": n_weights, "type_bytes": mix, "type_tensors": counts,
            "fallbacks": {f"{wanted.name}->{got.name}": len(ts) for (wanted, got), ts in fallbacks.items()},
            "vision_tensors": len(tensors) - len(planned),
            "mmproj": None if mmproj_out is None else str(mmproj_out.resolve())}


def _write(path: Path, arch: str, name: str, outtype: str, metadata: dict[str, Any], tensors: list[PlannedTensor],
           blobs: list[tuple[str, np.ndarray]], quiet: bool) -> None:
    """One GGUF file: the metadata, then each tensor streamed chunk by chunk (with its NVFP4 scale), then blobs."""
    with atomic_writer(path, arch) as writer:
        writer.add_name(name)
        writer.add_string("general.source.format", "huggingface-safetensors")
        writer.add_string("dgrun.outtype", outtype)
        for key, value in metadata.items():
            add_metadata(writer, key, value)
        payloads: list[Any] = []
        total_source = sum(x.nbytes for t in tensors for x in (t.source, *t.copies))
        progress = tqdm(total=total_source, unit="B", unit_scale=True, desc=f"{outtype} {path.name}", disable=quiet,
                        file=sys.stderr)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
            payloads.append(StreamedTensor(t.nbytes, partial(_quantized_chunks, t, progress)))
            if t.tensor_scale is not None:
                scale = np.array([t.tensor_scale], dtype=np.float32)
                writer.add_tensor_info(f"{t.name}.scale", (1,), np.dtype(np.float32), 4)
                payloads.append(scale)
        for blob_name, blob in blobs:
            writer.add_tensor_info(blob_name, blob.shape, blob.dtype, blob.nbytes)
            payloads.append(blob)
        write_file(writer, payloads)
        progress.close()


def _fallbacks(planned: list[PlannedTensor]) -> dict[tuple[T, T], list[PlannedTensor]]:
    """(recipe type, stored type) → the tensors stored as another type than their recipe's, for their row width."""
    out: dict[tuple[T, T], list[PlannedTensor]] = {}
    for t in planned:
        if t.ggml_type != t.recipe_type:
            out.setdefault((t.recipe_type, t.ggml_type), []).append(t)
    return out


def run_converter(prog: str, conversion: Callable[[], dict[str, Any]]) -> dict[str, Any] | int:
    """Run a conversion as a console script: its summary, or the exit status after one line on stderr (2 for what
    the user can fix, 130 for Ctrl-C, 1 for the system's errors)."""
    try:
        return conversion()
    except ConversionError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no output written", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"{prog}: error: {e.strerror or e}: {getattr(e, 'filename', '') or ''}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert-hf-to-dgf", description="Convert a DiffusionGemma Hugging Face checkpoint to one .dgf file.")
    parser.add_argument("model_dir", type=Path, help="folder with config.json and *.safetensors")
    parser.add_argument("--outfile", "-o", type=Path, help="output .dgf path (default: <model_dir>-<outtype>.dgf)")
    parser.add_argument("--outtype", default="q8_0", choices=list(PRESETS), help="quantization preset")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="allow a checkpoint without tokenizer files (the model then takes token ids only)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse a tensor the outtype cannot store instead of falling back to F16")
    parser.add_argument("--no-vision", action="store_true",
                        help="leave the vision tower out of the .dgf (text only, or with --mmproj-out beside it)")
    parser.add_argument("--mmproj-out", type=Path, metavar="FILE",
                        help="also write the vision tower alone, as a llama.cpp-style mmproj GGUF file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no notices")
    args = parser.parse_args(argv)
    outfile = args.outfile or Path(f"{str(args.model_dir).rstrip('/')}-{args.outtype}.dgf")
    summary = run_converter("convert-hf-to-dgf", partial(convert, args.model_dir, outfile, args.outtype,
                                                         not args.no_tokenizer, args.quiet, args.strict,
                                                         not args.no_vision, args.mmproj_out))
    if isinstance(summary, int):
        return summary
    mix = ", ".join(f"{k} {summary['type_tensors'][k]} tensors {v / 2**20:.1f} MiB"
                    for k, v in sorted(summary["type_bytes"].items()))
    print(f"wrote {summary['outfile']}: {summary['bytes'] / 2**20:.1f} MiB, "
          f"{summary['bits_per_weight']:.2f} bits/weight ({mix})")
    if summary["mmproj"]:
        print(f"wrote {summary['mmproj']}: the vision tower")
    return 0


if __name__ == "__main__":
    sys.exit(main())
