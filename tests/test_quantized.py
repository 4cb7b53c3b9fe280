"""Quantized files against the float32 file of the same checkpoint: logits error, KL and top-1 agreement.

The bounds are regression guards at ~2x the values measured by `tools/quant_quality.py` on this fixture. A
random-weight fixture amplifies weight error far more than a trained model does (bf16's 0.17% weight error
moves its logits by ~8% here): the meaningful table is the one on the trained demo model, in the README.
What the test does pin down is that every preset loads, runs, and stays in its measured band.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import quant_quality  # noqa: E402

# outtype: (max rel L2 of logits, max mean KL in nats, min top-1 agreement); measured 0.006/7e-5/100% (f16),
# 0.076/0.015/100% (bf16), 0.29/0.18/94% (q8_0), 0.80/1.6/81% (q4_k_m), 0.49/0.79/81% (mxfp4), 0.53/0.63/88% (nvfp4)
BOUNDS = {
    "f16": (2e-2, 3e-4, 0.9),
    "bf16": (0.2, 5e-2, 0.9),
    "q8_0": (0.6, 0.5, 0.75),
    "q4_k_m": (1.2, 3.0, 0.6),
    "mxfp4_moe": (1.0, 1.6, 0.6),
    "nvfp4_moe": (1.0, 1.3, 0.6),
}


def test_quantized_presets_stay_within_their_bands(checkpoints):
    ckpt = checkpoints["quant"]
    rows = quant_quality.measure({t: ckpt.dgf(t) for t in BOUNDS}, ckpt.dgf("f32"))
    print("\n" + quant_quality.format_table(rows))
    for row in rows:
        max_rel, max_kl, min_top1 = BOUNDS[row.outtype]
        assert row.rel_l2 <= max_rel and row.kl <= max_kl and row.top1 >= min_top1, (
            f"{row.outtype}: rel L2 {row.rel_l2:.3e} (<= {max_rel}), KL {row.kl:.3e} (<= {max_kl}), "
            f"top-1 {row.top1:.1%} (>= {min_top1:.0%})")
    bits = {r.outtype: r.bits_per_weight for r in rows}
    assert bits["q4_k_m"] < bits["q8_0"] < bits["f16"]
