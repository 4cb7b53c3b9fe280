"""The cpu backend's integer arithmetic for quantized weights (native/cpu/dg_int8.c) against a numpy model of the
same arithmetic, for every int8 kernel set this CPU runs (avx512bf16 / avx512vnni / avxvnni / avx2 / generic), and
BF16 weights' bfloat16 dot products (avx512bf16, and generic, which defines them) against a numpy model of those.

What is exact and what is not:
- Activation quantization (per 32 values: d = amax / 127, q = rint(x / d), ties to even): bit-exact.
- The weights' codes, scales and offsets (value = s * u - o, per 16 values): the codes are integers and must
  be exact, and s * u - o is gguf-py's dequantized value bit for bit: s * u and o are exact products of a
  float16 scale and small integers (< 24 significant bits), so the subtraction's one rounding is the one the
  decoder makes (Q4_K / Q5_K: d sc q - dmin m; Q5_1: d q + m with o = -m), or none where the value s (u - bias)
  is itself exact (every type with o = bias * s). Except NVFP4, whose tensor scale is folded into s (one more
  rounding, where gguf-py multiplies (d * value) * ts): within 1 ulp of the larger of |o| and |value| there.
- linear: the integer sums are exact in both; what differs is float32 accumulation of one product per block
  half, or per block for Q6_K on avx2 (FMA in the kernel, float64 in the model), so the outputs agree to 1e-6
  relative. (Q8_0, IQ4_NL and IQ4_XS on avx2 / dotprod sum (u - 128) q in integers: the model's
  s (d I) - 128 s (d S) is the same number, which the kernel rounds once where VNNI's rounds twice.)
- ffn: the hidden activations come from the kernels' vector tanh (dg_vmath.h, within 2 ulp) and numpy's tanh,
  which can move one of their int8 codes by one step now and then: 1e-4 relative.
- BF16 linear: the activations' bf16 rounding is exact (integer bit arithmetic in both), the products of two bf16
  values are exact in float32, and the model adds them in float32 in VDPBF16PS's order (per pair of k: the odd
  product, then the even one), so generic, which defines that arithmetic, equals the model bit for bit. The
  avx512bf16 set, whose instruction is the hardware's, is held to 1e-6 (Intel documents that order; whether
  every CPU rounds each step is unchecked: no machine here has AVX512-BF16; its code runs here through SIMDe in
  test_the_x86_sets_this_cpu_lacks_through_simde, with SIMDe's own order).
Against the float32 path (int8 off), the int8 path's error is the activations' rounding, ~0.5% per matmul
on random data (single outputs up to a few %: checked as < 3% here); tools/quant_quality.py publishes what it
does to whole-model logits.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close
from fixtures import quantized_or_random

import dgrun
from dgrun import quants
from dgrun.backends.numpy_backend import NumpyBackend, gelu_tanh

cpu_backend = pytest.importorskip("dgrun.backends.cpu_backend")
try:
    cpu_backend.load_library()
except RuntimeError as e:
    pytest.skip(f"cpu backend unavailable: {e}", allow_module_level=True)

CpuBackend, CpuWeight = cpu_backend.CpuBackend, cpu_backend.CpuWeight
REPO = Path(__file__).resolve().parents[1]
REF = NumpyBackend()
INT8_TYPES = [quants.Q4_0, quants.Q5_0, quants.Q5_1, quants.Q8_0, quants.Q4_K, quants.Q5_K, quants.Q6_K, quants.MXFP4,
              quants.NVFP4, quants.IQ4_NL, quants.IQ4_XS, quants.IQ3_S, quants.IQ2_S]


def _int8_sets() -> list[str]:
    out = []
    for name in ("avx512bf16", "avx512vnni", "avxvnni", "avx2", "generic"):
        try:
            CpuBackend(int8=name)
            out.append(name)
        except RuntimeError:
            pass
    return out


INT8_SETS = _int8_sets()
BF16_SETS = [name for name in INT8_SETS if name in ("avx512bf16", "generic")]  # dg_int8.c's BF16_SET


@pytest.fixture(params=INT8_SETS)
def cpu(request):
    return CpuBackend(threads=2, int8=request.param)


def _weight(x: np.ndarray, qt) -> CpuWeight:
    """`x` quantized to `qt`, or random valid blocks of its shape for the types dgrun only reads (the IQ types)."""
    raw, scale = quantized_or_random(np.asarray(x), qt.ggml_type)
    return CpuWeight(raw, qt.ggml_type, x.shape, scale)


def q8_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' activation quantization: (int8 codes, float32 scale per 32 values)."""
    blocks = np.asarray(x, np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.rint(blocks * inv[:, None]), -127, 127).astype(np.int8)
    return q.reshape(np.shape(x)), d.reshape(*np.shape(x)[:-1], -1)


def codes(cpu, w: CpuWeight, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = w.shape[-1]
    u, s, o = np.empty(k, np.uint8), np.empty(k // 16, np.float32), np.empty(k // 16, np.float32)
    assert cpu.lib.dg_int8_codes(w.ggml_type, cpu._w(w, row * w.row_bytes), k, w.scale, cpu._p(u, "uint8_t *"),
                                 cpu._p(s), cpu._p(o)) == 0
    return u, s, o


def linear_model(cpu, a: np.ndarray, w: CpuWeight) -> np.ndarray:
    """c[i, j] = sum over 16-value halves h of s_h * (d * I_h) - o_h * (d * S_h), in float64 from exact ints."""
    q, d = q8_quantize(a)
    m, k = a.shape
    qh = q.reshape(m, k // 16, 16).astype(np.int64)
    dh = np.repeat(d, 2, axis=1).astype(np.float64)  # each 32-value scale covers two halves
    out = np.empty((m, w.shape[0]))
    for j in range(w.shape[0]):
        u, s, o = codes(cpu, w, j)
        integer = (qh * u.reshape(k // 16, 16).astype(np.int64)).sum(axis=2)  # exact
        sums = qh.sum(axis=2)
        out[:, j] = (s * (dh * integer) - o * (dh * sums)).sum(axis=1)
    return out


def test_activation_quantization_is_bit_exact(cpu):
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 1, (50, 32)) * rng.uniform(1e-3, 1e3, (50, 1))).astype(np.float32)
    x[0] = 0  # a zero block: scale 0, codes 0
    x[1, 5] = -x[1].__abs__().max() * 2  # the block's largest magnitude is negative: code -127
    x[2] = np.arange(32) - 15.5  # exact halves: ties round to even
    q, d = np.empty(x.shape, np.int8), np.empty(50, np.float32)
    assert cpu.lib.dg_q8_quantize(cpu._p(x), x.size, cpu._p(q, "int8_t *"), cpu._p(d)) == 0
    ref_q, ref_d = q8_quantize(x)
    np.testing.assert_array_equal(d, ref_d.reshape(-1))
    np.testing.assert_array_equal(q, ref_q)


@pytest.mark.parametrize("qt", INT8_TYPES, ids=lambda t: t.ggml_type.name)
def test_weight_codes_reproduce_the_decoded_values(cpu, qt):
    rng = np.random.default_rng(int(qt.ggml_type))
    w = _weight(rng.normal(0, 1, (5, 512)) * rng.uniform(0.01, 10, (5, 1)), qt)
    dense = w.dense()
    for row in range(5):
        u, s, o = codes(cpu, w, row)
        s16, o16 = np.repeat(s, 16), np.repeat(o, 16)
        value = s16 * u.astype(np.float32) - o16
        if qt is quants.NVFP4:  # s = d * ts rounds (see the top of the file)
            ulp = np.spacing(np.maximum(np.abs(o16), np.abs(dense[row])))
            assert np.all(np.abs(value - dense[row]) <= ulp), qt.ggml_type.name
        else:
            np.testing.assert_array_equal(value, dense[row], err_msg=qt.ggml_type.name)


@pytest.mark.parametrize("qt", INT8_TYPES, ids=lambda t: t.ggml_type.name)
@pytest.mark.parametrize("m,n", [(1, 7), (37, 7), (37, 53)])
def test_linear_matches_the_integer_model(cpu, qt, m, n):
    rng = np.random.default_rng(m)
    # 7 rows: one partial panel; 53: two whole blocks of 24 rows (dg_int8.c's WB8) and one with a partial panel
    w = _weight(rng.normal(0, 0.1, (n, 512)), qt)
    a = rng.normal(0, 1, (m, 512)).astype(np.float32)
    out = cpu.linear(a, w)
    assert_close(out, linear_model(cpu, a, w), 1e-6, f"int8 linear {qt.ggml_type.name} ({cpu.int8_isa})")
    assert_close(out, REF.linear(a, w), 3e-2, "int8 vs float32")


@pytest.mark.parametrize("qt", INT8_TYPES, ids=lambda t: t.ggml_type.name)
def test_a_row_is_the_same_bits_alone_and_among_others(cpu, qt):
    """Batch invariance per type (test_batch.py checks whole models, on q4_k_m): each token's activations are
    quantized on their own and its sums never depend on the panel it shares."""
    rng = np.random.default_rng(11)
    w = _weight(rng.normal(0, 0.1, (7, 512)), qt)
    a = rng.normal(0, 1, (37, 512)).astype(np.float32)
    together = cpu.linear(a, w)
    for i in (0, 15, 16, 36):
        assert np.array_equal(cpu.linear(a[i:i + 1], w)[0], together[i]), f"{qt.ggml_type.name} row {i}"


def experts_case(qt, seed: int) -> tuple:
    """(x, weights, index, gate_up, down) of an experts call in type `qt`: 40 tokens, hidden and inter 256, top 2
    of 5 experts, one of them never chosen."""
    rng = np.random.default_rng(seed)
    hidden, inter, n, experts, top_k = 256, 256, 40, 5, 2
    x = rng.normal(0, 1, (n, hidden)).astype(np.float32)
    gate_up = _weight(rng.normal(0, 0.1, (experts, 2 * inter, hidden)), qt)
    down = _weight(rng.normal(0, 0.1, (experts, hidden, inter)), qt)
    index = np.argsort(-rng.random((n, experts)) * np.array([3, 1, 1, 1, 0]), axis=-1, kind="stable")[:, :top_k]
    weights = rng.uniform(0.2, 1.5, (n, top_k)).astype(np.float32)
    return x, weights, index, gate_up, down


def experts_model(linear, x, weights, index, gate_up, down) -> np.ndarray:
    """The experts with `linear(a, w)`, a model of the kernels' products, for each matmul; gelu_tanh in float32."""
    inter, model = down.shape[2], np.zeros(x.shape)
    for e in np.unique(index):
        tokens, slots = np.nonzero(index == e)
        gu = CpuWeight(gate_up.raw[e], gate_up.ggml_type, gate_up.shape[1:], gate_up.tensor_scale)
        dn = CpuWeight(down.raw[e], down.ggml_type, down.shape[1:], down.tensor_scale)
        both = np.asarray(linear(x[tokens], gu), np.float32)
        h = gelu_tanh(both[:, :inter]) * both[:, inter:]
        model[tokens] += linear(h, dn) * weights[tokens, slots][:, None]
    return model


@pytest.mark.parametrize("qt", INT8_TYPES, ids=lambda t: t.ggml_type.name)
def test_ffn_matches_the_integer_model(cpu, qt):
    case = experts_case(qt, 7)
    out = cpu.experts(*case)
    model = experts_model(lambda a, w: linear_model(cpu, a, w), *case)
    assert_close(out, model, 1e-4, f"int8 experts {qt.ggml_type.name} ({cpu.int8_isa})")
    assert_close(out, REF.experts(*case), 3e-2, "int8 vs float32")


def soft_embed_model(cpu, logits: np.ndarray, table: CpuWeight, scale: float) -> np.ndarray:
    """The integer soft embedding (dg_int8.c soft_embed) of dense rows, in float64 from exact integer sums: per 32
    rows of the vocabulary, probability codes p = rint(e / dp) (e = exp(x - max), dp = max e / 31) and per column
    table codes q = rint(t / dt) (dt = max |t| / 127); out = scale / sum(e) * sum over blocks of dp dt (p . q)."""
    x = np.asarray(logits, np.float32)
    (rows, vocab), n = x.shape, table.shape[1]
    pad = -vocab % 32
    e = np.exp(x - x.max(axis=1, keepdims=True))
    total = e.astype(np.float64).sum(axis=1)
    e = np.pad(e, ((0, 0), (0, pad))).reshape(rows, -1, 32)
    dp = e.max(axis=2) / np.float32(31)
    inv = np.divide(np.float32(1), dp, out=np.zeros_like(dp), where=dp != 0)
    p = np.minimum(np.rint(e * inv[..., None]), 31).astype(np.int64)
    t = table.dense()
    if table.ggml_type == quants.NVFP4.ggml_type:  # the kernel's value s (u - 12), s = d * ts: see the top
        t = np.stack([np.repeat(s, 16) * (u - np.float32(12)) for u, s, _ in (codes(cpu, table, row)
                                                                             for row in range(vocab))])
    t = np.pad(t, ((0, pad), (0, 0))).reshape(-1, 32, n)
    dt = np.abs(t).max(axis=1) / np.float32(127)
    inv = np.divide(np.float32(1), dt, out=np.zeros_like(dt), where=dt != 0)
    q = np.clip(np.rint(t * inv[:, None, :]), -127, 127).astype(np.int64)
    integer = np.einsum("rbj,bjc->rbc", p, q)  # exact
    blocks = dp.astype(np.float64)[:, :, None] * dt.astype(np.float64)[None] * integer
    return blocks.sum(axis=1) * (scale / total)[:, None]


@pytest.mark.parametrize("qt", INT8_TYPES, ids=lambda t: t.ggml_type.name)
def test_soft_embedding_matches_the_integer_model(cpu, qt):
    """Dense rows in integer arithmetic, over a vocabulary of 2 chunks of the kernel's 1024 rows (the last one
    ending inside a 32-row block); rows whose mass sits on a few tokens take the float kernels' exact sparse
    path, bit for bit. Measured against the model: 1.1e-7 to 1.5e-7 for every type and set here (the float32
    flush); 1e-5 leaves room for the exps: the model's are numpy's, the kernel's within 2 ulp of them, so a
    probability code on a rounding boundary could move by one."""
    rng = np.random.default_rng(int(qt.ggml_type))
    vocab, width = 1100, 256
    table = _weight(rng.normal(0, 1, (vocab, width)), qt)
    logits = (rng.normal(0, 1, (37, vocab)) * rng.uniform(0.5, 3, (37, 1))).astype(np.float32)
    logits[[3, 20], 5] = 60  # all their mass on token 5: the sparse path
    logits[7, 64:96] = logits[8, ::3] = -np.inf  # masked tokens (constrained output): a whole block, and scattered
    float_cpu = CpuBackend(threads=2, int8=False)
    floats = float_cpu.soft_embed(logits, table, 1.5)
    cpu._activate()
    out = cpu.soft_embed(logits, table, 1.5)
    paths = cpu.soft_embed_paths.copy()
    assert np.array_equal(paths, float_cpu.soft_embed_paths) and (paths[[3, 20]] >= 0).all()
    dense = paths < 0
    assert_close(out[dense], soft_embed_model(cpu, logits[dense], table, 1.5), 1e-5,
                 f"int8 soft embedding {qt.ggml_type.name} ({cpu.int8_isa})")
    assert np.array_equal(out[~dense], floats[~dense])
    # ~1% (0.86% on the bench model's q4_k_m table, where float32 is 0.71% from the f32 file's); up to 4% here,
    # where the rows are nearly uniform and the result a small average of many table rows
    assert_close(out[dense], floats[dense], 5e-2, "int8 vs float32")
    cpu._activate()
    alone = cpu.soft_embed(logits[:1], table, 1.5)[0]  # a row's codes and sums never depend on the other rows
    assert np.array_equal(alone, out[0])


def test_float_files_never_take_the_int8_path():
    """F32 and F16 never; BF16 only on the sets that take it (avx512bf16, and generic when asked for)."""
    rng = np.random.default_rng(3)
    a = rng.normal(0, 1, (20, 256)).astype(np.float32)
    auto = CpuBackend(int8=True)
    auto._activate()
    for qt in (quants.F32, quants.F16) + (() if auto.lib.dg_int8_supports(quants.BF16.ggml_type) else (quants.BF16,)):
        w = _weight(rng.normal(0, 1, (9, 256)), qt)
        assert_close(CpuBackend(int8=True).linear(a, w), REF.linear(a, w), 2e-6, qt.ggml_type.name)
        logits = rng.normal(0, 1, (5, 9)).astype(np.float32)
        assert_close(CpuBackend(int8=True).soft_embed(logits, w, 1.0), REF.soft_embed(logits, w, 1.0), 2e-6,
                     f"soft embedding {qt.ggml_type.name}")


def test_every_kernel_set_takes_every_quantized_type():
    """Every quantized type has int8 codes on every kernel set (Q8_0's and the IQ4 types', up to 255 and 241, as
    the signed bytes u - 128 on AVX2 and dotprod: dg_int8.c's sgn kinds), and a linear of each does take them
    (its result is not the float32 kernels')."""
    floats = (quants.F32, quants.F16, quants.BF16)
    assert {qt for qt in quants.QUANT_TYPES.values() if qt not in floats} == set(INT8_TYPES)
    rng = np.random.default_rng(5)
    a = rng.normal(0, 1, (9, 512)).astype(np.float32)
    for name in INT8_SETS:
        on, off = CpuBackend(threads=2, int8=name), CpuBackend(threads=2, int8=False)
        for qt in INT8_TYPES:
            w = _weight(rng.normal(0, 0.1, (7, 512)), qt)
            on._activate()  # the library's int8 set is process-wide: ask about `on`'s, not the last one made
            assert on.lib.dg_int8_supports(qt.ggml_type), f"{name} takes no {qt.ggml_type.name}"
            assert not np.array_equal(on.linear(a, w), off.linear(a, w)), f"{name}: {qt.ggml_type.name} in float32"


def _avx2_linux() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return platform.machine() == "x86_64" and cpuinfo.is_file() and {"avx2", "fma"} <= set(cpuinfo.read_text().split())


@pytest.mark.skipif(not _avx2_linux() or not shutil.which("bash") or not shutil.which("cc")
                    or not Path("/usr/include/simde/x86/avx512.h").is_file(),
                    reason="needs Linux on an AVX2 + FMA CPU, cc and SIMDe's headers (apt install libsimde-dev)")
def test_the_x86_sets_this_cpu_lacks_through_simde():
    """avx512bf16, avx512vnni and avxvnni, which no CPU here executes, compiled with SIMDe's portable versions of
    their intrinsics and run against the portable kernels on every type (tools/check_x86_simde.sh)."""
    run = subprocess.run(["bash", str(REPO / "tools" / "check_x86_simde.sh")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.rstrip().endswith("OK"), run.stdout[-3000:] + run.stderr[-3000:]


def test_switch_from_argument_and_environment(monkeypatch, checkpoints):
    monkeypatch.setenv("DGRUN_CPU_INT8", "0")
    assert not CpuBackend().int8 and CpuBackend(int8=True).int8
    monkeypatch.setenv("DGRUN_CPU_INT8", "1")
    assert CpuBackend().int8 and not CpuBackend(int8=False).int8
    # A quantized file's logits move by the activations' rounding with int8 on, not at all with it off. (This
    # random fixture amplifies any error: measured 18% here, where q4_k_m's own weight error moves its logits
    # by 80%, see test_quantized.py.)
    path = checkpoints["quant"].dgf("q4_k_m")
    canvas = np.arange(16) % 200
    logits = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("DGRUN_CPU_INT8", setting)
        with dgrun.load(path, backend="cpu") as model:
            cache = model.graph.new_cache()
            model.graph.encode(np.array([2, 7, 9]), cache)
            logits[setting] = model.graph.decode(canvas, cache, None)
    with dgrun.load(path, backend="numpy") as model:
        cache = model.graph.new_cache()
        model.graph.encode(np.array([2, 7, 9]), cache)
        ref = model.graph.decode(canvas, cache, None)
    assert_close(logits["0"], ref, 1e-5, "int8 off")
    rel = np.linalg.norm(logits["1"] - ref) / np.linalg.norm(ref)
    assert 1e-5 < rel < 0.4, rel


# -- BF16 weights: bfloat16 products (dg_int8.c "BF16 weights") -----------------------------------------------------


@pytest.fixture(params=BF16_SETS)
def bf16_cpu(request):
    return CpuBackend(threads=2, int8=request.param)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits, to nearest even; subnormals to signed zeros (dg_int8.c bf16_round)."""
    u = np.asarray(x, np.float32).view(np.uint32)
    bits = (u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16
    bits = np.where(u & 0x7F800000 == 0, (u >> 16) & 0x8000, bits)
    return np.where(u & 0x7FFFFFFF > 0x7F800000, (u >> 16) | 0x40, bits).astype(np.uint16)


def bf16_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def bf16_dot_model(a: np.ndarray, w: CpuWeight) -> np.ndarray:
    """c = bf16(a) @ W^T summed in float32 as VDPBF16PS does: per pair j of k, c += odd product, then even
    (each product exact in float32, each step one rounding; no sum here comes near float32's subnormals)."""
    x, wt = bf16_float(bf16_round(a)), w.dense().astype(np.float32)
    c = np.zeros((x.shape[0], wt.shape[0]), np.float32)
    for j in range(0, x.shape[1], 2):
        c += np.outer(x[:, j + 1], wt[:, j + 1])
        c += np.outer(x[:, j], wt[:, j])
    return c


def test_bf16_rounding_is_ggmls():
    """The model's rounding is gguf-py's (the converter's, bit-exact with ggml_compute_fp32_to_bf16) on normal
    numbers and ties; infinities stay infinities, subnormals become zeros (as the instruction reads them)."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, 1000) * 10.0 ** rng.integers(-30, 30, 1000),
                        [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4e38, 0.0, -0.0]]).astype(np.float32)
    raw, _ = quantized_or_random(x.reshape(1, -1), quants.BF16.ggml_type)
    np.testing.assert_array_equal(bf16_round(x), raw.view(np.uint16).reshape(-1))
    special = np.array([np.inf, -np.inf, 1e-39, -1e-39, 1e-45], np.float32)
    np.testing.assert_array_equal(bf16_round(special), [0x7F80, 0xFF80, 0, 0x8000, 0])


@pytest.mark.parametrize("m,n", [(1, 7), (37, 7), (37, 53)])
def test_bf16_linear_matches_the_model(bf16_cpu, m, n):
    """7 rows: one partial call of the microkernel's 12 rows; 53: a whole block of 48 and a partial one. Bit for
    bit on generic (see the top); the rounding of the activations is what moves it from float32."""
    rng = np.random.default_rng(m + n)
    w = _weight(rng.normal(0, 0.1, (n, 512)), quants.BF16)
    a = rng.normal(0, 1, (m, 512)).astype(np.float32)
    out, model = bf16_cpu.linear(a, w), bf16_dot_model(a, w)
    if bf16_cpu.int8_isa == "generic":
        np.testing.assert_array_equal(out, model)
    assert_close(out, model, 1e-6, f"bf16 linear ({bf16_cpu.int8_isa})")
    assert 1e-4 < np.linalg.norm(out - REF.linear(a, w)) / np.linalg.norm(out) < 5e-3, "bf16 vs float32"
    for i in sorted({0, min(16, m - 1), m - 1}):  # row-independent: a token's sums never depend on its panel
        assert np.array_equal(bf16_cpu.linear(a[i:i + 1], w)[0], out[i])


def test_bf16_ffn_matches_the_model(bf16_cpu):
    """The experts in bf16 products; the hidden activations are rounded to bf16 again before the down
    projection, from the kernels' vector tanh (within 2 ulp of numpy's), which can move one of them by a bf16
    step now and then: 1e-4 relative (measured on generic: 7e-8, the float64 sum over experts and numpy's tanh)."""
    case = experts_case(quants.BF16, 8)
    out = bf16_cpu.experts(*case)
    assert_close(out, experts_model(bf16_dot_model, *case), 1e-4, f"bf16 experts ({bf16_cpu.int8_isa})")
    assert_close(out, REF.experts(*case), 1e-2, "bf16 vs float32")


def test_bf16_soft_embedding_matches_the_model(bf16_cpu):
    """Dense rows over a BF16 table: probabilities exp(x - max) rounded to bf16, products with the table's
    values summed in float32 (the model sums in float64: measured 5.8e-7 on generic; 1e-5 leaves room for an exp
    within 2 ulp of numpy's that lands on the other side of a bf16 rounding boundary); sparse rows are
    the float kernels' exact path, bit for bit; a row alone is the same bits as among others."""
    rng = np.random.default_rng(9)
    vocab, width = 1100, 256
    table = _weight(rng.normal(0, 1, (vocab, width)), quants.BF16)
    logits = (rng.normal(0, 1, (37, vocab)) * rng.uniform(0.5, 3, (37, 1))).astype(np.float32)
    logits[[3, 20], 5] = 60  # the sparse path
    logits[7, 64:96] = logits[8, ::3] = -np.inf
    float_cpu = CpuBackend(threads=2, int8=False)
    floats = float_cpu.soft_embed(logits, table, 1.5)
    bf16_cpu._activate()
    out = bf16_cpu.soft_embed(logits, table, 1.5)
    dense = bf16_cpu.soft_embed_paths < 0
    assert np.array_equal(bf16_cpu.soft_embed_paths, float_cpu.soft_embed_paths) and not dense[[3, 20]].any()
    e = np.exp(logits[dense] - logits[dense].max(axis=1, keepdims=True))
    p = bf16_float(bf16_round(e)).astype(np.float64)
    model = p @ table.dense().astype(np.float64) * (1.5 / e.astype(np.float64).sum(axis=1))[:, None]
    assert_close(out[dense], model, 1e-5, f"bf16 soft embedding ({bf16_cpu.int8_isa})")
    assert np.array_equal(out[~dense], floats[~dense])
    assert_close(out[dense], floats[dense], 5e-3, "bf16 vs float32")
    bf16_cpu._activate()
    assert np.array_equal(bf16_cpu.soft_embed(logits[:1], table, 1.5)[0], out[0])


@pytest.mark.parametrize("kernels", BF16_SETS)
def test_a_bf16_file_takes_the_bf16_products(monkeypatch, checkpoints, kernels):
    """A whole model from a BF16 file: with the switch on, its logits move from the float32 path's by the
    activations' bf16 rounding, by no more than (twice) the weights' own bf16 rounding moved them from the f32
    file's. This random fixture amplifies both: measured 7.5% and 8.8% on generic."""
    canvas = np.arange(16) % 200

    def logits(preset: str, setting: str) -> np.ndarray:
        monkeypatch.setenv("DGRUN_CPU_INT8", setting)
        with dgrun.load(checkpoints["quant"].dgf(preset), backend="cpu") as model:
            cache = model.graph.new_cache()
            model.graph.encode(np.array([2, 7, 9]), cache)
            return model.graph.decode(canvas, cache, None)

    f32, floats, products = logits("f32", "0"), logits("bf16", "0"), logits("bf16", kernels)
    weights_cost = np.linalg.norm(floats - f32) / np.linalg.norm(f32)
    products_cost = np.linalg.norm(products - floats) / np.linalg.norm(floats)
    assert 1e-5 < products_cost < 2 * weights_cost, (products_cost, weights_cost)
