"""A strict, fast reader for GGUF containers (.dgf model files are GGUF v3).

Model files come from strangers, so this reader treats every byte as hostile:

* nothing is executed or unpickled; only fixed little-endian integers, floats and UTF-8 strings are decoded;
* every count and length is checked against the bytes left in the file *before* anything is allocated or
  looped over, so a 2**63-byte string or a 10**12-element array is refused at once;
* tensor data are never copied: `raw()` and `array()` return read-only views of one memory map;
* the checks follow ggml's own loader (gguf.cpp): known versions and types, at most 4 positive dimensions
  whose product fits in int64, rows that are whole blocks, aligned offsets, data inside the file; we also
  refuse overlapping tensors, duplicate keys or names, invalid UTF-8, BOOL bytes other than 0/1, and
  counts past fixed caps (`MAX_*` below) so a legal-looking header cannot make us build millions of objects;
* the only exception a bad file can raise is `FormatError`, whose message names the field and the byte
  offset, so a user can look at the file with a hex editor.

One thing no reader can guard against: another process truncating the file while it is mapped makes later
reads of the lost pages fault (SIGBUS). Model files are expected to be immutable while loaded.

Layout (GGUF v2/v3, little-endian)::

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count   x (string key, u32 value type, value)
    tensor_count x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset from data start)
    zero padding to `general.alignment` (default 32)
    tensor data

A string is a u64 byte length followed by UTF-8 bytes; an array is a u32 element type, a u64 count and the
elements. `ne[0]` is the contiguous (row) dimension, so numpy shapes are `ne` reversed.

Speed matters too: a tokenizer vocabulary is a 262,144-entry string array. Numeric arrays are read with one
`np.frombuffer`, strings in a tight `struct.unpack_from` loop over the map; the header of such a file parses
in well under a second (gguf-py's reader, which builds a numpy object per element, takes about ten).
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["FormatError", "TensorInfo", "GGUFFile", "DgfFile", "GGUF_MAGIC", "SUPPORTED_VERSIONS"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v2 introduced 64-bit counts; v3 only added big-endian files, which we refuse
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"

# ggml's limit; a 5-D tensor cannot exist in any ggml graph, so it can only be a corrupt or crafted file.
MAX_DIMS = 4
# GGUF arrays may nest (gguf-py writes arrays of arrays); real files never go deeper than 2. The bound keeps
# recursion shallow whatever the file says.
MAX_ARRAY_DEPTH = 8
# Hard caps well above any real model (the largest vocabularies are ~262k tokens, the largest tensor counts a
# few thousand). The file-size bounds below already stop absurd counts; these also stop a large but legal
# file from making us build hundreds of millions of Python objects.
MAX_TENSORS = 1 << 16  # real models: a few thousand (legacy per-expert MoE files: ~10**4)
MAX_KV = 1 << 16  # real models: at most a few hundred keys (big data lives in arrays)
MAX_METADATA_STRINGS = 1 << 21  # strings inside arrays, whole header (vocabulary + merges: under 10**6)
MAX_NESTED_ARRAYS = 1 << 16  # arrays inside arrays, whole header (ggml itself refuses nested arrays)
MAX_INT64 = (1 << 63) - 1

# Smallest possible encodings, used to bound counts by the bytes left before looping over them.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset
_MIN_HEADER_BYTES = 4 + 4 + 8 + 8

# GGUF metadata value types.
(_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64,
 _FLOAT64) = range(13)
_VALUE_TYPE_NAMES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING",
                     "ARRAY", "UINT64", "INT64", "FLOAT64")

# Scalars: struct formats. BOOL is read as a byte and checked to be 0 or 1.
_SCALAR_STRUCTS: dict[int, struct.Struct] = {
    t: struct.Struct(f) for t, f in (
        (_UINT8, "<B"), (_INT8, "<b"), (_UINT16, "<H"), (_INT16, "<h"), (_UINT32, "<I"), (_INT32, "<i"),
        (_FLOAT32, "<f"), (_BOOL, "<B"), (_UINT64, "<Q"), (_INT64, "<q"), (_FLOAT64, "<d"))
}
# Numeric arrays: explicit little-endian dtypes, so a big-endian host would still read the file correctly.
_ARRAY_DTYPES: dict[int, np.dtype[Any]] = {
    t: np.dtype(f) for t, f in (
        (_UINT8, "<u1"), (_INT8, "<i1"), (_UINT16, "<u2"), (_INT16, "<i2"), (_UINT32, "<u4"), (_INT32, "<i4"),
        (_FLOAT32, "<f4"), (_BOOL, "<u1"), (_UINT64, "<u8"), (_INT64, "<i8"), (_FLOAT64, "<f8"))
}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_DIMS_STRUCTS = [struct.Struct(f"<{n}Q") for n in range(MAX_DIMS + 1)]
_TENSOR_TAIL = struct.Struct("<IQ")  # ggml type, data offset
_AT_RECORD = "header offset"  # error label: offset of the tensor's info record in the header

# ggml type id -> (enum, elements per block, bytes per block). Removed ids (4, 5, 31-33, ...) are absent.
_GGML_TYPES: dict[int, tuple[GGMLQuantizationType, int, int]] = {
    int(t): (t, bs, ts) for t, (bs, ts) in GGML_QUANT_SIZES.items()
}

# Types `array()` can view directly. BF16 has no numpy dtype: its raw bits come back as uint16.
_TENSOR_DTYPES: dict[GGMLQuantizationType, np.dtype[Any]] = {
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.BF16: np.dtype("<u2"),
    GGMLQuantizationType.F64: np.dtype("<f8"),
    GGMLQuantizationType.I8: np.dtype("<i1"),
    GGMLQuantizationType.I16: np.dtype("<i2"),
    GGMLQuantizationType.I32: np.dtype("<i4"),
    GGMLQuantizationType.I64: np.dtype("<i8"),
}


class FormatError(ValueError):
    """A model file is missing, unreadable, or not a well-formed GGUF/.dgf file.

    The message names the offending field and its byte offset in the file.
    """


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file.

    `shape` is in numpy (row-major) order: GGUF's `ne` reversed, so `shape[-1]` is the contiguous row.
    `offset` is the absolute file offset of the first data byte; `nbytes` the exact data size.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        """Number of logical elements (not bytes, not blocks)."""
        return math.prod(self.shape)


def _type_name(vtype: int) -> str:
    return _VALUE_TYPE_NAMES[vtype] if 0 <= vtype < len(_VALUE_TYPE_NAMES) else f"unknown type {vtype}"


class _Index:
    """`parent[index]`, formatted only when an error message needs it (nested arrays can be many)."""

    __slots__ = ("parent", "index")

    def __init__(self, parent: object, index: int):
        self.parent = parent
        self.index = index

    def __str__(self) -> str:
        return f"{self.parent}[{self.index}]"


class _Entry:
    """`metadata entry #i key`, formatted lazily like `_Index`."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __str__(self) -> str:
        return f"metadata entry #{self.index} key"


class _HeaderParser:
    """A cursor over the mapped file. Every read checks its length first; nothing reads past `size`.

    `what` arguments name the field for error messages. They may be any object whose str() is the name, so
    hot paths pass cheap placeholders and pay for formatting only when something is wrong.
    """

    __slots__ = ("buf", "size", "pos", "strings_left", "arrays_left")

    def __init__(self, buf: mmap.mmap, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0
        self.strings_left = MAX_METADATA_STRINGS
        self.arrays_left = MAX_NESTED_ARRAYS

    def left(self) -> int:
        return self.size - self.pos

    def fail(self, msg: str, offset: int | None = None, label: str = "offset") -> NoReturn:
        # Tensor-table problems point at the start of the tensor's info record ("header offset"), everything
        # else at the field that could not be read.
        raise FormatError(f"{msg} [{label} {self.pos if offset is None else offset}]")

    def need(self, n: int, what: object, field: str = "") -> None:
        if n > self.size - self.pos:
            name = f"{what}: {field}" if field else f"{what}"
            left = self.size - self.pos
            self.fail(f"{name}: {n} bytes needed but only {left} left (file size {self.size})")

    def u32(self, what: object, field: str = "") -> int:
        self.need(4, what, field)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: object, field: str = "") -> int:
        self.need(8, what, field)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: object) -> str:
        start = self.pos
        n = self.u64(what, "string length")
        if n > self.size - self.pos:
            self.fail(f"{what}: string length {n} runs past end of file (size {self.size})", start)
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what}: string is not valid UTF-8 (bad byte at offset {start + 8 + e.start})", start)

    def value(self, vtype: int, what: object) -> Any:
        """One metadata value of type `vtype` (top level: arrays start at depth 1)."""
        st = _SCALAR_STRUCTS.get(vtype)
        if st is not None:
            self.need(st.size, what)
            (v,) = st.unpack_from(self.buf, self.pos)
            if vtype == _BOOL:
                if v > 1:
                    self.fail(f"{what}: BOOL byte is {v}, not 0 or 1")
                v = bool(v)
            self.pos += st.size
            return v
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what, 1)
        self.fail(f"{what}: unknown value type {vtype}", self.pos - 4)

    def array(self, what: object, depth: int) -> Any:
        start = self.pos
        if depth > MAX_ARRAY_DEPTH:
            self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
        etype = self.u32(what, "array element type")
        count = self.u64(what, "array length")
        left = self.size - self.pos
        dtype = _ARRAY_DTYPES.get(etype)
        if dtype is not None:
            nbytes = count * dtype.itemsize  # Python ints: no overflow, compared before any allocation
            if nbytes > left:
                self.fail(f"{what}: array of {count} {_type_name(etype)} ({nbytes} bytes) runs past end of "
                          f"file (size {self.size})", start)
            if count == 0:
                arr = np.empty(0, dtype)
            else:
                # Copied (a few MB at most) so that no metadata array pins the map after close().
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            if etype == _BOOL:
                if count and int(arr.max()) > 1:
                    bad = int(np.argmax(arr > 1))
                    self.fail(f"{what}: BOOL element {bad} is {int(arr[bad])}, not 0 or 1", self.pos + bad)
                arr = arr.view(np.bool_)
            self.pos += nbytes
            return arr
        if etype == _STRING:
            min_size = 8
        elif etype == _ARRAY:
            min_size = 12
        else:
            self.fail(f"{what}: array of unknown value type {etype}", start)
        if count > left // min_size:
            self.fail(f"{what}: array of {count} {_type_name(etype)} cannot fit in the {left} bytes left "
                      f"(file size {self.size})", start)
        # Budgets: the bytes are there, but a crafted header must not make us build tens of millions of
        # Python objects (each costs far more memory and time than the bytes that describe it).
        if etype == _STRING:
            self.strings_left -= count
            if self.strings_left < 0:
                self.fail(f"{what}: more than {MAX_METADATA_STRINGS} strings in metadata arrays", start)
            return self.strings(count, what)
        self.arrays_left -= count
        if self.arrays_left < 0:
            self.fail(f"{what}: more than {MAX_NESTED_ARRAYS} arrays nested in metadata arrays", start)
        return [self.array(_Index(what, i), depth + 1) for i in range(count)]

    def strings(self, count: int, what: object) -> list[str]:
        # The hot loop of the whole reader (tokenizer vocabularies): locals only, one unpack and one slice
        # per string. Lengths are checked before slicing so a bad length cannot make us read beyond the file.
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        i = 0
        try:
            for i in range(count):
                if size - pos < 8:
                    self.pos = pos
                    self.fail(f"{what}: string {i} length: 8 bytes needed but only {size - pos} left "
                              f"(file size {size})")
                (n,) = unpack(buf, pos)
                if n > size - pos - 8:
                    self.fail(f"{what}: string {i} length {n} runs past end of file (size {size})", pos)
                pos += 8
                append(buf[pos:pos + n].decode("utf-8"))
                pos += n
        except UnicodeDecodeError as e:
            self.fail(f"{what}: string {i} is not valid UTF-8 (bad byte at offset {pos + e.start})", pos - 8)
        self.pos = pos
        return out


class GGUFFile:
    """An open GGUF/.dgf file: parsed header plus zero-copy access to tensor data.

    ``GGUFFile(path)`` maps the file read-only and validates the whole header and tensor table; any problem
    raises `FormatError`. Use as a context manager or call `close()`. Arrays returned by `raw()`/`array()`
    stay valid after `close()` (they keep the mapping alive until they are garbage-collected).

    Attributes: `path`, `version`, `alignment`, `metadata` (key -> value, file order), `tensors`
    (name -> `TensorInfo`, file order), `data_offset` (absolute start of the data section), `file_size`.
    Metadata scalars are Python int/float/bool/str; numeric arrays are numpy arrays (BOOL arrays as
    `np.bool_`); string arrays are `list[str]`; arrays of arrays are lists.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        self._data: np.ndarray | None = None
        self._mm = self._open()
        try:
            self._parse()
        except BaseException:
            self.close()
            raise
        self._data = np.frombuffer(self._mm, dtype=np.uint8)

    def _open(self) -> mmap.mmap:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is then refused as not a regular file).
        flags = os.O_RDONLY
        for extra in ("O_NONBLOCK", "O_CLOEXEC", "O_BINARY"):  # whichever this platform has
            flags |= getattr(os, extra, 0)
        try:
            fd = os.open(self.path, flags)
        except OSError as e:
            raise FormatError(f"cannot open {self.path}: {e.strerror or e}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(f"cannot open {self.path}: not a regular file")
            if st.st_size < _MIN_HEADER_BYTES:
                raise FormatError(f"{self.path}: file is {st.st_size} bytes, too small for a GGUF header "
                                  f"({_MIN_HEADER_BYTES} bytes)")
            try:
                return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError, OverflowError) as e:
                raise FormatError(f"cannot map {self.path}: {e}") from None
        finally:
            os.close(fd)  # the map holds its own reference to the file

    def _parse(self) -> None:
        assert self._mm is not None
        try:
            self._parse_header(self._mm)
        except FormatError as e:
            raise FormatError(f"{self.path}: {e}") from None

    def _parse_header(self, buf: mmap.mmap) -> None:
        size = len(buf)
        self.file_size: int = size
        p = _HeaderParser(buf, size)

        magic = buf[0:4]
        if magic != GGUF_MAGIC:
            p.fail(f"bad magic {magic!r}, expected {GGUF_MAGIC!r}: not a GGUF/.dgf file", 0)
        p.pos = 4
        version = p.u32("version")
        if version not in SUPPORTED_VERSIONS:
            if version == 1:
                p.fail("GGUF version 1 is not supported (32-bit counts): re-convert the model", 4)
            if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
                p.fail(f"big-endian GGUF (version {version >> 24}) is not supported", 4)
            supported = ", ".join(map(str, SUPPORTED_VERSIONS))
            p.fail(f"unsupported GGUF version {version} (supported: {supported})", 4)
        self.version: int = version

        tensor_count = p.u64("tensor count")
        kv_count = p.u64("metadata count")
        if tensor_count > MAX_TENSORS:
            p.fail(f"tensor count {tensor_count} exceeds the limit of {MAX_TENSORS}", 8)
        if kv_count > MAX_KV:
            p.fail(f"metadata count {kv_count} exceeds the limit of {MAX_KV}", 16)
        if kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES > p.left():
            p.fail(f"{kv_count} metadata entries and {tensor_count} tensor infos cannot fit in the "
                   f"{p.left()} bytes left (file size {size})", 8)

        # -- metadata ------------------------------------------------------------------------------------
        metadata: dict[str, Any] = {}
        key_offsets: dict[str, int] = {}
        alignment = DEFAULT_ALIGNMENT
        for i in range(kv_count):
            at = p.pos
            key = p.string(_Entry(i))
            if key in metadata:
                p.fail(f"duplicate metadata key {key!r} (first at offset {key_offsets[key]})", at)
            where = f"metadata key {key!r}"
            vtype = p.u32(where, "value type")
            value = p.value(vtype, where)
            if key == ALIGNMENT_KEY:
                # ggml reads it with gguf_get_val_u32 (asserting the type); anything else is malformed.
                if vtype != _UINT32:
                    p.fail(f"metadata key {key!r}: type is {_type_name(vtype)}, must be UINT32", at)
                if value == 0 or value & (value - 1):
                    p.fail(f"metadata key {key!r}: alignment {value} is not a power of two", at)
                alignment = value
            metadata[key] = value
            key_offsets[key] = at
        self.metadata: dict[str, Any] = metadata
        self.alignment: int = alignment

        # -- tensor infos ---------------------------------------------------------------------------
        # Inlined reads (this loop runs once per tensor, up to MAX_TENSORS times): every length is checked
        # before the bytes are touched, and messages are only formatted on failure.
        unpack_u64 = _U64.unpack_from
        unpack_u32 = _U32.unpack_from
        unpack_tail = _TENSOR_TAIL.unpack_from
        records: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int, int, int]] = []
        seen: dict[str, int] = {}
        pos = p.pos
        for i in range(tensor_count):
            at = pos
            p.pos = pos
            if size - pos < 8:
                p.need(8, f"tensor #{i} name", "string length")
            (n,) = unpack_u64(buf, pos)
            pos += 8
            if n > size - pos:
                p.fail(f"tensor #{i} name: string length {n} runs past end of file (size {size})", at)
            try:
                name = buf[pos:pos + n].decode("utf-8")
            except UnicodeDecodeError as e:
                p.fail(f"tensor #{i} name: string is not valid UTF-8 (bad byte at offset {pos + e.start})",
                       at)
            pos += n
            if name in seen:
                p.fail(f"duplicate tensor {name!r} (first at header offset {seen[name]})", at, _AT_RECORD)
            seen[name] = at
            if size - pos < 4:
                p.pos = pos
                p.need(4, f"tensor {name!r}", "n_dims")
            (n_dims,) = unpack_u32(buf, pos)
            pos += 4
            if n_dims > MAX_DIMS:
                p.fail(f"tensor {name!r}: n_dims {n_dims} exceeds {MAX_DIMS}", at, _AT_RECORD)
            if size - pos < 8 * n_dims + 12:
                p.pos = pos
                p.need(8 * n_dims + 12, f"tensor {name!r}", "dimensions, type and offset")
            ne = _DIMS_STRUCTS[n_dims].unpack_from(buf, pos)
            pos += 8 * n_dims
            type_id, rel = unpack_tail(buf, pos)
            pos += 12

            # ggml stores ne as int64 and requires positive sizes whose product fits in int64.
            n_elements = 1
            for d in ne:
                if d < 1 or d > MAX_INT64:
                    p.fail(f"tensor {name!r}: dimensions {list(ne)} must all be in 1..2**63-1", at,
                           _AT_RECORD)
                n_elements *= d
            if n_elements > MAX_INT64:
                p.fail(f"tensor {name!r}: dimensions {list(ne)} overflow int64 ({n_elements} elements)", at,
                       _AT_RECORD)
            known = _GGML_TYPES.get(type_id)
            if known is None:
                p.fail(f"tensor {name!r}: unknown ggml type {type_id}", at, _AT_RECORD)
            ggml_type, block_size, type_size = known
            ne0 = ne[0] if ne else 1
            if ne0 % block_size:
                p.fail(f"tensor {name!r}: row width {ne0} is not a multiple of the {ggml_type.name} block "
                       f"size {block_size}", at, _AT_RECORD)
            if rel % alignment:
                p.fail(f"tensor {name!r}: data offset {rel} (from the data start) is not a multiple of the "
                       f"alignment {alignment}", at, _AT_RECORD)
            records.append((name, ne[::-1], ggml_type, rel, n_elements // block_size * type_size, at))
        p.pos = pos

        # -- data section -----------------------------------------------------------------------------
        data_offset = pos + (-pos % alignment)
        self.data_offset: int = data_offset
        tensors: dict[str, TensorInfo] = {}
        spans: list[tuple[int, int, str]] = []
        for name, shape, ggml_type, rel, nbytes, at in records:
            start = data_offset + rel
            if start + nbytes > size:
                p.fail(f"tensor {name!r}: data offset {start} + {nbytes} bytes runs past end of file "
                       f"(size {size})", at, _AT_RECORD)
            tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)
            spans.append((start, start + nbytes, name))

        # Overlap check in offset order: O(n log n), one comparison per neighbouring pair. Sizes are >= 1,
        # so equal starts always overlap.
        spans.sort()
        for (prev_start, prev_end, prev_name), (start, end, name) in zip(spans, spans[1:], strict=False):
            if start < prev_end:
                p.fail(f"tensor {name!r}: data [{start}, {end}) overlaps tensor {prev_name!r} "
                       f"[{prev_start}, {prev_end})", seen[name], _AT_RECORD)
        self.tensors: dict[str, TensorInfo] = tensors

    # -- access ---------------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value for `key`, or `default` if absent."""
        return self.metadata.get(key, default)

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"no tensor named {name!r} in {self.path}")
        return info

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only 1-D uint8 view of the memory map (no copy)."""
        info = self._info(name)
        if self._data is None:
            raise ValueError(f"{self.path} is closed")
        return self._data[info.offset:info.offset + info.nbytes]

    def array(self, name: str) -> np.ndarray:
        """A typed read-only view with the tensor's numpy shape (no copy).

        F32 -> float32, F16 -> float16, BF16 -> uint16 (raw bits), I8/I16/I32/I64 -> ints, F64 -> float64.
        Block-quantized types raise ValueError: use `raw()` and dequantize.
        """
        info = self._info(name)
        dtype = _TENSOR_DTYPES.get(info.ggml_type)
        if dtype is None:
            raise ValueError(f"tensor {name!r} is {info.ggml_type.name}, a block-quantized type: use raw()")
        return self.raw(name).view(dtype).reshape(info.shape)

    @property
    def closed(self) -> bool:
        """Whether `close()` has been called."""
        return self._mm is None

    def close(self) -> None:
        """Release the memory map (idempotent). Views already handed out keep it alive until freed."""
        self._data = None
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # Arrays from raw()/array() still reference the map; it is unmapped when the last one dies.
                pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.tensors)} tensors, {len(self.metadata)} keys"
        return f"GGUFFile({str(self.path)!r}, v{getattr(self, 'version', '?')}, {state})"


DgfFile = GGUFFile
