"""Check that nvcc contracted no multiply-add into an FMA in dgrun's CUDA kernels (no GPU needed).

    python tools/check_ptx_fma.py                  # every native/*.cu
    python tools/check_ptx_fma.py native/dg_sampler.cu

Why: the kernels' per-element math (native/dg_math.cuh) is pinned bit for bit by host tests against a g++ build
with -ffp-contract=off (tests/test_native_host.py). nvcc, by default, fuses `a * b + c` into one FMA — one
rounding instead of two — so a contracted kernel would compute something the host tests never saw, and at the
sampler's entropy bound a one-ulp difference can flip an acceptance. Each kernel must therefore compile to as many
`fma.rn.f32` instructions with the library's flags as with -fmad=false: only the FMAs written on purpose (the
matmuls' fmaf accumulation, libdevice's expf) remain. Compares the PTX of one virtual architecture; exits 1 and
names the kernels when any differ. Run by tools/check_cuda_compile.sh.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FMA = re.compile(r"\bfma\.rn(?:\.ftz)?\.f32\b")


def _build_module():
    spec = importlib.util.spec_from_file_location("dg_native_build", REPO / "native" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fma_per_kernel(nvcc: str, flags: list[str], source: Path, out: Path) -> dict[str, int]:
    """fma.rn.f32 instructions per kernel entry in the PTX of `source` (compute_80)."""
    cmd = [nvcc, *flags, "-gencode=arch=compute_80,code=compute_80", "-ptx", str(source), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    entries = re.split(r"^(?:\.visible )?\.entry ", out.read_text(), flags=re.M)[1:]
    return {entry.split("(", 1)[0].strip(): len(FMA.findall(entry)) for entry in entries}


def contracted_fmas(nvcc: str, flags: list[str], source: Path, workdir: Path) -> dict[str, int]:
    """Kernel → FMAs nvcc added on its own (the count with `flags` minus the count with -fmad=false)."""
    with ThreadPoolExecutor(2) as pool:
        default, separate = pool.map(
            lambda args: fma_per_kernel(nvcc, args[0], source, workdir / f"{source.stem}.{args[1]}.ptx"),
            [(flags, "default"), ([*flags, "-fmad=false"], "nofmad")])
    return {name: default[name] - separate.get(name, 0) for name in default if default[name] != separate.get(name)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", type=Path, help="CUDA sources (default: every native/*.cu)")
    args = parser.parse_args(argv)
    build = _build_module()
    nvcc = shutil.which(os.environ.get("NVCC", "")) or build.find_nvcc()
    if nvcc is None:
        print("nvcc not found", file=sys.stderr)
        return 1
    flags = [f for f in build.NVCC_FLAGS if f != "-lineinfo"]
    sources = args.sources or sorted((REPO / "native").glob("*.cu"))
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for source in sources:
            extra = contracted_fmas(nvcc, flags, source, Path(tmp))
            if extra:
                failed = True
                for kernel, count in sorted(extra.items()):
                    print(f"FAIL {source.name}: {kernel} has {count} FMA(s) nvcc contracted")
            else:
                print(f"ok   {source.name}: no contracted FMA")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
