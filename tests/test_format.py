"""dgrun.format agrees with gguf-py on valid files, raises only FormatError on hostile ones, survives fuzzing.

Valid files are written with gguf-py's own GGUFWriter (every metadata value type, nested arrays, dense and
block-quantized tensors) and read back with both readers. Hostile files are a small valid file with one field
broken, built with the fuzzer's serializer (tools/fuzz_dgf.py), which knows where every field sits.
"""

from __future__ import annotations

import math
import os
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from gguf import GGUFValueType as V

import dgrun.format as fmt
from dgrun.format import DgfFile, FormatError, GGUFFile, TensorInfo

TOOLS = Path(__file__).resolve().parents[1] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import fuzz_dgf  # noqa: E402
from fuzz_dgf import ARRAY, BOOL, STRING, UINT8, UINT32, UINT64, Spec, Tensor, serialize  # noqa: E402

# -- a rich valid file written by gguf-py -------------------------------------------------------------------

SCALARS: list[tuple[str, V, Any]] = [
    ("t.u8", V.UINT8, 200), ("t.i8", V.INT8, -100), ("t.u16", V.UINT16, 60_000), ("t.i16", V.INT16, -30_000),
    ("t.u32", V.UINT32, 4_000_000_000), ("t.i32", V.INT32, -2_000_000_000), ("t.f32", V.FLOAT32, 0.15625),
    ("t.true", V.BOOL, True), ("t.false", V.BOOL, False), ("t.str", V.STRING, "héllo ✓ 世界"),
    ("t.empty", V.STRING, ""), ("t.u64", V.UINT64, 2**64 - 1), ("t.i64", V.INT64, -(2**63)),
    ("t.f64", V.FLOAT64, 1 / 3),
]
NUMERIC_ARRAYS: dict[V, tuple[str, list[Any]]] = {
    V.UINT8: ("<u1", [0, 1, 255]), V.INT8: ("<i1", [-128, 0, 127]), V.UINT16: ("<u2", [0, 65535]),
    V.INT16: ("<i2", [-32768, 7]), V.UINT32: ("<u4", [0, 2**32 - 1, 5]),
    V.INT32: ("<i4", [-(2**31), 2**31 - 1]), V.FLOAT32: ("<f4", [0.5, -2.25, 1e30]),
    V.UINT64: ("<u8", [2**64 - 1, 0]), V.INT64: ("<i8", [-(2**63), 9]), V.FLOAT64: ("<f8", [1 / 3, -1e300]),
}
STRINGS = ["<pad>", "<s>", "▁the", "héllo", "", "世界", "\n", "<0x0A>"]
NESTED = [[1, 2], [3, 4, 5]]
NESTED_STRINGS = [["a"], ["b", "c"]]


def _tensors() -> dict[str, tuple[np.ndarray, T | None]]:
    """name -> (array handed to the writer, raw_dtype)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    return {
        "f32.2d": (rng.standard_normal((3, 32)).astype(np.float32), None),
        "f16.3d": (rng.standard_normal((2, 3, 32)).astype(np.float16), None),
        "f32.4d": (rng.standard_normal((2, 1, 3, 8)).astype(np.float32), None),
        "bf16": (gguf.quants.quantize(x, T.BF16), T.BF16),  # uint8 bytes [4, 128] -> BF16 [4, 64]
        "q8_0": (gguf.quants.quantize(x, T.Q8_0), T.Q8_0),  # uint8 [4, 68] -> Q8_0 [4, 64]
        "q4_k": (rng.integers(0, 256, (2, 144), dtype=np.uint8), T.Q4_K),  # no gguf-py quantizer: raw blocks
        "i8": (np.arange(-8, 8, dtype=np.int8), None),
        "i16": (np.arange(12, dtype=np.int16).reshape(3, 4), None),
        "i32": (np.arange(6, dtype=np.int32), None),
        "i64": (np.array([-(2**62), 2**62], dtype=np.int64), None),
        "f64": (np.linspace(0, 1, 5), None),
        "spm.proto": (rng.integers(0, 256, 77, dtype=np.uint8).view(np.int8), None),  # odd size: padding
    }


def write_rich(path: Path, alignment: int | None = None) -> None:
    w = GGUFWriter(path, "diffusion-gemma")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, vtype, value in SCALARS:
        w.add_key_value(key, value, vtype)
    for vtype, (_, values) in NUMERIC_ARRAYS.items():
        w.add_key_value(f"a.{vtype.name.lower()}", values, V.ARRAY, sub_type=vtype)
    w.add_array("a.bool", [True, False, True])
    w.add_array("a.str", STRINGS)
    w.add_array("a.nested", NESTED)
    w.add_array("a.nested_str", NESTED_STRINGS)
    for name, (arr, raw_dtype) in _tensors().items():
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("format") / "rich.dgf"
    write_rich(path)
    return path


def _flatten(v: Any) -> list[Any]:
    if isinstance(v, list):
        return [x for item in v for x in _flatten(item)]
    if isinstance(v, np.ndarray):
        return v.tolist()
    return [v]


def test_metadata_matches_what_was_written_and_gguf_py(rich: Path) -> None:
    r = GGUFReader(rich)
    with GGUFFile(rich) as f:
        assert list(f.metadata) == [k for k in r.fields if not k.startswith("GGUF.")]
        assert f.metadata["general.architecture"] == "diffusion-gemma"
        for key, vtype, value in SCALARS:
            got = f.metadata[key]
            if vtype == V.FLOAT32:
                assert got == float(np.float32(value)) and type(got) is float
            else:
                assert got == value and type(got) is type(value), key
            assert got == r.fields[key].contents(), key
        for vtype, (dtype, values) in NUMERIC_ARRAYS.items():
            got = f.metadata[f"a.{vtype.name.lower()}"]
            assert isinstance(got, np.ndarray) and got.dtype == np.dtype(dtype), vtype
            np.testing.assert_array_equal(got, np.array(values, dtype=dtype))
            np.testing.assert_array_equal(got, r.fields[f"a.{vtype.name.lower()}"].contents())
        assert f.metadata["a.bool"].dtype == np.bool_ and f.metadata["a.bool"].tolist() == [True, False, True]
        assert f.metadata["a.str"] == STRINGS == r.fields["a.str"].contents()
        nested = f.metadata["a.nested"]
        assert [a.tolist() for a in nested] == NESTED and all(a.dtype == np.int32 for a in nested)
        assert _flatten(nested) == r.fields["a.nested"].contents()  # gguf-py flattens nested arrays
        assert f.metadata["a.nested_str"] == NESTED_STRINGS
        assert f.get("t.str") == "héllo ✓ 世界" and f.get("missing") is None and f.get("missing", 7) == 7


def test_tensor_infos_and_bytes_match_gguf_py(rich: Path) -> None:
    r = GGUFReader(rich)
    with GGUFFile(rich) as f:
        assert list(f.tensors) == [t.name for t in r.tensors] == list(_tensors())
        assert f.data_offset == r.data_offset and f.alignment == r.alignment == 32
        for t in r.tensors:
            info = f.tensors[t.name]
            assert info.name == t.name and info.ggml_type == t.tensor_type
            assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name
            assert (info.offset, info.nbytes, info.n_elements) == (t.data_offset, t.n_bytes, t.n_elements)
            assert f.raw(t.name).tobytes() == t.data.tobytes(), t.name
        assert f.tensors["q4_k"].shape == (2, 256) and f.tensors["q4_k"].nbytes == 2 * 144
        assert f.tensors["q8_0"].shape == (4, 64) and f.tensors["bf16"].ggml_type == T.BF16


def test_array_views_are_typed_read_only_and_zero_copy(rich: Path) -> None:
    written = _tensors()
    with GGUFFile(rich) as f:
        for name, (arr, raw_dtype) in written.items():
            if raw_dtype is None:
                got = f.array(name)
                assert got.dtype == arr.dtype and got.shape == arr.shape, name
                np.testing.assert_array_equal(got, arr)
            elif raw_dtype == T.BF16:
                got = f.array(name)
                assert got.dtype == np.uint16 and got.shape == (4, 64)
                assert got.tobytes() == arr.tobytes()
            else:
                with pytest.raises(ValueError, match="raw") as e:
                    f.array(name)
                assert not isinstance(e.value, FormatError)
            raw = f.raw(name)
            assert raw.dtype == np.uint8 and raw.ndim == 1 and raw.nbytes == f.tensors[name].nbytes
            assert not raw.flags.writeable and not raw.flags.owndata
            with pytest.raises(ValueError):
                raw[0] = 1
        assert np.shares_memory(f.array("f32.2d"), f.raw("f32.2d"))
        np.testing.assert_array_equal(
            gguf.quants.dequantize(f.raw("q8_0").reshape(4, 68), T.Q8_0),
            gguf.quants.dequantize(written["q8_0"][0], T.Q8_0))


def test_lifetime_and_api(rich: Path) -> None:
    assert DgfFile is GGUFFile
    f = GGUFFile(str(rich))
    assert f.version == 3 and f.file_size == rich.stat().st_size and not f.closed
    kept = f.array("f32.2d")
    expected = kept.copy()
    f.close()
    f.close()  # idempotent
    assert f.closed and "closed" in repr(f)
    np.testing.assert_array_equal(kept, expected)  # views keep the mapping alive after close()
    with pytest.raises(ValueError, match="closed"):
        f.raw("f32.2d")
    with GGUFFile(rich) as g:
        with pytest.raises(KeyError):
            g.raw("nope")
        info = g.tensors["f16.3d"]
        assert isinstance(info, TensorInfo) and info.n_elements == 2 * 3 * 32
        with pytest.raises(FrozenInstanceError):
            info.offset = 0  # type: ignore[misc]
    assert g.closed


def test_version_2_and_custom_alignment(tmp_path: Path) -> None:
    path = tmp_path / "a64.gguf"
    write_rich(path, alignment=64)
    with GGUFFile(path) as f:
        assert f.alignment == 64 and f.metadata["general.alignment"] == 64
        assert f.data_offset % 64 == 0
        assert all((t.offset - f.data_offset) % 64 == 0 for t in f.tensors.values())
        infos = dict(f.tensors)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 has the same layout as v3
    path.write_bytes(bytes(data))
    with GGUFFile(path) as f:
        assert f.version == 2 and f.tensors == infos


def test_large_vocabulary_header(tmp_path: Path) -> None:
    """The 262,144-token header parses correctly (timing printed for information, never asserted)."""
    path = tmp_path / "vocab.gguf"
    fuzz_dgf.vocab_file(path)
    t0 = time.perf_counter()
    with GGUFFile(path) as f:
        dt = time.perf_counter() - t0
        tokens = f.metadata["tokenizer.ggml.tokens"]
        assert len(tokens) == 262_144 and tokens[1] == "▁tok1" and tokens[0].startswith("<0x00>")
        assert f.metadata["tokenizer.ggml.scores"].dtype == np.float32
        assert f.metadata["tokenizer.ggml.scores"][-1] == -262_143.0
        assert f.metadata["tokenizer.ggml.token_type"].tolist()[:4] == [1, 2, 3, 1]
    print(f"\n262,144-token header ({path.stat().st_size / 1e6:.1f} MB) parsed in {dt * 1e3:.0f} ms "
          f"(compare with gguf-py: python tools/fuzz_dgf.py --bench)")


# -- hostile files ------------------------------------------------------------------------------------------


def base_spec() -> Spec:
    """A small valid file: 3 keys, an F32 [2, 32] tensor at 0 and a Q8_0 [32] tensor at 256."""
    return Spec(
        kvs=[("general.architecture", STRING, "diffusion-gemma"), ("dg.layers", UINT32, 2),
             ("tokenizer.ggml.tokens", ARRAY, (STRING, ["a", "b", "c"]))],
        tensors=[Tensor("a.weight", [32, 2], int(T.F32), 0, bytes(256)),
                 Tensor("b.weight", [32], int(T.Q8_0), 256, bytes(34))])


def test_base_spec_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "base.gguf"
    path.write_bytes(serialize(base_spec())[0])
    with GGUFFile(path) as f:
        assert f.tensors["a.weight"].shape == (2, 32) and f.tensors["b.weight"].nbytes == 34
        assert f.metadata["tokenizer.ggml.tokens"] == ["a", "b", "c"]
    r = GGUFReader(path)
    assert [t.name for t in r.tensors] == ["a.weight", "b.weight"]


def _edit(fn: Callable[[Spec], None]) -> Callable[[], bytes]:
    def build() -> bytes:
        spec = base_spec()
        fn(spec)
        return serialize(spec)[0]
    return build


def _patch(field: str, value: int) -> Callable[[], bytes]:
    """The base file with one integer field (as the serializer labels it) overwritten."""
    def build() -> bytes:
        data, ints, _ = serialize(base_spec())
        off, width, _ = next(f for f in ints if f[2] == field)
        b = bytearray(data)
        b[off:off + width] = value.to_bytes(width, "little")
        return bytes(b)
    return build


def _set(attr: str, i: int, value: Any) -> Callable[[Spec], None]:
    return lambda s: setattr(s.tensors[i], attr, value)


def _kv(key: Any, vtype: int, value: Any) -> Callable[[Spec], None]:
    return lambda s: s.kvs.append((key, vtype, value))


def _nested(depth: int) -> Any:
    value: Any = (UINT8, [1])
    for _ in range(depth - 1):
        value = (ARRAY, [value])
    return value


HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "bad magic": (lambda: b"GGML" + serialize(base_spec())[0][4:], "bad magic"),
    "version 1": (_patch("version", 1), "version 1"),
    "version 99": (_patch("version", 99), "version 99"),
    "big-endian": (_patch("version", 3 << 24), "big-endian"),
    "huge key length": (_patch("kv0.key.len", 2**63), "string length"),
    "huge string value": (_patch("kv0.len", 2**64 - 1), "string length"),
    "huge string array": (_patch("kv2.count", 10**12), "cannot fit"),
    "huge string in array": (_patch("kv2[1].len", 2**62), "string 1 length"),
    "huge tensor count": (_patch("tensor_count", 2**40), "tensor count"),
    "huge kv count": (_patch("kv_count", 2**63), "metadata count"),
    "kv count lies": (_patch("kv_count", 1000), "cannot fit"),
    "tensor count lies": (_patch("tensor_count", 3), "overlaps"),  # reads zeros: tensor '' F32 at 0
    "n_dims 5": (_edit(_set("ne", 0, [32, 1, 1, 1, 1])), "n_dims 5"),
    "n_dims huge": (_patch("t0.n_dims", 2**32 - 1), "n_dims"),
    "unknown ggml type 999": (_edit(_set("type_id", 0, 999)), "unknown ggml type 999"),
    "removed ggml type 4": (_edit(_set("type_id", 0, 4)), "unknown ggml type 4"),
    "zero dim": (_edit(_set("ne", 0, [32, 0])), "dimensions"),
    "dims overflow": (_edit(_set("ne", 0, [32, 2**62, 4])), "overflow"),
    "dim 2**64-1": (_edit(_set("ne", 0, [32, 2**64 - 1])), "dimensions"),
    "row not whole blocks": (_edit(_set("ne", 1, [33])), "block size 32"),
    "offset past EOF": (_edit(_set("offset", 1, 2**20)),
                        r"'b.weight': data offset \d+ \+ 34 bytes runs past end of file \(size \d+\) "
                        r"\[header offset \d+\]$"),
    "offset 2**64-32": (_edit(_set("offset", 1, 2**64 - 32)), "runs past end of file"),
    "data truncated": (lambda: serialize(base_spec())[0][:-1], "runs past end of file"),
    "misaligned offset": (_edit(_set("offset", 1, 264)), "not a multiple of the alignment 32"),
    "overlapping tensors": (_edit(_set("offset", 1, 224)), "overlaps"),
    "duplicate tensor name": (_edit(_set("name", 1, "a.weight")), "duplicate tensor 'a.weight'"),
    "duplicate key": (_edit(_kv("dg.layers", UINT32, 3)), "duplicate metadata key"),
    "invalid UTF-8 key": (_edit(_kv(b"bad\xff", UINT32, 1)), "UTF-8"),
    "invalid UTF-8 value": (_edit(_kv("k", STRING, b"\xc3")), "UTF-8"),
    "invalid UTF-8 in array": (_edit(_kv("k", ARRAY, (STRING, ["ok", b"\xed\xa0\x80"]))), "string 1 is not"),
    "invalid UTF-8 tensor name": (_edit(_set("name", 0, b"a\x80")), "UTF-8"),
    "alignment 48": (_edit(_kv("general.alignment", UINT32, 48)), "not a power of two"),
    "alignment 0": (_edit(_kv("general.alignment", UINT32, 0)), "not a power of two"),
    "alignment as u64": (_edit(_kv("general.alignment", UINT64, 32)), "must be UINT32"),
    "unknown value type": (_edit(_kv("k", 13, 0)), "unknown value type 13"),
    "unknown array element type": (_edit(_kv("k", ARRAY, (99, []))), "unknown value type 99"),
    "arrays nested too deep": (_edit(_kv("k", ARRAY, _nested(fmt.MAX_ARRAY_DEPTH + 1))), "nested deeper"),
    "bool byte 2": (_edit(_kv("k", BOOL, 2)), "BOOL"),
    "bool array element 7": (_edit(_kv("k", ARRAY, (BOOL, [0, 1, 7]))), "BOOL element 2"),
    "header only": (lambda: serialize(base_spec())[0][:24], "cannot fit"),
    "too small": (lambda: b"GGUF\x03\0\0\0", "too small"),
    "empty": (lambda: b"", "too small"),
}


def _huge_numeric_array() -> bytes:
    spec = base_spec()
    spec.kvs.append(("x", ARRAY, (UINT32, [1, 2])))
    data, ints, _ = serialize(spec)
    off, width, _ = next(f for f in ints if f[2] == "kv3.count")
    return data[:off] + (10**12).to_bytes(8, "little") + data[off + 8:]


HOSTILE["huge numeric array"] = (_huge_numeric_array, "10\\d+ UINT32")


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_raises_format_error(case: str, tmp_path: Path) -> None:
    build, match = HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(build())
    with pytest.raises(FormatError, match=match) as e:
        GGUFFile(path)
    assert str(path) in str(e.value)
    if case not in ("empty", "too small"):
        assert "offset" in str(e.value), str(e.value)


def test_metadata_object_budgets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More array strings / nested arrays than the budgets (2M / 64k; 10 here) are refused up front."""
    monkeypatch.setattr(fmt, "MAX_METADATA_STRINGS", 10)
    monkeypatch.setattr(fmt, "MAX_NESTED_ARRAYS", 10)
    path = tmp_path / "many.gguf"
    for value, match in [((STRING, ["x"] * 11), "more than 10 strings"),
                         ((ARRAY, [(UINT8, [1])] * 11), "more than 10 arrays")]:
        spec = base_spec()
        spec.kvs.append(("many", ARRAY, value))
        path.write_bytes(serialize(spec)[0])
        with pytest.raises(FormatError, match=match):
            GGUFFile(path)
        path.unlink()


def test_unopenable_paths(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="cannot open"):
        GGUFFile(tmp_path / "missing.dgf")
    with pytest.raises(FormatError, match="cannot open"):
        GGUFFile(tmp_path)
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with pytest.raises(FormatError, match="not a regular file"):
            GGUFFile(fifo)  # must not block waiting for a writer


def test_truncation_everywhere(rich: Path, tmp_path: Path) -> None:
    """Every cut in the header and a sample of cuts in the data raise FormatError; cuts in the final padding
    (after the last tensor's bytes) leave a valid file."""
    data = rich.read_bytes()
    with GGUFFile(rich) as f:
        end = max(t.offset + t.nbytes for t in f.tensors.values())
        header = f.data_offset
    cuts = list(range(header + 1)) + list(range(header + 1, end, max(1, (end - header) // 64))) + [end - 1]
    path = tmp_path / "cut.gguf"
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(FormatError):
            GGUFFile(path)
        path.unlink()  # a fresh inode each time: never rewrite a file another map might still see
    path.write_bytes(data[:end])
    with GGUFFile(path) as f:
        assert len(f.tensors) == len(_tensors())


def test_fuzz_smoke() -> None:
    """Five seconds of the fuzzer in-process: no exception but FormatError, no invariant broken."""
    report = fuzz_dgf.fuzz(seconds=5.0, seed=20240611)
    print("\n" + report.summary())
    assert report.ok, "\n".join(str(f) for f in report.failures[:5])
    assert report.iterations > 100 and report.accepted > 0 and report.rejected > 0


def test_n_elements_matches_math_prod() -> None:
    info = TensorInfo("x", (3, 4, 32), T.Q8_0, 0, 3 * 4 * 34)
    assert info.n_elements == math.prod((3, 4, 32))
