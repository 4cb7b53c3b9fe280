#!/usr/bin/env python3
"""Print the round-trip error of every tensor type in dgrun.quants on seeded Gaussian data.

    python tools/quant_error_table.py                 # std 1 and 1e-3, 64 x 4096 values
    python tools/quant_error_table.py --std 0.02 --types Q4_K Q6_K NVFP4

Errors are measured through quantize_tensor / dequantize_tensor, i.e. exactly what the converter
writes and the runtime reads back (including NVFP4's per-tensor scale).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from dgrun.quants import QUANT_TYPES, DecodeOnlyType, dequantize_tensor, get_quant_type, quantize_tensor


def measure(x: np.ndarray, type_name: str) -> tuple[float, float]:
    """Relative L2 error and max-abs error of one quantize/dequantize round trip."""
    raw, scale = quantize_tensor(x, type_name)
    out = dequantize_tensor(raw, type_name, scale)
    diff = out.astype(np.float64) - x
    return float(np.linalg.norm(diff) / np.linalg.norm(x)), float(np.abs(diff).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="rows of the test matrix (default 64)")
    parser.add_argument(
        "--cols", type=int, default=4096, help="row width; must suit every type's block (default 4096)"
    )
    parser.add_argument(
        "--std", type=float, nargs="+", default=[1.0, 1e-3], help="standard deviations (default 1 1e-3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    parser.add_argument(
        "--types", nargs="+", help="type names (default: every type dgrun writes)",
        default=[t.name for t, qt in QUANT_TYPES.items() if not issubclass(qt, DecodeOnlyType)],
    )
    args = parser.parse_args(argv)

    try:
        types = [get_quant_type(name) for name in args.types]
    except ValueError as exc:
        parser.error(str(exc))
    for qt in types:
        if args.cols % qt.block_size:
            parser.error(
                f"--cols {args.cols} is not a multiple of {qt.ggml_type.name}'s block size {qt.block_size}"
            )

    rng = np.random.default_rng(args.seed)
    base = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    print(f"Gaussian data, {args.rows} x {args.cols} values, seed {args.seed}")
    header = f"{'type':<7}{'bits/w':>8}"
    for std in args.std:
        header += f"  {f'std={std:g}: rel L2':>20}{'max-abs':>10}"
    print(header)
    print("-" * len(header))
    for qt in sorted(types, key=lambda t: -t.bits_per_weight):
        line = f"{qt.ggml_type.name:<7}{qt.bits_per_weight:>8.3f}"
        for std in args.std:
            rel, max_abs = measure(base * np.float32(std), qt.ggml_type.name)
            line += f"  {rel:>20.3e}{max_abs:>10.2e}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
