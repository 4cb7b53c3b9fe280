"""Two builds of the cpu backend's native kernels side by side in one process, call for call.

    python tools/kernel_ab.py BASE_NATIVE_DIR -m model.dgf [--cases soft_embed,out_proj] [--reps 40]

BASE_NATIVE_DIR is another checkout's `native/cpu` (e.g. `git archive REV native/cpu | tar -x -C /tmp/base`);
the other build is this checkout's. Both libraries are loaded into this process and driven by this checkout's
Python wrappers (so the two must share the C functions those wrappers call), on the same inputs, alternating
call by call: a noisy machine's slow and fast phases then fall on both alike. Prints, per case, each build's
median time, the median of the per-pair ratios (this checkout / base) and whether the outputs are the same bits.
On a shared 2-core VM whose whole-generation runs vary by +-10%, this resolves 2-3% differences in one op.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def cases(model: Any, ops: Any) -> dict[str, Any]:
    """One decoder layer's ops and the vocabulary-wide ones, on a canvas of random inputs."""
    from dgrun.rng import DefaultRng

    g, rng = model.graph, np.random.default_rng(0)
    cfg, p, table = g.cfg, "blk.0.", g.w["token_embd.weight"]
    x = rng.standard_normal((cfg.canvas_length, cfg.hidden_size)).astype(np.float32)
    logits = rng.normal(0, 8, (cfg.canvas_length, cfg.vocab_size)).astype(np.float32)
    canvas = np.zeros(cfg.canvas_length, np.int64)
    weights, index = ops.route(x, g.w[p + "ffn_gate_inp.weight"], g.vec[p + "ffn_gate_inp.scale"],
                               g.vec[p + "ffn_down_exps.scale"], cfg.top_k_experts, cfg.rms_norm_eps)

    def sampler(o: Any) -> np.ndarray:
        step = o.denoise_step(logits.copy(), canvas, 0.6, 0.1, DefaultRng(0))
        return np.concatenate([step.canvas, step.argmax])

    return {
        "dense_mlp": lambda o: o.gated_mlp(x, g.w[p + "ffn_gate.weight"], g.w[p + "ffn_up.weight"],
                                           g.w[p + "ffn_down.weight"]),
        "experts": lambda o: o.experts(x, weights, index, g.w[p + "ffn_gate_up_exps.weight"],
                                       g.w[p + "ffn_down_exps.weight"]),
        "out_proj": lambda o: o.linear(x, g.output),
        "soft_embed": lambda o: o.soft_embed(logits, table, 1.0),
        "sampler": sampler,
        "softcap": lambda o: o.softcap(logits, 30.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="the other build's native/cpu folder")
    parser.add_argument("-m", "--model", required=True, help="a .dgf file (e.g. the bench model's q4_k_m)")
    parser.add_argument("--cases", help="comma-separated, of: dense_mlp, experts, out_proj, soft_embed, sampler, "
                                        "softcap (default: all)")
    parser.add_argument("--reps", type=int, default=40, help="timed pairs of calls per case (default: 40)")
    args = parser.parse_args()
    if not (args.base / "build.py").is_file():
        sys.exit(f"error: {args.base} holds no build.py: pass another checkout's native/cpu folder")
    import dgrun
    from dgrun.backends.cpu_backend import CpuBackend, build_library

    model = dgrun.load(args.model, backend="cpu")
    ours, base = CpuBackend(), CpuBackend()
    ours.ffi, ours.lib, _ = build_library(REPO / "native" / "cpu", "_kernel_ab_ours")
    base.ffi, base.lib, _ = build_library(args.base, "_kernel_ab_base")
    for backend in (base, ours):  # each library its own thread count and kernel sets
        backend._activate(force=True)
    table = cases(model, ours)
    wanted = args.cases.split(",") if args.cases else list(table)
    unknown = sorted(set(wanted) - set(table))
    if unknown:
        sys.exit(f"error: unknown case(s) {', '.join(unknown)}; known: {', '.join(table)}")
    for name in wanted:
        run = table[name]
        same = np.array_equal(run(ours), run(base))  # also the warm-up
        times: dict[str, list[float]] = {"ours": [], "base": []}
        for _ in range(args.reps):
            for key, backend in (("base", base), ("ours", ours)):
                start = time.perf_counter()
                run(backend)
                times[key].append(time.perf_counter() - start)
        pairs = statistics.median(o / b for o, b in zip(times["ours"], times["base"], strict=True))
        print(f"{name:11s} base {1e3 * statistics.median(times['base']):8.2f} ms   ours "
              f"{1e3 * statistics.median(times['ours']):8.2f} ms   ours/base per pair {pairs:.3f}   "
              f"same bits: {same}", flush=True)


if __name__ == "__main__":
    main()
