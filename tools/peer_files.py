"""GGUF files of the llama.cpp fork that runs DiffusionGemma (PR #24423): make the test fixtures, rewrite files.

    # 1. the checkpoints (this repository's environment: transformers 5.23, the reference)
    python tools/peer_files.py checkpoints /tmp/peer-hf
    # 2. the fork's converter and quantizer (its own environment, transformers 5.11): see tests/data/peer/README.md
    # 3. a uniform importance matrix, which llama-quantize requires for IQ2_S
    python tools/peer_files.py imatrix /tmp/peer/quant-f32.gguf /tmp/peer/uniform.imatrix.gguf

`rewrite_gguf` copies a GGUF file with changed metadata or tensors, every value keeping its GGUF type; the tests
use it for the gguf-py-dequantized twin of a quantized file and for hostile variants of the fork's files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402

DROP = object()  # a value for `rewrite_gguf`'s `metadata` / `tensors`: remove the key or tensor


def _field_value(field: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """(value, type, array element type) of a gguf-py ReaderField, as GGUFWriter.add_key_value takes them."""
    vtype = field.types[0]
    if vtype == GGUFValueType.ARRAY:
        return field.contents(), vtype, field.types[-1]
    return field.contents(), vtype, None


def rewrite_gguf(src: str | Path, dst: str | Path, metadata: Mapping[str, Any] | None = None,
                 tensors: Mapping[str, Any] | None = None, dequantize_all: bool = False) -> Path:
    """Copy `src` to `dst`. `metadata` maps keys to new values (typed like the old value, or as gguf-py infers
    for a new key) or to DROP; `tensors` maps names to new float32 arrays or DROP. With `dequantize_all`, every
    tensor is written as float32, dequantized by gguf-py (bit-exact with ggml)."""
    metadata, tensors = dict(metadata or {}), dict(tensors or {})
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch)
    writer.kv_data[0].clear()  # the constructor's own general.architecture: copied in file order below
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value, vtype, sub_type = _field_value(field)
        if key in metadata:
            new = metadata.pop(key)
            if new is not DROP and type(new) is not type(value):  # another kind of value: gguf-py's type for it
                vtype, sub_type = GGUFValueType.get_type(new), None
                if vtype == GGUFValueType.ARRAY and new:
                    sub_type = GGUFValueType.get_type(new[0])
            value = new
        if value is DROP:
            continue
        writer.add_key_value(key, value, vtype, sub_type)
    for key, value in metadata.items():
        if value is not DROP:
            writer.add_key_value(key, value, GGUFValueType.get_type(value))
    for t in reader.tensors:
        new = tensors.pop(t.name, None)
        if new is DROP:
            continue
        if new is not None:
            writer.add_tensor(t.name, np.ascontiguousarray(new, dtype=np.float32))
        elif dequantize_all and t.tensor_type != GGMLQuantizationType.F32:
            writer.add_tensor(t.name, dequantize(t.data, t.tensor_type).astype(np.float32))
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    for name, new in tensors.items():
        if new is not DROP:
            writer.add_tensor(name, np.ascontiguousarray(new, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dst)


def uniform_imatrix(model: str | Path, out: str | Path) -> Path:
    """An importance matrix in llama-imatrix's GGUF layout giving every input column of every matrix weight 1.

    llama-quantize refuses IQ2_S (and IQ1/IQ2_XXS/IQ2_XS/IQ3_XXS) without one. llama-imatrix cannot run this
    architecture (the fork's DiffusionGemma has no KV cache for the ordinary decode path), and a trained model's
    activation statistics would mean nothing for random weights anyway: equal importance makes the quantizer
    minimise the plain squared error, which is what it does for the other types.
    """
    reader = GGUFReader(model)
    writer = GGUFWriter(out, "imatrix")
    writer.kv_data[0].clear()
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", ["uniform (tools/peer_files.py)"])
    writer.add_uint32("imatrix.chunk_count", 1)
    writer.add_uint32("imatrix.chunk_size", 1)
    for t in reader.tensors:
        ne = [int(d) for d in t.shape]  # ggml order: ne[0] is the row
        if len(ne) < 2 or not t.name.endswith(".weight"):
            continue
        experts = ne[2] if len(ne) == 3 else 1
        writer.add_tensor(f"{t.name}.in_sum2", np.ones((experts, ne[0]), dtype=np.float32))
        writer.add_tensor(f"{t.name}.counts", np.ones((experts, 1), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ck = sub.add_parser("checkpoints", help="save the checkpoints of fixtures.PEER_CHECKPOINTS under OUT/<name>")
    ck.add_argument("out", type=Path)
    im = sub.add_parser("imatrix", help="write a uniform importance matrix for MODEL's weights")
    im.add_argument("model", type=Path)
    im.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "checkpoints":
        for name in fixtures.PEER_CHECKPOINTS:
            print(fixtures.save_peer_checkpoint(name, args.out / name))
    else:
        print(uniform_imatrix(args.model, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
