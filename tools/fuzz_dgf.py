"""Fuzz `dgrun.format.GGUFFile` with structured and byte-level mutants of small valid GGUF files.

    python tools/fuzz_dgf.py --seconds 60 --seed 1 --out /tmp/dgf-crashers
    python tools/fuzz_dgf.py --replay /tmp/dgf-crashers/*.gguf
    python tools/fuzz_dgf.py --bench        # header parse time, 262,144-token vocabulary, ours vs gguf-py

Seeds are valid files: some written by gguf-py's `GGUFWriter`, most generated at random by the small
serializer below (random metadata of every value type, random tensors of every ggml type, random alignment, and
often DiffusionGemma's own keys under dgrun's and the llama.cpp fork's names with plausible or broken values,
sometimes the vision tower's `clip.vision.*` / `dgrun.vision.*` keys and the tensors whose shapes it reads),
which records the offset of every integer field so mutations can hit counts, lengths, dims, types and offsets
on purpose instead of by luck; real model files given with `--seed-file` are mutated byte-wise too. Each mutant
is opened, every metadata value touched, and `raw()` (and `array()` where it applies) read for every tensor;
then what a model load reads from the header is built: the config, the generation defaults, the tokenizer, the
image token ids and the vision tower's config.
A failure is any exception other than `FormatError` (`ConfigError` from the config), an accepted file whose
tensor table breaks an invariant or disagrees with gguf-py's reader, a file taking over a second, or max-RSS
growth past a small bound. Failing inputs are printed as base64 and saved under `--out`.
"""

from __future__ import annotations

import argparse
import base64
import math
import os
import random
import re
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter

from dgrun.config import METADATA_KEYS, PEER_SAMPLER_KEYS, ROPE_FREQS_TENSOR, ConfigError, GenerationConfig, ModelConfig
from dgrun.format import FormatError, GGUFFile
from dgrun.tokenizer import Tokenizer
from dgrun.vision import PROJECTOR_TYPE, VISION_METADATA_KEYS, ImageTokens, VisionConfig

SLOW_S = 1.0  # a single file taking longer than this is a failure
HANG_S = 10.0  # a hard timer interrupts the reader after this (only possible on the main thread)
RSS_BOUND_KB = 128 * 1024  # max-RSS growth over the warmed-up baseline that counts as a failure

# GGUF value types (see dgrun.format).
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR_FMT = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
               BOOL: "<B", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_INT_RANGES = {UINT8: (0, 255), INT8: (-128, 127), UINT16: (0, 65535), INT16: (-32768, 32767),
               UINT32: (0, 2**32 - 1), INT32: (-2**31, 2**31 - 1), UINT64: (0, 2**64 - 1),
               INT64: (-2**63, 2**63 - 1), BOOL: (0, 1)}
_TYPES = sorted(GGML_QUANT_SIZES.items(), key=lambda kv: int(kv[0]))
_INTERESTING = [0, 1, 2, 3, 4, 5, 7, 8, 12, 31, 32, 33, 63, 64, 255, 256, 999, 2**16 - 1, 2**31 - 1, 2**31,
                2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
_ELEMENT_TYPES = [UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, UINT64, INT64, FLOAT64]


# -- a tiny GGUF serializer that remembers where its integer fields are -------------------------------------


@dataclass
class Tensor:
    """One tensor info plus its data, as the generator wants it written."""

    name: str | bytes
    ne: list[int]  # GGUF order: ne[0] is the row
    type_id: int
    offset: int  # relative to the data section
    data: bytes


@dataclass
class Spec:
    """A GGUF file as a list of parts; `serialize` turns it into bytes (valid unless mutated)."""

    kvs: list[tuple[str | bytes, int, Any]] = field(default_factory=list)  # (key, value type, value)
    tensors: list[Tensor] = field(default_factory=list)
    version: int = 3
    alignment: int = 32  # only used for padding; the metadata key is in kvs when not the default
    tensor_count: int | None = None  # override the real counts
    kv_count: int | None = None


class Writer:
    """Bytes plus a record of every integer field: (offset, width, label)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ints: list[tuple[int, int, str]] = []

    def int(self, fmt: str, v: int, label: str) -> None:
        width = struct.calcsize(fmt)
        if fmt[-1].isupper():  # unsigned: mutated values wrap around like they would in C
            v %= 1 << (8 * width)
        self.ints.append((len(self.buf), width, label))
        self.buf += struct.pack(fmt, v)

    def string(self, s: str | bytes, label: str) -> None:
        b = s.encode() if isinstance(s, str) else s
        self.int("<Q", len(b), f"{label}.len")
        self.buf += b

    def value(self, vtype: int, v: Any, label: str) -> None:
        if vtype == STRING:
            self.string(v, label)
        elif vtype == ARRAY:
            etype, items = v
            self.int("<I", etype, f"{label}.etype")
            self.int("<Q", len(items), f"{label}.count")
            for i, item in enumerate(items):
                self.value(etype, item, f"{label}[{i}]")
        elif vtype == FLOAT32 or vtype == FLOAT64:
            self.buf += struct.pack(_SCALAR_FMT[vtype], v)
        elif vtype in _SCALAR_FMT:
            self.int(_SCALAR_FMT[vtype], v, label)
        else:  # unknown type on purpose: write 4 arbitrary bytes
            self.buf += struct.pack("<I", v & 0xFFFFFFFF)


def serialize(spec: Spec) -> tuple[bytes, list[tuple[int, int, str]], int]:
    """(file bytes, integer fields, header size) for a spec."""
    w = Writer()
    w.buf += b"GGUF"
    w.int("<I", spec.version, "version")
    w.int("<Q", len(spec.tensors) if spec.tensor_count is None else spec.tensor_count, "tensor_count")
    w.int("<Q", len(spec.kvs) if spec.kv_count is None else spec.kv_count, "kv_count")
    for i, (key, vtype, value) in enumerate(spec.kvs):
        w.string(key, f"kv{i}.key")
        w.int("<I", vtype, f"kv{i}.type")
        w.value(vtype, value, f"kv{i}")
    for i, t in enumerate(spec.tensors):
        w.string(t.name, f"t{i}.name")
        w.int("<I", len(t.ne), f"t{i}.n_dims")
        for j, d in enumerate(t.ne):
            w.int("<Q", d, f"t{i}.ne{j}")
        w.int("<I", t.type_id, f"t{i}.type")
        w.int("<Q", t.offset, f"t{i}.offset")
    header_size = len(w.buf)
    w.buf += bytes(-len(w.buf) % spec.alignment)
    base = len(w.buf)
    for t in spec.tensors:
        end = base + t.offset
        if end + len(t.data) > len(w.buf) + (1 << 16):
            continue  # a mutated offset far past the end: write the header only, never gigabytes of padding
        if end > len(w.buf):
            w.buf += bytes(end - len(w.buf))
        w.buf[end:end + len(t.data)] = t.data
    return bytes(w.buf), w.ints, header_size


# -- valid seeds ---------------------------------------------------------------------------------------------


def _random_scalar(rng: random.Random, vtype: int) -> Any:
    if vtype in (FLOAT32, FLOAT64):
        return rng.choice([0.0, -1.5, 3.25, 1e30, float("inf"), float("nan"), rng.uniform(-10, 10)])
    if vtype == STRING:
        return rng.choice(["", "llama", "héllo ✓", "<0x0A>", "▁the", "a" * rng.randint(0, 40)])
    lo, hi = _INT_RANGES[vtype]
    return rng.choice([lo, hi, 0, 1, rng.randint(lo, hi)])


def _random_value(rng: random.Random, depth: int = 0) -> tuple[int, Any]:
    vtype = rng.choice([*_ELEMENT_TYPES, ARRAY, ARRAY, ARRAY])
    if vtype != ARRAY:
        return vtype, _random_scalar(rng, vtype)
    if depth < 2 and rng.random() < 0.25:
        inner = [_random_value_of(rng, ARRAY, depth + 1) for _ in range(rng.randint(0, 3))]
        return ARRAY, (ARRAY, inner)
    etype = rng.choice(_ELEMENT_TYPES)
    return ARRAY, (etype, [_random_scalar(rng, etype) for _ in range(rng.randint(0, 12))])


def _random_value_of(rng: random.Random, vtype: int, depth: int) -> Any:
    while True:
        t, v = _random_value(rng, depth)
        if t == vtype:
            return v


# DiffusionGemma's keys, dgrun's names and the fork's: (key, value type, plausible values).
_MODEL_SCALARS = [(key, {int: UINT32, float: FLOAT32, str: STRING}[e.kind],
                   {int: [0, 1, 2, 4, 8, 16, 2**31], float: [0.25, 1e-6, 1e4, -1.0, float("nan")],
                    str: ["gelu_pytorch_tanh", "relu"]}[e.kind]) for e in METADATA_KEYS for key in e.keys]
_MODEL_SCALARS += [(key, UINT32 if kind is int else FLOAT32, [0, 1, 3] if kind is int else [0.1, 0.8, -1.0])
                   for key, kind in PEER_SAMPLER_KEYS.values()]
_MODEL_SCALARS += [("diffusion-gemma.attention.causal", BOOL, [0, 1]), ("tokenizer.ggml.model", STRING, ["gemma4"]),
                   ("diffusion-gemma.rope.dimension_count", UINT32, [2, 4, 8]),
                   ("diffusion-gemma.rope.dimension_count_swa", UINT32, [2, 4]),
                   ("tokenizer.ggml.bos_token_id", UINT32, [0, 2, 999]), ("tokenizer.ggml.add_bos_token", BOOL, [0, 1])]
# The vision tower's keys (llama.cpp's clip.vision.* and dgrun's) and the text model's image token ids.
_VISION_SCALARS = [(key, {int: UINT32, float: FLOAT32, str: STRING, bool: BOOL}[kind],
                    {int: [0, 1, 2, 4, 8, 70, 280, 2**31], float: [1e-6, 1 / 255, 100.0, -1.0, float("nan")],
                     str: ["gelu_pytorch_tanh", "relu"], bool: [0, 1]}[kind])
                   for key, kind in VISION_METADATA_KEYS.values() if kind is not list]
_VISION_SCALARS += [(key, UINT32, [0, 1, 4, 2**31]) for key in ("diffusion-gemma.image_token_id",
                                                                 "diffusion-gemma.boi_token_id",
                                                                 "diffusion-gemma.eoi_token_id")]
_VISION_SCALARS += [("clip.vision.projector_type", STRING, [PROJECTOR_TYPE, "gemma3", ""]),
                    ("diffusion-gemma.use_bidirectional_attention", STRING, ["vision", ""])]
_VISION_TENSORS = ["v.blk.0.attn_q.weight", "v.blk.0.attn_k.weight", "v.position_embd.weight"]
_GEMMA4_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "a", "b", "ab", "▁", "\n", "<0x41>"]


def _model_keys(rng: random.Random) -> list[tuple[str, int, Any]]:
    """Some of DiffusionGemma's keys with plausible (often inconsistent) values, and a small gemma4 vocabulary."""
    keep = rng.choice([0.7, 0.97, 1.0])  # often all of them, so the reading gets past "missing key"
    kvs = [(key, vtype, rng.choice(values)) for key, vtype, values in _MODEL_SCALARS if rng.random() < keep]
    layers = rng.randint(1, 3)
    if rng.random() < 0.8:
        kvs.append(("diffusion-gemma.attention.sliding_window_pattern", ARRAY,
                    (BOOL, [rng.randint(0, 1) for _ in range(layers)])))
        kvs.append(("diffusion-gemma.attention.head_count_kv", ARRAY,
                    (INT32, [rng.randint(0, 2) for _ in range(layers)])))
    if rng.random() < 0.3:
        kvs += [(key, vtype, rng.choice(values)) for key, vtype, values in _VISION_SCALARS if rng.random() < keep]
        for key, _ in (VISION_METADATA_KEYS["image_mean"], VISION_METADATA_KEYS["image_std"]):
            values = [rng.choice([0.5, 0.0, float("inf")]) for _ in range(rng.choice([3, 3, 1]))]
            kvs.append((key, ARRAY, (FLOAT32, values)))
    if rng.random() < 0.5:
        tokens = _GEMMA4_TOKENS[: rng.randint(1, len(_GEMMA4_TOKENS))]
        kvs.append(("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)))
        kvs.append(("tokenizer.ggml.token_type", ARRAY, (INT32, [rng.randint(0, 6) for _ in tokens])))
        kvs.append(("tokenizer.ggml.merges", ARRAY, (STRING, rng.choice([["a b"], ["a b", "x y"], [], ["ab"]]))))
    return kvs


def random_spec(rng: random.Random) -> Spec:
    """A valid file: random metadata (often DiffusionGemma's keys) and 0-5 tensors of random ggml types laid out at
    aligned offsets (sometimes named as the model's embedding and `rope_freqs`)."""
    spec = Spec(version=rng.choice([3, 3, 3, 2]))
    spec.kvs.append(("general.architecture", STRING, "diffusion-gemma"))
    alignment = rng.choice([32, 32, 1, 8, 64, 256])
    if alignment != 32 or rng.random() < 0.3:
        spec.kvs.append(("general.alignment", UINT32, alignment))
    spec.alignment = alignment
    for i in range(rng.randint(0, 6)):
        vtype, value = _random_value(rng)
        spec.kvs.append((f"k.{i}", vtype, value))
    if rng.random() < 0.5:
        spec.kvs += _model_keys(rng)
    rng.shuffle(spec.kvs)
    offset = 0
    names = rng.choice([["token_embd.weight", ROPE_FREQS_TENSOR], _VISION_TENSORS, []])
    for i in range(rng.randint(0, 5)):
        gtype, (block, type_size) = rng.choice(_TYPES)
        n_dims = rng.randint(0 if block == 1 else 1, 4)
        ne = [block * rng.randint(1, 3) if j == 0 else rng.randint(1, 3) for j in range(n_dims)]
        nbytes = math.prod(ne) // block * type_size if ne else type_size
        offset += rng.choice([0, 0, 0, alignment])  # sometimes a gap
        data = rng.randbytes(nbytes)
        spec.tensors.append(Tensor(names[i] if i < len(names) else f"blk.{i}.w", ne, int(gtype), offset, data))
        offset += nbytes + (-nbytes % alignment)
    return spec


def writer_seeds() -> list[bytes]:
    """Valid files written by gguf-py itself (so the fuzzer also starts from what real tools produce)."""
    seeds = []
    for variant in range(3):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "seed.gguf"
            w = GGUFWriter(path, "diffusion-gemma")
            if variant == 1:
                w.add_custom_alignment(64)
            w.add_uint32("dg.block_count", 2)
            w.add_float32("dg.eps", 1e-6)
            w.add_bool("dg.flag", True)
            w.add_string("dg.name", "tiny ✓")
            w.add_array("tokenizer.ggml.tokens", ["<pad>", "<s>", "▁a", "b"] * (1 + variant))
            w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.5, 3.0])
            w.add_array("dg.nested", [[1, 2], [3]])
            w.add_tensor("a.weight", np.arange(32, dtype=np.float32).reshape(2, 16))
            w.add_tensor("b.weight", np.ones((3, 4), dtype=np.float16))
            if variant != 2:
                q = np.random.default_rng(variant).integers(0, 256, (2, 34), dtype=np.uint8)
                w.add_tensor("c.weight", q, raw_dtype=GGMLQuantizationType.Q8_0)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            seeds.append(path.read_bytes())
    return seeds


# -- mutations -----------------------------------------------------------------------------------------------


def _bad_utf8(rng: random.Random) -> bytes:
    return rng.choice([b"\xff", b"\xc3", b"a\x80b", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"ok\xc0\xaf"])


def mutate_spec(rng: random.Random, spec: Spec) -> None:
    """One structural mutation, applied before serialization."""
    choice = rng.randrange(16)
    ts = spec.tensors
    if choice == 0 and len(ts) >= 2:  # swap tensor infos (order only; offsets follow their tensors)
        i, j = rng.sample(range(len(ts)), 2)
        ts[i], ts[j] = ts[j], ts[i]
    elif choice == 1 and len(ts) >= 2:  # swap offsets: overlaps, data past EOF
        i, j = rng.sample(range(len(ts)), 2)
        ts[i].offset, ts[j].offset = ts[j].offset, ts[i].offset
    elif choice == 2 and ts:  # duplicate a tensor (same name)
        t = rng.choice(ts)
        ts.append(Tensor(t.name, list(t.ne), t.type_id, t.offset + rng.choice([0, spec.alignment]), t.data))
    elif choice == 3 and spec.kvs:  # duplicate a key
        spec.kvs.append(rng.choice(spec.kvs))
    elif choice == 4 and ts:  # random dims
        t = rng.choice(ts)
        t.ne = [rng.choice(_INTERESTING) for _ in range(rng.choice([0, 1, 2, 4, 5, 8]))]
    elif choice == 5 and ts:  # random type id
        rng.choice(ts).type_id = rng.choice([rng.randrange(64), 4, 5, 31, 36, 999, 2**32 - 1])
    elif choice == 6 and ts:  # random offset
        rng.choice(ts).offset = rng.choice([*_INTERESTING, rng.randrange(4096)])
    elif choice == 7:  # alignment of another value or type
        spec.kvs = [kv for kv in spec.kvs if kv[0] != "general.alignment"]
        vtype = rng.choice([UINT32, UINT32, UINT64, INT32, STRING])
        value = "32" if vtype == STRING else rng.choice([0, 1, 3, 16, 48, 2**31, 2**31 + 1, 4096])
        if vtype == INT32:
            value %= 2**31
        spec.kvs.insert(rng.randrange(len(spec.kvs) + 1), ("general.alignment", vtype, value))
    elif choice == 8:  # invalid UTF-8 somewhere
        targets = [("kv", i) for i in range(len(spec.kvs))] + [("t", i) for i in range(len(ts))]
        if targets:
            kind, i = rng.choice(targets)
            if kind == "t":
                ts[i].name = ts[i].name.encode() if isinstance(ts[i].name, str) else ts[i].name
                ts[i].name += _bad_utf8(rng)
            else:
                key, vtype, value = spec.kvs[i]
                if vtype == STRING and rng.random() < 0.5:
                    raw_value = value.encode() if isinstance(value, str) else value
                    spec.kvs[i] = (key, vtype, raw_value + _bad_utf8(rng))
                elif vtype == ARRAY and value[0] == STRING and value[1]:
                    items = list(value[1])
                    last = items[-1]
                    items[-1] = (last.encode() if isinstance(last, str) else last) + _bad_utf8(rng)
                    spec.kvs[i] = (key, vtype, (STRING, items))
                else:
                    raw_key = key.encode() if isinstance(key, str) else key
                    spec.kvs[i] = (raw_key + _bad_utf8(rng), vtype, value)
    elif choice == 9:  # deep nesting
        depth = rng.choice([3, 8, 9, 10, 64])
        value: Any = (UINT8, [1, 2])
        for _ in range(depth - 1):
            value = (ARRAY, [value])
        spec.kvs.append(("deep", ARRAY, value))
    elif choice == 10:
        spec.version = rng.choice([0, 1, 2, 4, 99, 2**32 - 1, 3 << 24, 2 << 24])
    elif choice == 11:  # counts that lie
        if rng.random() < 0.5:
            spec.tensor_count = max(0, len(ts) + rng.choice([-1, 1, 2, 1000])) if rng.random() < 0.7 \
                else rng.choice(_INTERESTING)
        else:
            spec.kv_count = max(0, len(spec.kvs) + rng.choice([-1, 1, 2, 1000])) if rng.random() < 0.7 \
                else rng.choice(_INTERESTING)
    elif choice == 12:  # unknown value / element types, bools that are not 0/1
        vtype = rng.choice([13, 14, 255, 2**32 - 1])
        if rng.random() < 0.5:
            spec.kvs.append(("weird", vtype, rng.randrange(2**32)))
        elif rng.random() < 0.5:
            spec.kvs.append(("weird.array", ARRAY, (vtype, [])))
        else:
            spec.kvs.append(("bool", BOOL, 2) if rng.random() < 0.5 else ("bools", ARRAY, (BOOL, [0, 1, 7])))
    elif choice == 13:  # many strings
        n = rng.choice([1000, 5000])
        spec.kvs.append(("tokenizer.ggml.tokens", ARRAY, (STRING, [f"t{i}" for i in range(n)])))
    elif choice == 14 and ts:  # a tensor whose row is not a whole number of blocks
        t = rng.choice(ts)
        if t.ne:
            t.ne[0] += rng.choice([1, 3, 16])
    else:  # a zero-size / one-element tensor at a random place
        ts.append(Tensor(f"extra.{len(ts)}", [rng.choice([0, 1])], int(GGMLQuantizationType.F32),
                         rng.choice([0, spec.alignment, 2**20]), b"\0\0\0\0"))


def mutate_bytes(rng: random.Random, data: bytes, ints: list[tuple[int, int, str]] | None,
                 header_size: int) -> bytes:
    """One byte-level mutation; `ints` (where known) lets it overwrite whole integer fields."""
    b = bytearray(data)
    if not b:
        return bytes(b)
    hot = max(1, min(len(b), header_size + 64))  # most mutations land in the header
    choice = rng.randrange(8)
    if choice in (0, 1) and ints:  # overwrite a count, length, dim, type or offset with an interesting value
        off, width, _label = rng.choice(ints)
        old = int.from_bytes(b[off:off + width], "little")
        v = rng.choice([*_INTERESTING, old + 1, old - 1, old * 2, len(b), len(b) - off,
                        rng.getrandbits(8 * width)])
        b[off:off + width] = (v % (1 << (8 * width))).to_bytes(width, "little")
    elif choice == 2:  # flip bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(hot)
            b[i] ^= 1 << rng.randrange(8)
    elif choice == 3:  # overwrite 1-8 random bytes
        i = rng.randrange(hot)
        n = rng.choice([1, 2, 4, 8])
        b[i:i + n] = rng.randbytes(n)
    elif choice == 4:  # truncate
        cut = rng.randrange(len(b)) if rng.random() < 0.3 else rng.randrange(hot)
        del b[cut:]
    elif choice == 5:  # insert or delete bytes in the header
        i = rng.randrange(hot)
        if rng.random() < 0.5:
            b[i:i] = rng.randbytes(rng.choice([1, 4, 8, 13]))
        else:
            del b[i:i + rng.choice([1, 4, 8])]
    elif choice == 6:  # append junk
        b += rng.randbytes(rng.choice([1, 31, 4096]))
    else:  # set a 8-byte field-sized window to all ones (huge u64 / -1)
        i = rng.randrange(hot)
        b[i:i + 8] = b"\xff" * 8
    return bytes(b)


def make_mutant(rng: random.Random, writer_pool: list[bytes],
                file_pool: list[tuple[bytes, int]] | None = None) -> bytes:
    """A valid seed with 0-3 structural and 0-3 byte-level mutations (about one mutant in ten stays valid).

    `file_pool` holds real files with their header sizes (mutations mostly land in the header)."""
    if file_pool and rng.random() < 0.3:
        data, header_size = rng.choice(file_pool)
        for _ in range(rng.randint(1, 3)):
            data = mutate_bytes(rng, data, None, header_size)
        return data
    if writer_pool and rng.random() < 0.2:
        data = rng.choice(writer_pool)
        for _ in range(rng.randint(1, 3)):
            data = mutate_bytes(rng, data, None, 512)
        return data
    spec = random_spec(rng)
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        mutate_spec(rng, spec)
    data, ints, header_size = serialize(spec)
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        data = mutate_bytes(rng, data, ints, header_size)
    return data


# -- running one file ----------------------------------------------------------------------------------------


@dataclass
class Failure:
    """One failing input."""

    kind: str  # "exception", "invariant", "oracle", "slow", "rss"
    message: str
    data: bytes
    saved_to: str | None = None

    def __str__(self) -> str:
        where = f" (saved to {self.saved_to})" if self.saved_to else ""
        part = " (first 1 KiB)" if len(self.data) > 1024 else ""
        return (f"[{self.kind}] {self.message}{where}\n"
                f"  base64{part}: {base64.b64encode(self.data[:1024]).decode()}")


@dataclass
class FuzzReport:
    """What a fuzzing run did."""

    iterations: int = 0
    accepted: int = 0
    rejected: int = 0
    seconds: float = 0.0
    slowest_s: float = 0.0
    rss_growth_kb: int = 0
    failures: list[Failure] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)  # FormatError messages, numbers and names blanked

    @property
    def files_per_s(self) -> float:
        return self.iterations / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        return (f"{self.iterations} files in {self.seconds:.1f} s ({self.files_per_s:.0f} files/s): "
                f"{self.accepted} accepted, {self.rejected} refused with FormatError, "
                f"{len(self.failures)} failures; slowest {self.slowest_s * 1e3:.1f} ms, "
                f"max-RSS growth {self.rss_growth_kb} KiB")


def _touch(value: Any) -> int:
    """Read every metadata value (so lazily broken values would surface)."""
    if isinstance(value, np.ndarray):
        return int(value.size) + (int(value.view(np.uint8).sum()) if value.size else 0)
    if isinstance(value, list):
        return sum(_touch(v) for v in value)
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (bool, int, float)):
        return 1
    raise TypeError(f"unexpected metadata value type {type(value).__name__}")


def _read_all(f: GGUFFile) -> None:
    """What a loader does: touch every metadata value and the bytes of every tensor."""
    for value in f.metadata.values():
        _touch(value)
    for name, t in f.tensors.items():
        raw = f.raw(name)
        if t.nbytes:
            int(raw[0]) + int(raw[-1]) + int(raw[: 1 << 16].sum())


def _load_model_header(f: GGUFFile) -> None:
    """What loading a DiffusionGemma reads before its weights: config, generation defaults and tokenizer."""
    if f.get("general.architecture") == "diffusion-gemma":
        cfg = ModelConfig.from_file(f)
        GenerationConfig.from_metadata(f.metadata)
        Tokenizer.from_file(f)
        ImageTokens.from_metadata(f.metadata, cfg.vocab_size)
    if "clip.vision.projector_type" in f.metadata:
        VisionConfig.from_metadata(f.metadata, f.tensors)


def _check_accepted(f: GGUFFile) -> None:
    """Invariants of an accepted file, checked independently of the reader's own checks."""
    assert f.alignment > 0 and f.alignment & (f.alignment - 1) == 0, f"alignment {f.alignment}"
    assert f.data_offset % f.alignment == 0, f"data offset {f.data_offset}"
    spans = []
    for name, t in f.tensors.items():
        assert t.name == name
        assert 0 <= len(t.shape) <= 4 and all(d >= 1 for d in t.shape), f"{name}: shape {t.shape}"
        block, type_size = GGML_QUANT_SIZES[t.ggml_type]
        row = t.shape[-1] if t.shape else 1
        assert row % block == 0, f"{name}: row {row} vs block {block}"
        assert t.nbytes == math.prod(t.shape) // block * type_size, f"{name}: nbytes {t.nbytes}"
        assert t.offset >= f.data_offset and (t.offset - f.data_offset) % f.alignment == 0, f"{name}: offset"
        assert t.offset + t.nbytes <= f.file_size, f"{name}: past EOF"
        raw = f.raw(name)
        assert raw.dtype == np.uint8 and raw.shape == (t.nbytes,) and not raw.flags.writeable, f"{name}: raw"
        try:
            arr = f.array(name)
        except FormatError:
            raise AssertionError(f"{name}: array() raised FormatError") from None
        except ValueError:
            assert t.ggml_type not in _DENSE, f"{name}: array() refused a dense type"
        else:
            assert arr.shape == t.shape and arr.nbytes == t.nbytes, f"{name}: array shape"
            assert not arr.flags.writeable, f"{name}: array() is writeable"
        spans.append((t.offset, t.offset + t.nbytes, name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        assert start >= end, f"{a} and {b} overlap"


_DENSE = {getattr(GGMLQuantizationType, n) for n in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")}
_NUMPY_NATIVE = _DENSE - {GGMLQuantizationType.BF16}
ORACLE_MAX_BYTES = 1 << 16  # gguf-py builds a numpy object per array element: keep the cross-check cheap


def _compare_with_gguf_py(f: GGUFFile, path: Path) -> None:
    """Anything we accept, gguf-py's reader must read the same way (it accepts strictly more)."""
    try:
        r = GGUFReader(path)
    except IndexError:
        # gguf-py cannot reshape a 0-D tensor of a non-numpy type (BF16, quantized): its bug, not ours.
        if any(t.shape == () and t.ggml_type not in _NUMPY_NATIVE for t in f.tensors.values()):
            return
        raise
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert keys == list(f.metadata), f"oracle: keys {keys} != {list(f.metadata)}"
    assert [t.name for t in r.tensors] == list(f.tensors), "oracle: tensor names"
    assert r.data_offset == f.data_offset, f"oracle: data offset {r.data_offset} != {f.data_offset}"
    for t in r.tensors:
        ours = f.tensors[t.name]
        assert (ours.offset, ours.nbytes, ours.ggml_type) == (t.data_offset, t.n_bytes, t.tensor_type), \
            f"oracle: tensor {t.name}"
        assert ours.shape == tuple(reversed([int(d) for d in t.shape])), f"oracle: shape of {t.name}"


class _Hang(Exception):
    pass


@contextmanager
def _hang_timer(seconds: float) -> Iterator[None]:
    """Interrupt a reader that runs away (only the main thread can take signals)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Hang(f"reader still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _max_rss_kb() -> int:
    try:
        import resource
    except ImportError:  # Windows
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # macOS reports bytes, Linux KiB


def check_file(path: Path, oracle: bool = True) -> tuple[str, str, float]:
    """Open, read and validate one file: (outcome, message, seconds spent in our reader).

    The outcome is "accepted", "rejected" (FormatError), "not-a-model" (a well-formed file whose model header
    raised FormatError or ConfigError) or a failure kind: "exception", "invariant", "oracle".
    """
    t0 = time.perf_counter()
    elapsed = 0.0
    try:
        with _hang_timer(HANG_S):
            try:
                f = GGUFFile(path)
            except FormatError as e:
                return "rejected", str(e), time.perf_counter() - t0
            with f:
                _read_all(f)
                elapsed = time.perf_counter() - t0
                try:
                    _check_accepted(f)
                except AssertionError as e:
                    return "invariant", str(e), elapsed
                if oracle and f.file_size <= ORACLE_MAX_BYTES:
                    try:
                        _compare_with_gguf_py(f, path)
                    except AssertionError as e:
                        return "oracle", str(e), elapsed
                    except Exception as e:
                        message = f"gguf-py failed on a file we accept: {type(e).__name__}: {e}"
                        return "oracle", message, elapsed
                model_start = time.perf_counter()
                try:
                    _load_model_header(f)
                except (FormatError, ConfigError) as e:  # a well-formed GGUF that is no loadable model
                    return "not-a-model", str(e), elapsed + time.perf_counter() - model_start
                elapsed += time.perf_counter() - model_start
        return "accepted", "", elapsed
    except Exception:  # exactly what the fuzzer hunts for: anything but FormatError escaping the reader
        return "exception", traceback.format_exc(limit=8), elapsed or time.perf_counter() - t0


def _reason(message: str) -> str:
    """A FormatError message with the file name, quoted names and numbers blanked (for coverage counts)."""
    message = message.split(": ", 1)[-1]
    message = re.sub(r"'[^']*'|b'[^']*'|\"[^\"]*\"", "'…'", message)
    message = re.sub(r" ?\[(header )?offset \d+\]", "", message)
    return re.sub(r"(?<![\w-])\d+(?![\w])", "N", message)


def fuzz(seconds: float = 60.0, seed: int = 0, out: str | Path | None = None, oracle: bool = True,
         max_iterations: int | None = None, log: Callable[[str], None] | None = None,
         seed_files: list[Path] | tuple[Path, ...] = ()) -> FuzzReport:
    """Run the fuzzer for `seconds` (or `max_iterations`); failing inputs go to `out` if given. `seed_files` are
    valid model files to mutate beside the generated seeds."""
    rng = random.Random(seed)
    report = FuzzReport()
    out_dir = Path(out) if out is not None else None
    pool = writer_seeds()
    file_pool = []
    for seed_file in seed_files:
        with GGUFFile(seed_file) as f:
            file_pool.append((Path(seed_file).read_bytes(), f.data_offset))
    ram_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # tmpfs: no disk writes per mutant
    with tempfile.TemporaryDirectory(prefix="dgf-fuzz-", dir=ram_dir) as d:
        tmp, path = Path(d) / "next.gguf", Path(d) / "mutant.gguf"
        # Warm up (imports, first maps) before taking the RSS baseline.
        for data in pool:
            tmp.write_bytes(data)
            os.replace(tmp, path)
            check_file(path, oracle)
        baseline = _max_rss_kb()
        start = time.perf_counter()
        while True:
            elapsed = time.perf_counter() - start
            if elapsed >= seconds or (max_iterations is not None and report.iterations >= max_iterations):
                break
            data = make_mutant(rng, pool, file_pool)
            # A fresh inode per mutant: rewriting a file in place under a live mapping could SIGBUS.
            tmp.write_bytes(data)
            os.replace(tmp, path)
            kind, message, dt = check_file(path, oracle)
            report.iterations += 1
            report.slowest_s = max(report.slowest_s, dt)
            failure: Failure | None = None
            if kind in ("accepted", "not-a-model"):
                report.accepted += 1
                if kind == "not-a-model":
                    report.reasons["model: " + _reason(message)] += 1
            elif kind == "rejected":
                report.rejected += 1
                report.reasons[_reason(message)] += 1
            else:
                failure = Failure(kind, message, data)
            if failure is None and dt > SLOW_S:
                failure = Failure("slow", f"took {dt:.2f} s ({kind})", data)
            rss = _max_rss_kb()
            if failure is None and rss - baseline > RSS_BOUND_KB:
                failure = Failure("rss", f"max RSS grew by {rss - baseline} KiB", data)
                baseline = rss  # report each jump once
            if failure is not None:
                if out_dir is not None:
                    out_dir.mkdir(parents=True, exist_ok=True)
                    target = out_dir / f"{failure.kind}-{seed}-{report.iterations}.gguf"
                    target.write_bytes(data)
                    failure.saved_to = str(target)
                report.failures.append(failure)
                if log is not None:
                    log(str(failure))
        report.seconds = time.perf_counter() - start
        report.rss_growth_kb = max(0, _max_rss_kb() - baseline)
    return report


# -- benchmark -----------------------------------------------------------------------------------------------


def vocab_file(path: Path, n: int = 262_144) -> None:
    """A file shaped like a real tokenizer header: n token strings, n float32 scores, n int32 token types."""
    rng = random.Random(0)
    tokens = [f"▁tok{i}" if i % 3 else f"<0x{i % 256:02X}>{'é' * rng.randrange(4)}" for i in range(n)]
    spec = Spec(kvs=[
        ("general.architecture", STRING, "diffusion-gemma"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
        ("tokenizer.ggml.scores", ARRAY, (FLOAT32, [float(-i) for i in range(n)])),
        ("tokenizer.ggml.token_type", ARRAY, (INT32, [1 + i % 3 for i in range(n)])),
    ], tensors=[Tensor("token_embd.weight", [64, 16], int(GGMLQuantizationType.F32), 0, bytes(64 * 16 * 4))])
    path.write_bytes(serialize(spec)[0])


def bench(repeats: int = 5, gguf_py: bool = True) -> dict[str, float]:
    """Best-of-`repeats` header parse time of the vocabulary file, ours and (once) gguf-py's."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "vocab.gguf"
        vocab_file(path)
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            with GGUFFile(path) as f:
                assert len(f.metadata["tokenizer.ggml.tokens"]) == 262_144
            best = min(best, time.perf_counter() - t0)
        result = {"dgrun.format": best, "file_mb": path.stat().st_size / 1e6}
        if gguf_py:
            t0 = time.perf_counter()
            GGUFReader(path)
            result["gguf.GGUFReader"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default 60)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for failing inputs (default: <tmp>/dgf-fuzz-crashers)")
    ap.add_argument("--no-oracle", action="store_true", help="skip the cross-check against gguf-py's reader")
    ap.add_argument("--replay", type=Path, nargs="+", help="check these files instead of fuzzing")
    ap.add_argument("--seed-file", type=Path, action="append", default=[],
                    help="a valid model file to mutate too (repeatable), e.g. tests/data/peer/gen-f32.gguf")
    ap.add_argument("-v", "--verbose", action="store_true", help="also print how often each refusal happened")
    ap.add_argument("--bench", action="store_true", help="time header parsing of a 262,144-token vocabulary")
    args = ap.parse_args(argv)

    if args.bench:
        r = bench()
        print(f"vocabulary file {r['file_mb']:.1f} MB, 262,144 tokens + scores + token types:")
        print(f"  dgrun.format.GGUFFile  {r['dgrun.format'] * 1e3:8.1f} ms (best of 5)")
        print(f"  gguf.GGUFReader        {r['gguf.GGUFReader'] * 1e3:8.1f} ms")
        return 0
    if args.replay:
        bad = 0
        for p in args.replay:
            kind, message, _ = check_file(p, not args.no_oracle)
            bad += kind not in ("accepted", "rejected", "not-a-model")
            print(f"{p}: {kind}: {message.strip()}")
        return 1 if bad else 0

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    out = args.out or Path(tempfile.gettempdir()) / "dgf-fuzz-crashers"
    print(f"fuzzing dgrun.format for {args.seconds:g} s, seed {seed}")
    report = fuzz(args.seconds, seed, out, oracle=not args.no_oracle, log=print, seed_files=args.seed_file)
    print(report.summary())
    if args.verbose:
        for reason, n in report.reasons.most_common():
            print(f"{n:8d}  {reason}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
