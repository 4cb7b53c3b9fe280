"""Write a DiffusionGemma-shaped .dgf with valid random weights, fast: for GPU benchmarks and loading tests.

    python tools/make_random_dgf.py /tmp/dg-q4.dgf --preset q4_k_m            # the released shapes
    python tools/make_random_dgf.py /tmp/small.dgf --layers 2 --vocab 4096     # a quick one

Nothing is quantized. For each ggml type a pool of random bytes (a few MiB of whole blocks) is made once and
its scale fields are overwritten so every block decodes to finite values of a chosen spread; each tensor is
then a run of pool blocks from a random start, written straight to the file. That makes a 15 GB model in the
time the disk takes to write it. The values are zero-mean with standard deviation ~1/sqrt(fan-in) (norms and
scales near 1), so activations stay O(1) through the layers and the router spreads tokens over the experts.
Shapes, names and types are the runtime's own: `dgrun.model.tensor_shapes`, the converter's presets
(`dgrun.converters.presets.tensor_type`) and `dgrun.config.ModelConfig.to_metadata`, written as the converter types it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGMLQuantizationType as T

from dgrun.config import ModelConfig
from dgrun.converters.convert_hf import add_metadata, add_rope_freqs, atomic_writer, write_file
from dgrun.converters.presets import PRESETS, tensor_type
from dgrun.model import tensor_shapes
from dgrun.quants import get_quant_type, row_bytes

# The released model's text config.
RELEASED = dict(
    vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
    num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
    num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
    moe_intermediate_size=704, rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0, partial_rotary_factor=0.25, canvas_length=256,
)
POOL_BYTES = 8 << 20


def model_config(layers: int, vocab: int) -> ModelConfig:
    """The released config with `layers` layers (5 sliding : 1 full, the last full) and `vocab` tokens."""
    types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)]
    types[-1] = "full_attention"
    cfg = ModelConfig(**{**RELEASED, "num_hidden_layers": layers, "vocab_size": vocab}, layer_types=types)
    cfg.validate()
    return cfg


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype("<f2").view(np.uint8).reshape(-1, 2)


def block_pool(ggml_type: T, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """(uint8 [blocks, type_size] of random valid blocks, the NVFP4 tensor scale they need or 1.0).

    Values have a standard deviation of about 1 (times the tensor scale for NVFP4); callers rescale the
    fp16 / exponent fields per tensor with `scale_pool`.
    """
    qt = get_quant_type(ggml_type)
    blocks = np.frombuffer(rng.bytes(POOL_BYTES // qt.type_size * qt.type_size), np.uint8)
    blocks = blocks.reshape(-1, qt.type_size).copy()
    n = len(blocks)
    jitter = rng.uniform(0.5, 1.5, n).astype(np.float32)  # block-to-block variation of the scale
    if ggml_type == T.Q8_0:  # d * int8: uniform int8 has std 74
        blocks[:, 0:2] = _f16_bytes(jitter / 74)
    elif ggml_type == T.Q4_0:  # d * (q - 8): std 4.6
        blocks[:, 0:2] = _f16_bytes(jitter / 4.6)
    elif ggml_type == T.Q5_0:  # d * (q - 16): std 9.2
        blocks[:, 0:2] = _f16_bytes(jitter / 9.2)
    elif ggml_type == T.Q4_K:
        # (d * sc) * q - dmin * mn with 6-bit sc, mn ~ 31.5 and q ~ 7.5 on average: dmin = 7.5 d centres it.
        d = jitter / (31.5 * 4.6)
        blocks[:, 0:2] = _f16_bytes(d)
        blocks[:, 2:4] = _f16_bytes(d * 7.5)
    elif ggml_type == T.Q6_K:  # (d * int8 scale) * (q - 32): 74 * 18.5
        blocks[:, 208:210] = _f16_bytes(jitter / (74 * 18.5))
    elif ggml_type == T.MXFP4:  # E8M0 scale 2^(e-128) times E2M1 doubled codes (rms 5.85): e near 128 - 2.5
        blocks[:, 0] = rng.integers(125, 127, n, dtype=np.uint8)
    elif ggml_type == T.NVFP4:
        # UE4M3 scales with exponent 7..9 (decoded halves 0.5..3.75) times codes of rms 5.85: std ~ 10, so a
        # tensor scale of 0.1 brings it to ~1.
        exponent = rng.integers(7, 10, (n, 4), dtype=np.uint8)
        blocks[:, 0:4] = (exponent << 3) | rng.integers(0, 8, (n, 4), dtype=np.uint8)
        return blocks, 0.1
    else:
        raise ValueError(f"no random block recipe for {ggml_type.name}")
    return blocks, 1.0


def scale_pool(pool: np.ndarray, ggml_type: T, std: float) -> tuple[np.ndarray, float]:
    """A copy of `pool` whose values have standard deviation `std` (the NVFP4 tensor scale carries it)."""
    if ggml_type == T.NVFP4:
        return pool, std
    out = pool.copy()
    if ggml_type == T.MXFP4:  # powers of two only: move the exponent
        shift = int(round(math.log2(std)))
        out[:, 0] = np.clip(out[:, 0].astype(np.int32) + shift, 2, 254).astype(np.uint8)
        return out, 1.0
    at = {T.Q8_0: 0, T.Q4_0: 0, T.Q5_0: 0, T.Q4_K: 0, T.Q6_K: 208}[ggml_type]
    fields = [at, 2] if ggml_type == T.Q4_K else [at]  # Q4_K: d and dmin
    for f in fields:
        half = out[:, f:f + 2].copy().view("<f2").astype(np.float32)
        out[:, f:f + 2] = _f16_bytes(half * np.float32(std))
    return out, 1.0


class _PoolRun:
    """Quacks like the ndarray GGUFWriter.write_tensor_data expects: `nbytes` bytes of pool blocks."""

    def __init__(self, pool: np.ndarray, nbytes: int, start: int):
        self.pool, self.nbytes, self.start = pool.reshape(-1), nbytes, start

    def tofile(self, fout: BinaryIO) -> None:
        left, at = self.nbytes, self.start
        while left:
            chunk = self.pool[at:at + left]
            chunk.tofile(fout)
            left -= chunk.nbytes
            at = 0


def _fan_in_std(name: str, shape: tuple[int, ...]) -> float:
    if name == "token_embd.weight":
        return 0.03  # times sqrt(hidden) = 53 at the input: O(1) activations
    return 1.0 / math.sqrt(shape[-1])


def _vector(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Small float32 tensors: norms and scales near 1, the router's matrix at 1/sqrt(hidden)."""
    if name.endswith("ffn_gate_inp.weight"):
        return rng.normal(0, 1 / math.sqrt(shape[-1]), shape).astype(np.float32)
    return rng.uniform(0.8, 1.2, shape).astype(np.float32)


def write_random_dgf(path: Path, preset: str, layers: int, vocab: int, seed: int = 0) -> dict[str, Any]:
    """Write the file; returns a summary (bytes, tensor count, type mix)."""
    cfg = model_config(layers, vocab)
    rng = np.random.default_rng(seed)
    sliding = [cfg.is_sliding(i) for i in range(layers)]
    pools: dict[T, tuple[np.ndarray, float]] = {}
    payloads: list[object] = []
    mix: dict[str, int] = {}
    with atomic_writer(path) as writer:
        writer.add_name(f"random DiffusionGemma ({preset}, {layers} layers)")
        writer.add_string("dgrun.outtype", preset)
        for key, value in cfg.to_metadata().items():
            add_metadata(writer, key, value)
        for name, shape in tensor_shapes(cfg).items():
            ggml_type = tensor_type(name, shape, preset, layers, sliding)
            if ggml_type == T.F32:
                values = _vector(name, shape, rng)
                writer.add_tensor_info(name, shape, np.dtype(np.float32), values.nbytes)
                payloads.append(values)
                nbytes = values.nbytes
            else:
                if ggml_type not in pools:
                    pools[ggml_type] = block_pool(ggml_type, rng)
                base, _ = pools[ggml_type]
                pool, tensor_scale = scale_pool(base, ggml_type, _fan_in_std(name, shape))
                if ggml_type == T.NVFP4:
                    tensor_scale *= pools[ggml_type][1]
                nbytes = math.prod(shape[:-1]) * row_bytes(ggml_type, shape[-1])
                start = int(rng.integers(0, len(pool))) * pool.shape[1]
                writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=ggml_type)
                payloads.append(_PoolRun(pool, nbytes, start))
                if ggml_type == T.NVFP4:
                    scale = np.array([tensor_scale], np.float32)
                    writer.add_tensor_info(f"{name}.scale", (1,), np.dtype(np.float32), 4)
                    payloads.append(scale)
            mix[ggml_type.name] = mix.get(ggml_type.name, 0) + nbytes
        add_rope_freqs(writer, cfg, payloads)
        write_file(writer, payloads)
    return {"path": str(path), "bytes": path.stat().st_size, "tensors": len(payloads), "type_bytes": mix}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output .dgf path")
    quantized = [p for p in PRESETS if p not in ("f32", "f16", "bf16")]
    parser.add_argument("--preset", default="q4_k_m", choices=quantized)
    parser.add_argument("--layers", type=int, default=RELEASED["num_hidden_layers"], help="decoder layers")
    parser.add_argument("--vocab", type=int, default=RELEASED["vocab_size"], help="vocabulary size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    summary = write_random_dgf(args.out, args.preset, args.layers, args.vocab, args.seed)
    seconds = time.perf_counter() - started
    print(f"wrote {summary['path']}: {int(summary['bytes']) / 2**30:.2f} GiB, {summary['tensors']} tensors "
          f"in {seconds:.1f}s; {summary['type_bytes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
