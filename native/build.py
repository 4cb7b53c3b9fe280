"""Build dgrun's native libraries: libdgcuda.so (nvcc) and libdghost.so (g++, for CI tests without a GPU).

    python native/build.py                 # both, CUDA for sm_80 sm_86 sm_89 sm_90 sm_120 (+ PTX)
    DGRUN_CUDA_ARCH=90 python native/build.py --cuda      # one architecture (fast, while iterating)
    DGRUN_CUDA_ARCH=native python native/build.py --cuda  # the GPU in this machine

Outputs go to native/build/ (or --out), each library beside a copy of its C header, which is what the
Python loaders read with cffi. Stdlib only, so setup.py can run it before anything is installed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NATIVE = Path(__file__).resolve().parent
DEFAULT_OUT = NATIVE / "build"
CUDA_SOURCES = sorted(NATIVE.glob("*.cu"))
DEFAULT_ARCHES = ["80", "86", "89", "90", "120"]
# No fast math: expf/tanhf/division must stay IEEE-accurate for the comparisons against numpy.
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo", "-Xcompiler", "-fPIC"]


class BuildError(RuntimeError):
    """A compiler is missing or failed; the message carries its output."""


def cuda_arch_flags(arch: str | None = None) -> list[str]:
    """-gencode flags for DGRUN_CUDA_ARCH ("90", "86,90", "native") or every default target plus PTX."""
    arch = arch if arch is not None else os.environ.get("DGRUN_CUDA_ARCH", "")
    if arch.strip() == "native":
        return ["-arch=native"]
    arches = [a.strip().removeprefix("sm_") for a in arch.split(",") if a.strip()] or DEFAULT_ARCHES
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arches]
    # PTX of the newest target, so a newer GPU can still JIT-compile the kernels.
    return [*flags, f"-gencode=arch=compute_{arches[-1]},code=compute_{arches[-1]}"]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise BuildError(f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def find_nvcc() -> str | None:
    """nvcc on PATH, else under CUDA_HOME / the usual install prefix."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def build_cuda(out: Path = DEFAULT_OUT, arch: str | None = None, jobs: int = 2) -> Path:
    """Compile every .cu (in parallel) and link libdgcuda.so; returns its path."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found: install the CUDA toolkit or put nvcc on PATH")
    out.mkdir(parents=True, exist_ok=True)
    flags = [*NVCC_FLAGS, *cuda_arch_flags(arch)]
    objects = [out / f"{src.stem}.o" for src in CUDA_SOURCES]
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(lambda so: _run([nvcc, *flags, "-c", str(so[0]), "-o", str(so[1])]),
                      zip(CUDA_SOURCES, objects, strict=True)))
    lib = out / "libdgcuda.so"
    exports = f"-Xlinker=--version-script={NATIVE / 'dg_exports.map'}"
    _run([nvcc, *flags, "-shared", exports, *map(str, objects), "-o", str(lib)])
    shutil.copyfile(NATIVE / "dg_cuda.h", out / "dg_cuda.h")
    for obj in objects:
        obj.unlink()
    return lib


def build_host(out: Path = DEFAULT_OUT) -> Path:
    """Compile dg_math.cuh's host build into libdghost.so; returns its path."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise BuildError("no C++ compiler found (set CXX or install g++)")
    out.mkdir(parents=True, exist_ok=True)
    lib = out / "libdghost.so"
    # -ffp-contract=off: never fuse a multiply-add that numpy rounds twice.
    _run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-ffp-contract=off", "-fPIC", "-shared",
          str(NATIVE / "dg_host.cpp"), "-o", str(lib)])
    shutil.copyfile(NATIVE / "dg_host.h", out / "dg_host.h")
    return lib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="build libdgcuda.so only")
    parser.add_argument("--host", action="store_true", help="build libdghost.so only")
    parser.add_argument("--arch", help="CUDA architectures, e.g. 90 or 86,90 or native (default: "
                                       f"DGRUN_CUDA_ARCH or {','.join(DEFAULT_ARCHES)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: native/build)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes")
    args = parser.parse_args(argv)
    both = not (args.cuda or args.host)
    try:
        if args.host or both:
            print(f"built {build_host(args.out)}")
        if args.cuda or both:
            print(f"built {build_cuda(args.out, args.arch, args.jobs)}")
    except BuildError as e:
        print(f"build failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
