"""How much each quantization preset moves the decoder's output: relative L2 error of the logits, KL divergence
and top-1 agreement against the float32 file of the same checkpoint, on the numpy reference backend (float32
arithmetic) and, where the cpu backend runs, with its integer arithmetic on (activations quantized to int8 per 32
values, as ggml does; BF16 files' activations rounded to bfloat16 on the kernel sets that take them: the "int8"
columns, on by default there).

    python tools/quant_quality.py CHECKPOINT_DIR            # converts to every preset in a temp folder
    python tools/quant_quality.py --f32 a.dgf b.dgf c.dgf   # compare given files against a float32 file
    python tools/quant_quality.py --int8-kernels generic …  # the int8 columns from a given kernel set
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import dgrun
from dgrun.converters.convert_hf import ConversionError, convert
from dgrun.converters.presets import PRESETS
from dgrun.sampler import log_softmax


@dataclass
class Quality:
    outtype: str
    bits_per_weight: float
    rel_l2: float
    kl: float
    top1: float
    int8: tuple[float, float, float] | None = None  # (rel L2, KL, top-1) with the cpu backend's int8 arithmetic


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Environment variables set for the block, then restored."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def int8_kernels(name: str = "auto") -> str | None:
    """The cpu backend's int8 kernel set `name` ("auto": the best this CPU runs) as it names itself, or None where
    the cpu backend does not run or has no such set."""
    try:
        from dgrun.backends.cpu_backend import CpuBackend

        return CpuBackend(int8=name).int8_isa
    except (ImportError, RuntimeError):
        return None


def decoder_logits(path: Path, prompt: np.ndarray, canvas: np.ndarray, backend: str = "numpy",
                   int8: str = "auto") -> np.ndarray:
    """Logits of the second decoder step (self-conditioned on the first), so both decoder paths are covered;
    backend "cpu-int8" is the cpu backend with its integer arithmetic on, from kernel set `int8`."""
    if backend == "cpu-int8":
        with _environment(DGRUN_CPU_INT8=int8):
            return decoder_logits(path, prompt, canvas, "cpu")
    with dgrun.load(path, backend=backend) as model:
        cache = model.graph.new_cache()
        model.graph.encode(prompt, cache)
        first = model.graph.decode(canvas, cache, None)
        return np.asarray(model.graph.decode(canvas, cache, first / np.float32(0.8)))


def compare(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float, float]:
    """(‖q−ref‖/‖ref‖, mean KL(ref‖q) in nats, fraction of positions with the same argmax)."""
    rel = float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))
    log_p, log_q = log_softmax(reference.astype(np.float64)), log_softmax(logits.astype(np.float64))
    kl = float((np.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean())
    top1 = float((reference.argmax(-1) == logits.argmax(-1)).mean())
    return rel, kl, top1


def measure(files: dict[str, Path], f32: Path, seed: int = 0, int8: str | None = None) -> list[Quality]:
    """Quality of each file against the float32 file, on a seeded prompt and canvas; with `int8`, a kernel set of
    the cpu backend ("auto": the best here), also with its integer arithmetic."""
    with dgrun.load(f32, backend="numpy") as model:
        vocab, canvas_length = model.config.vocab_size, model.config.canvas_length
    rng = np.random.default_rng(seed)
    prompt, canvas = rng.integers(0, vocab, 24), rng.integers(0, vocab, canvas_length)
    reference = decoder_logits(f32, prompt, canvas)
    out = []
    for outtype, path in files.items():
        with dgrun.format.GGUFFile(path) as f:
            weights = [t for t in f.tensors.values() if not t.name.startswith("tokenizer.")]
            bits = 8 * sum(t.nbytes for t in weights) / sum(t.n_elements for t in weights)
        quality = Quality(outtype, bits, *compare(reference, decoder_logits(path, prompt, canvas)))
        if int8:
            quality.int8 = compare(reference, decoder_logits(path, prompt, canvas, "cpu-int8", int8))
        out.append(quality)
    return out


def convert_all(checkpoint: Path, workdir: Path, outtypes: list[str]) -> dict[str, Path]:
    """Convert to each preset; a preset whose conversion fails is left out with a one-line notice (rows that do
    not fit a preset's blocks no longer fail: they fall back, see converters/presets.py)."""
    files = {}
    for outtype in outtypes:
        try:
            convert(checkpoint, workdir / f"{outtype}.dgf", outtype, quiet=True)
        except ConversionError as e:
            print(f"skipping {outtype}: {e}", file=sys.stderr)
            continue
        files[outtype] = workdir / f"{outtype}.dgf"
    return files


def format_table(rows: list[Quality]) -> str:
    int8 = any(r.int8 is not None for r in rows)
    head = f"{'outtype':<10} {'bits/w':>7} {'rel L2':>9} {'KL (nats)':>10} {'top-1':>7}"
    lines = [head + (f"   {'int8: rel L2':>12} {'KL':>9} {'top-1':>7}" if int8 else "")]
    for r in rows:
        line = f"{r.outtype:<10} {r.bits_per_weight:>7.2f} {r.rel_l2:>9.2e} {r.kl:>10.2e} {r.top1:>7.1%}"
        if r.int8 is not None:
            line += f"   {r.int8[0]:>12.2e} {r.int8[1]:>9.2e} {r.int8[2]:>7.1%}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="a checkpoint folder, or .dgf files with --f32")
    parser.add_argument("--f32", type=Path, help="the float32 .dgf to compare the given files against")
    parser.add_argument("--outtypes", default=",".join(PRESETS), help="presets to convert a checkpoint to")
    parser.add_argument("--no-int8", action="store_true", help="leave out the cpu backend's int8 columns")
    parser.add_argument("--int8-kernels", default="auto", metavar="SET",
                        help="the int8 columns' kernel set (default: the best this CPU runs); generic computes "
                             "BF16 files' bfloat16 products on any CPU")
    args = parser.parse_args(argv)
    kernels = None if args.no_int8 else int8_kernels(args.int8_kernels)
    if kernels is None and not args.no_int8 and args.int8_kernels != "auto":
        parser.error(f"the cpu backend has no int8 kernel set {args.int8_kernels!r} on this CPU or build")
    unknown = set(args.outtypes.split(",")) - set(PRESETS)
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(sorted(unknown))}; choose from {', '.join(PRESETS)}")
    if args.f32:
        rows = measure({p.stem: p for p in args.inputs}, args.f32, int8=kernels)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            files = convert_all(args.inputs[0], Path(tmp), args.outtypes.split(","))
            f32 = convert_all(args.inputs[0], Path(tmp), ["f32"])
            if "f32" not in f32:
                return 2
            rows = measure(files, f32["f32"], int8=kernels)
    if kernels is not None:
        print(f"# int8 columns: the cpu backend's integer arithmetic, kernel set {kernels}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
