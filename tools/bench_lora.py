"""What a LoRA adapter costs per pass: the bench model (tools/bench.py) with Unsloth's recipe (r=64, alpha=128 on
q/k/v/o/gate/up/down of both copies and the self-conditioning MLP), unmerged and merged, side by side in one run.

    python tools/bench_lora.py                       # cpu backend, f32 and q8_0 bases, 5 interleaved repetitions
    python tools/bench_lora.py --backend numpy --reps 3 --rank 16

Prints milliseconds per decoder pass (canvas of 256, self-conditioning on) and per encoder pass (a 256-token
chunk after a 64-token prompt), median over the repetitions, and each configuration's ratio to its base alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(hf: Path, out: Path, rank: int) -> Path:
    """A random PEFT adapter of `rank` on the bench model, converted to `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DiffusionGemmaForBlockDiffusion

    from dgrun.converters.convert_lora import convert_lora

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(hf, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                            exclude_modules=r".*vision.*"))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.01)
    peft.save_pretrained(out.with_suffix(""))
    convert_lora(out.with_suffix(""), hf, out, quiet=True)
    return out


def time_passes(model: Any, rng: np.random.Generator) -> tuple[float, float]:
    """(ms per decoder pass, ms per encoder pass of one canvas-sized chunk)."""
    cfg, ops = model.config, model.backend
    cache = model.graph.new_cache()
    model.graph.encode(rng.integers(0, cfg.vocab_size, 64), cache)
    chunk = rng.integers(0, cfg.vocab_size, cfg.canvas_length)
    start = time.perf_counter()
    model.graph.encode(chunk, cache.copy())
    encode = time.perf_counter() - start
    canvas = rng.integers(0, cfg.vocab_size, cfg.canvas_length)
    self_cond = ops.asarray(rng.normal(0, 3, (cfg.canvas_length, cfg.vocab_size)).astype(np.float32))
    ops.to_numpy(model.graph.decode(canvas, cache, self_cond))  # warm-up
    start = time.perf_counter()
    ops.to_numpy(model.graph.decode(canvas, cache, self_cond))
    return 1e3 * (time.perf_counter() - start), 1e3 * encode


def main(argv: list[str] | None = None) -> None:
    import dgrun

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dgrun-bench")
    args = parser.parse_args(argv)
    hf, files = bench.prepare_bench_model(args.workdir, ["f32", "q8_0"], False, lambda m: print(m, file=sys.stderr))
    adapter = args.workdir / f"lora-r{args.rank}.dgf"
    if not adapter.is_file():
        make_adapter(hf, adapter, args.rank)
    configs = {"f32": (files["f32"], None, False), "f32 + lora": (files["f32"], [adapter], False),
               "f32 + lora merged": (files["f32"], [adapter], True),
               "q8_0": (files["q8_0"], None, False), "q8_0 + lora": (files["q8_0"], [adapter], False)}
    models = {name: dgrun.load(path, backend=args.backend, lora=lora, merge_lora=merge)
              for name, (path, lora, merge) in configs.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    rng = np.random.default_rng(0)
    for rep in range(args.reps):
        order = list(configs)[rep % len(configs):] + list(configs)[:rep % len(configs)]  # interleaved, rotated
        for name in order:
            times[name].append(time_passes(models[name], rng))
    print(f"backend {args.backend}, rank {args.rank}, median of {args.reps}")
    print(f"{'configuration':<20}{'ms/decoder pass':>18}{'ms/encoder chunk':>18}")
    for name, runs in times.items():
        base = times[name.split(" ")[0]]
        dec, enc = (statistics.median(r[i] for r in runs) for i in (0, 1))
        dec0, enc0 = (statistics.median(r[i] for r in base) for i in (0, 1))
        print(f"{name:<20}{dec:>10.1f} ({dec / dec0:4.2f}x){enc:>10.1f} ({enc / enc0:4.2f}x)")


if __name__ == "__main__":
    main()
