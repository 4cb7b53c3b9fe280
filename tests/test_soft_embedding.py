"""The sparse soft embedding: the numpy reference's rule (`numpy_backend.sparse_soft_embed_row`) holds its bound,
including on rows built to sit right at the cut, and the cpu kernels follow the same rule.

What is proven (see the rule's docstring) and checked here in float64: for every row the rule sends down the
sparse path, the tokens it leaves out move the exact soft embedding by at most u = 2^-24 of its norm, i.e. less
than rounding the exact result to float32 does. Rows just past the bound, with more than SPARSE_MAX_KEPT tokens in
the window, or with no concentration at all take the dense path, which is the plain softmax @ table product.
Tolerances against float64: the float32 results differ from the exact soft embedding by their own summation
rounding, 1e-6 relative for the few-term sparse sums and the 2e-6 MATMUL_RTOL of the cpu tests for dense rows.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close

import dgrun
from dgrun import quants, sampler
from dgrun.backends.numpy_backend import (
    FLOAT32_UNIT_ROUNDOFF,
    SPARSE_KEEP_LOGIT,
    SPARSE_MASS_MARGIN,
    SPARSE_MAX_KEPT,
    NumpyBackend,
    Weight,
    sparse_soft_embed_row,
)
from dgrun.rng import DefaultRng

REF = NumpyBackend()
U = FLOAT32_UNIT_ROUNDOFF
VOCAB, WIDTH, SCALE = 3000, 64, 8.0


def _table(rng: np.random.Generator, ggml_type=quants.F32.ggml_type, big_row: int | None = None) -> Weight:
    x = rng.normal(0, 1, (VOCAB, WIDTH)).astype(np.float32)
    if big_row is not None:
        x[big_row] *= 50  # the largest row norm belongs to a token that gets dropped
    raw, scale = quants.quantize_tensor(x, ggml_type)
    return Weight(raw, quants.get_quant_type(ggml_type).ggml_type, x.shape, scale)


def _exact(logits: np.ndarray, table: Weight, keep: np.ndarray | None = None) -> np.ndarray:
    """scale * sum_j p_j E_j in float64 from the float32 softmax, over all tokens or just `keep`."""
    p = sampler.softmax(logits[None])[0].astype(np.float64)
    if keep is not None:
        p = np.where(keep, p, 0.0)
    return SCALE * (p @ table.dense().astype(np.float64))


def _row_at_margin(rng: np.random.Generator, table: Weight, kept: int, factor: float) -> np.ndarray:
    """Logits whose dropped mass times the bound is `factor` times the sparse path's limit: `kept` tokens in the
    window, 50 dropped tokens (the biggest row among them) at one logit solved for that mass."""
    x = np.full(VOCAB, -1e4, np.float32)  # tokens that carry no mass at all (exp underflows to 0)
    x[:kept] = rng.uniform(-3, 0, kept).astype(np.float32)
    x[0] = 0
    keep = np.zeros(VOCAB, bool)
    keep[:kept] = True
    y_kept = _exact(x, table, keep)
    bound = SCALE * table.max_row_norm
    limit = 0.5 * U * np.linalg.norm(y_kept) / (SPARSE_MASS_MARGIN * bound)  # the mass at the cut
    z = np.exp(x[:kept].astype(np.float64)).sum()
    drop = np.arange(kept, kept + 50)
    x[drop] = np.float32(np.log(factor * limit * z / 50))  # 50 e^c / (z + 50 e^c) ~ factor * limit
    assert x[drop[0]] < -SPARSE_KEEP_LOGIT  # really outside the window
    return x


def test_dense_rows_are_the_plain_product():
    rng = np.random.default_rng(0)
    table = _table(rng)
    logits = rng.normal(0, 3, (17, VOCAB)).astype(np.float32)  # flat: every row keeps hundreds of tokens
    out = REF.soft_embed(logits, table, SCALE)
    np.testing.assert_array_equal(out, (sampler.softmax(logits) @ table.dense()) * np.float32(SCALE))


@pytest.mark.parametrize("big_row", [None, 3])
def test_sparse_rows_move_the_result_by_less_than_float32_rounding(big_row):
    rng = np.random.default_rng(1)
    table = _table(rng, big_row=None if big_row is None else VOCAB - 10 + big_row)
    sharpness = np.geomspace(1, 200, 60)[:, None]
    logits = (rng.normal(0, 1, (60, VOCAB)) * sharpness).astype(np.float32)
    sparse = 0
    for x in logits:
        row = sparse_soft_embed_row(x, sampler.softmax(x[None])[0], table, SCALE)
        exact = _exact(x, table)
        if row is None:
            continue
        sparse += 1
        keep = x - x.max() >= -SPARSE_KEEP_LOGIT
        # The proven bound, on exact arithmetic: what the dropped tokens contribute is below u ||y||.
        assert np.linalg.norm(exact - _exact(x, table, keep)) <= U * np.linalg.norm(exact)
        assert_close(row, exact, 1e-6, "sparse row vs float64")
    assert 10 < sparse < 60, sparse


@pytest.mark.parametrize("kept", [1, 7, SPARSE_MAX_KEPT])
def test_rows_at_the_cut(kept):
    """Just inside the bound: sparse, and still exact to float32; just outside: dense."""
    rng = np.random.default_rng(kept)
    table = _table(rng, big_row=kept + 3)
    for factor, sparse in ((0.999, True), (1.001, False)):
        x = _row_at_margin(rng, table, kept, factor)
        p = sampler.softmax(x[None])[0]
        row = sparse_soft_embed_row(x, p, table, SCALE)
        assert (row is not None) == sparse, (factor, kept)
        exact = _exact(x, table)
        out = REF.soft_embed(x[None], table, SCALE)[0]
        assert np.linalg.norm(exact - _exact(x, table, np.arange(VOCAB) < kept)) <= (U if sparse else 2 * U) * \
            np.linalg.norm(exact)
        assert_close(out, exact, 1e-6, f"soft embedding at the cut ({factor})")


def test_the_window_and_the_cap():
    rng = np.random.default_rng(3)
    table = _table(rng)
    x = np.full(VOCAB, -1e4, np.float32)
    x[0] = 5.0
    x[1] = np.float32(5.0) - SPARSE_KEEP_LOGIT  # exactly on the window's edge: kept
    x[2] = np.nextafter(x[1], np.float32(-np.inf))  # one ulp below it: dropped (and negligible)
    keep = np.flatnonzero(x - x.max() >= -SPARSE_KEEP_LOGIT)
    assert keep.tolist() == [0, 1]
    assert sparse_soft_embed_row(x, sampler.softmax(x[None])[0], table, SCALE) is not None
    crowded = np.full(VOCAB, -1e4, np.float32)
    for n, sparse in ((SPARSE_MAX_KEPT, True), (SPARSE_MAX_KEPT + 1, False)):
        crowded[:n] = 0
        assert (sparse_soft_embed_row(crowded, sampler.softmax(crowded[None])[0], table, SCALE) is not None) == sparse


def test_trained_model_rows_go_sparse():
    """On the shipped demo model (trained, if briefly), the last step of a canvas is confident enough that some
    rows take the sparse path (3 of 32 after 6 steps here, 7 after 12; a random model has none)."""
    with dgrun.load(backend="numpy") as model:  # no path: the demo model
        cfg, graph = model.config, model.graph
        cache = graph.new_cache()
        graph.encode(np.array([2, 100, 200, 300, 400]), cache)
        rng = DefaultRng(0)
        canvas, self_cond, steps = rng.tokens((cfg.canvas_length,), cfg.vocab_size), None, 6
        for remaining in range(steps, 0, -1):
            result = sampler.denoise_step(graph.decode(canvas, cache, self_cond), canvas,
                                          sampler.temperature(remaining, steps, 0.4, 0.8), 0.1, rng)
            canvas, self_cond = result.canvas, result.processed_logits
        probs = sampler.softmax(self_cond)
        table = graph.w["token_embd.weight"]
        sparse = [sparse_soft_embed_row(x, p, table, cfg.embed_scale) is not None
                  for x, p in zip(self_cond, probs, strict=True)]
    assert sum(sparse) >= 1, sparse


# -- the cpu kernels follow the same rule ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu():
    cpu_backend = pytest.importorskip("dgrun.backends.cpu_backend")
    try:  # the float32 kernels: tests/test_int8.py checks the integer soft embedding of quantized tables
        return cpu_backend.CpuBackend(threads=2, int8=False)
    except RuntimeError as e:
        pytest.skip(f"cpu backend unavailable: {e}")


@pytest.mark.parametrize("ggml_type", [quants.F32.ggml_type, quants.Q8_0.ggml_type, quants.Q6_K.ggml_type],
                         ids=lambda t: t.name)
def test_cpu_soft_embedding_takes_the_same_paths(cpu, ggml_type):
    from dgrun.backends.cpu_backend import CpuWeight

    rng = np.random.default_rng(5)
    width = 256
    x = rng.normal(0, 1, (VOCAB, width)).astype(np.float32)
    x[VOCAB - 7] *= 50
    raw, scale = quants.quantize_tensor(x, ggml_type)
    table = CpuWeight(raw, quants.get_quant_type(ggml_type).ggml_type, x.shape, scale)
    ref_table = Weight(raw, table.ggml_type, x.shape, scale)
    assert table.max_row_norm == pytest.approx(ref_table.max_row_norm, rel=1e-12)
    margin = [_row_at_margin(rng, ref_table, kept, f) for kept in (1, 5, 300) for f in (0.5, 2.0)]
    sharp = (rng.normal(0, 1, (40, VOCAB)) * np.geomspace(1, 300, 40)[:, None]).astype(np.float32)
    logits = np.concatenate([np.stack(margin), sharp])
    out, ref = cpu.soft_embed(logits, table, SCALE), REF.soft_embed(logits, ref_table, SCALE)
    assert_close(out, ref, 2e-6, f"soft_embed {ggml_type.name}")
    ref_paths = [sparse_soft_embed_row(r, p, ref_table, SCALE) is not None
                 for r, p in zip(logits, sampler.softmax(logits), strict=True)]
    assert (cpu.soft_embed_paths >= 0).tolist() == ref_paths
    assert 10 < sum(ref_paths) < len(logits)
    # The sampler step's statistics serve the soft embedding of its processed logits.
    processed = logits * np.float32(0.5)
    result = cpu.denoise_step(processed.copy(), np.zeros(len(logits), np.int64), 0.5, 1.0, DefaultRng(0))
    assert_close(cpu.soft_embed(result.processed_logits, table, SCALE), ref, 2e-6, "after the sampler step")


@pytest.mark.parametrize("ggml_type", [quants.F32.ggml_type, quants.Q8_0.ggml_type], ids=lambda t: t.name)
def test_mlx_soft_embedding_takes_the_same_paths(ggml_type):
    mx = pytest.importorskip("mlx.core", reason="mlx is not installed")
    from dgrun.backends import mlx_backend

    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, (VOCAB, WIDTH)).astype(np.float32)
    x[VOCAB - 7] *= 50
    raw, scale = quants.quantize_tensor(x, ggml_type)
    ref_table = Weight(raw, ggml_type, x.shape, scale)
    if ggml_type == quants.F32.ggml_type:
        table = mlx_backend.DenseWeight(mx.array(x))
    else:
        layout = mlx_backend.LAYOUTS[ggml_type]
        packed, scales, biases = layout.repack(raw)
        table = mlx_backend.QuantWeight(mx.array(packed), mx.array(scales), mx.array(biases), layout, x.shape)
    assert table.max_row_norm == pytest.approx(ref_table.max_row_norm, rel=2e-5)
    margin = [_row_at_margin(rng, ref_table, kept, f) for kept in (1, 5, 300) for f in (0.5, 2.0)]
    sharp = (rng.normal(0, 1, (40, VOCAB)) * np.geomspace(1, 300, 40)[:, None]).astype(np.float32)
    logits = np.concatenate([np.stack(margin), sharp])
    ours = mlx_backend.MlxBackend()
    ref = REF.soft_embed(logits, ref_table, SCALE)
    assert_close(np.array(ours.soft_embed(logits, table, SCALE)), ref, 2e-6, f"mlx soft_embed {ggml_type.name}")
    ref_paths = [sparse_soft_embed_row(r, p, ref_table, SCALE) is not None
                 for r, p in zip(logits, sampler.softmax(logits), strict=True)]
    assert (ours.soft_embed_paths >= 0).tolist() == ref_paths
    # The step's processed logits, never evaluated whole, serve the soft embedding block by block.
    result = ours.denoise_step(mx.array(logits * np.float32(0.5)), np.zeros(len(logits), np.int64), 0.5, 1.0,
                               DefaultRng(0))
    assert_close(np.array(ours.soft_embed(result.processed_logits, table, SCALE)), ref, 2e-6, "after the step")
