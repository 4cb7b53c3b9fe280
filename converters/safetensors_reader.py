"""A small streaming safetensors reader: header parsed and checked, tensors read in row chunks.

No torch and no pickle: safetensors is a JSON header plus raw little-endian bytes, so F32/F16/BF16 tensors
are read with plain file reads. Reading (not memory-mapping) keeps peak RSS at one chunk, which is what lets
a 50 GB checkpoint convert on a small machine.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# safetensors dtype → (how its bytes are read, bytes per value); BF16 is read as raw bits and widened by hand.
_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F32": (np.dtype("<f4"), 4), "F16": (np.dtype("<f2"), 2), "BF16": (np.dtype("<u2"), 2),
}
_MAX_HEADER = 100 << 20


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or not what its header claims."""


@dataclass(frozen=True)
class SafeTensor:
    """One tensor of a shard: where its bytes are and how to read them."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute file offset
    nbytes: int

    @property
    def row_width(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor flattened to [rows, row_width], as float32."""
        np_dtype, size = _DTYPES[self.dtype]
        count = (stop - start) * self.row_width
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.row_width * size)
            data = f.read(count * size)
        if len(data) != count * size:
            raise CheckpointError(f"{self.path.name}: tensor {self.name} is truncated")
        raw = np.frombuffer(data, dtype=np_dtype)
        if self.dtype == "BF16":
            values = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            values = raw.astype(np.float32)
        return values.reshape(stop - start, self.row_width)

    def chunks(self, max_elements: int = 1 << 20) -> Iterator[np.ndarray]:
        """The tensor in [rows, row_width] float32 chunks of at most ~max_elements values."""
        step = max(1, max_elements // max(self.row_width, 1))
        for start in range(0, self.n_rows, step):
            yield self.read_rows(start, min(start + step, self.n_rows))


def read_header(path: Path) -> dict[str, SafeTensor]:
    """Parse and validate one .safetensors file's header (every offset checked against the file size)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise CheckpointError(f"{path.name}: not a safetensors file (too short)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path.name}: header length {header_len} is impossible for a {size}-byte file")
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: safetensors header is not a JSON object")
    base = 8 + header_len
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: malformed header entry for {name}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name} has dtype {dtype}; only F32, F16 and BF16 are supported")
        expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][1]
        if end - begin != expected or begin < 0 or any(d < 0 for d in shape):
            raise CheckpointError(f"{path.name}: tensor {name} byte range does not match its shape {shape}")
        if base + end > size:
            raise CheckpointError(f"{path.name}: tensor {name} runs past the end of the file (truncated shard?)")
        out[name] = SafeTensor(name, path, dtype, shape, base + begin, expected)
    return out


def open_checkpoint(model_dir: Path) -> dict[str, SafeTensor]:
    """All tensors of a checkpoint folder: one `model.safetensors`, or shards listed by the index."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index.name} is not a valid safetensors index") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise CheckpointError(f"{index.name} names shard {missing[0]}, which is missing")
    else:
        shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
        weight_map = None
    if not shards:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise CheckpointError(f"refusing pickle checkpoint {pickles[0]}: loading it can run arbitrary code; "
                                  "convert it to safetensors first")
        raise CheckpointError(f"no .safetensors weights in {model_dir}")
    tensors: dict[str, SafeTensor] = {}
    for shard in shards:
        for name, tensor in read_header(model_dir / shard).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name} appears in two shards")
            tensors[name] = tensor
    if weight_map is not None:
        absent = [n for n, s in weight_map.items() if n not in tensors]
        if absent:
            raise CheckpointError(f"the index lists {absent[0]} in {weight_map[absent[0]]}, which does not contain it")
    return tensors
