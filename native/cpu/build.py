"""Build and load dgrun's CPU kernels (libdgcpu), a plain C library used through cffi's ABI mode.

    python native/cpu/build.py                # build into the cache (what the cpu backend does on first use)
    python native/cpu/build.py --out DIR      # build into DIR; `--out native/cpu` prebuilds for an install

The library is compiled with the system C compiler ($CC, else cc / gcc / clang) and OpenMP when the compiler
has it. `dg_kernels.c` is compiled once per kernel set (x86-64: avx512, avx2 and generic; elsewhere generic)
and the library picks the widest one the CPU supports at run time, so a build runs on any CPU of its
architecture — no -march=native. No Python headers are needed (ABI mode), only a C compiler.

The cache key hashes the sources, flags and compiler version, so an edited kernel rebuilds itself. Cache folder:
$DGRUN_CACHE_DIR, else $XDG_CACHE_HOME/dgrun, else ~/.cache/dgrun. $DGRUN_CPU_LIB names a prebuilt library to
load instead (it must come from the same sources). Stdlib + cffi only, so an installer can run it early.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

NATIVE_CPU = Path(__file__).resolve().parent
HEADER = NATIVE_CPU / "dg_cpu.h"
SOURCES = ["dg_cpu.c", "dg_kernels.c", "dg_int8.c"]
DEPENDS = ["dg_cpu.h", "dg_internal.h", "dg_quants_iq.h", "dg_iq_tables.h", "dg_vmath.h", "build.py"]
LIB_NAME = "libdgcpu.dylib" if sys.platform == "darwin" else "libdgcpu.so"
# No -ffast-math: -inf masks, NaN checks and IEEE division must behave. Contraction into FMA is fine.
BASE_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-fno-math-errno", "-ffp-contract=fast", "-Wall", "-Wno-unknown-pragmas"]
X86_KERNEL_SETS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}
# dg_int8.c's sets (integer dot products): VNNI in 256-bit registers, or AVX2's vpmaddubsw; avx512bf16 is the
# avx512vnni set plus BF16 weights' bfloat16 dot products (512-bit VDPBF16PS).
X86_INT8_SETS = {
    "avx512bf16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16", "-mavx2", "-mfma",
                   "-mf16c"],
    "avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"],
    "avxvnni": ["-mavxvnni", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}
# ... and on arm64: USDOT (u8 x s8, i8mm) or SDOT (s8 x s8, dotprod).
ARM_INT8_SETS = {
    "i8mm": ["-march=armv8.6-a+i8mm+dotprod"],
    "dotprod": ["-march=armv8.2-a+dotprod"],
}


NO_COMPILER = ("no C compiler found: the cpu backend builds its kernels once with one. Install gcc or clang "
               "(e.g. `apt install gcc`, `xcode-select --install`) or set $CC to one, or use --backend numpy")


class BuildError(RuntimeError):
    """No C compiler, or it failed; the message says how to fix it."""


def find_compiler() -> str | None:
    """$CC (None when it names no executable), else the first of cc, gcc, clang on PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def kernel_sets() -> dict[str, list[str]]:
    """Kernel set name → extra compiler flags, for this machine's architecture (generic always last)."""
    return {**(X86_KERNEL_SETS if _x86() else {}), "generic": []}


def int8_sets() -> dict[str, list[str]]:
    """dg_int8.c's kernel sets → extra compiler flags, as `kernel_sets`."""
    arm = platform.machine().lower() in ("arm64", "aarch64")
    return {**(X86_INT8_SETS if _x86() else ARM_INT8_SETS if arm else {}), "generic": []}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def _compiler_version(cc: str) -> str:
    proc = _run([cc, "--version"])
    return proc.stdout.splitlines()[0] if proc.returncode == 0 and proc.stdout else cc


def _openmp_flags(cc: str, workdir: Path) -> list[str]:
    """["-fopenmp"] when the compiler can build and link an OpenMP program, else []."""
    probe = workdir / "omp_probe.c"
    probe.write_text("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
    proc = _run([cc, "-fopenmp", str(probe), "-o", str(workdir / "omp_probe")])
    return ["-fopenmp"] if proc.returncode == 0 else []


def source_hash() -> str:
    """Hash of the sources alone: stamps a library built ahead of time (see `library_path`)."""
    h = hashlib.sha256()
    for name in [*SOURCES, *DEPENDS]:
        h.update(name.encode() + b"\0" + (NATIVE_CPU / name).read_bytes())
    return h.hexdigest()[:16]


def cache_key(cc: str) -> str:
    """Hash of the sources, flags, compiler and platform: a changed kernel never loads a stale library."""
    h = hashlib.sha256()
    for name in [*SOURCES, *DEPENDS]:
        h.update(name.encode() + b"\0" + (NATIVE_CPU / name).read_bytes())
    h.update(repr((BASE_FLAGS, kernel_sets(), int8_sets(), _compiler_version(cc), platform.machine(),
                   sys.platform)).encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    if os.environ.get("DGRUN_CACHE_DIR"):
        return Path(os.environ["DGRUN_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dgrun"


def build(out_dir: Path, cc: str | None = None, quiet: bool = True) -> Path:
    """Compile the library into `out_dir` (atomically: concurrent builders never see a half-written file)."""
    cc = cc or find_compiler()
    if cc is None:
        raise BuildError(NO_COMPILER)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        work = Path(tmp)
        omp = _openmp_flags(cc, work)
        if not omp and not quiet:
            print(f"dgrun: {cc} has no OpenMP; the cpu kernels will run on one thread", file=sys.stderr)
        objects, defines = [], []
        for source, prefix, sets in (("dg_kernels.c", "", kernel_sets()), ("dg_int8.c", "INT8_", int8_sets())):
            for name, flags in sets.items():
                obj = work / f"{Path(source).stem}_{name}.o"
                cmd = [cc, *BASE_FLAGS, *omp, *flags, f"-DDG_{prefix or 'ISA_'}{name.upper()}", "-c",
                       str(NATIVE_CPU / source), "-o", str(obj)]
                proc = _run(cmd)
                if proc.returncode:
                    if name == "generic":
                        raise BuildError(f"compiling the cpu kernels failed:\n{' '.join(cmd)}\n{proc.stderr}")
                    if not quiet:  # an old compiler without this instruction set: the others still work
                        print(f"dgrun: skipping the {prefix.lower()}{name} kernels ({cc} cannot build them)",
                              file=sys.stderr)
                    continue
                objects.append(obj)
                if name != "generic":
                    defines.append(f"-DDG_HAVE_{prefix}{name.upper()}")
        obj = work / "dg_cpu.o"
        defines.append(f'-DDG_SOURCE_HASH="{source_hash()}"')
        cmd = [cc, *BASE_FLAGS, *omp, *defines, "-c", str(NATIVE_CPU / "dg_cpu.c"), "-o", str(obj)]
        proc = _run(cmd)
        if proc.returncode:
            raise BuildError(f"compiling the cpu kernels failed:\n{' '.join(cmd)}\n{proc.stderr}")
        lib = work / LIB_NAME
        cmd = [cc, "-shared", *omp, str(obj), *map(str, objects), "-o", str(lib), "-lm"]
        proc = _run(cmd)
        if proc.returncode:
            raise BuildError(f"linking the cpu kernels failed:\n{' '.join(cmd)}\n{proc.stderr}")
        final = out_dir / LIB_NAME
        os.replace(lib, final)
    return final


def cdef() -> str:
    """The C declarations for cffi: dg_cpu.h without its preprocessor lines."""
    return "\n".join(line for line in HEADER.read_text().splitlines() if not line.lstrip().startswith("#"))


def library_path(quiet: bool = True) -> Path:
    """$DGRUN_CPU_LIB, else the per-user cache's build for these sources and this compiler (built on first use)."""
    if os.environ.get("DGRUN_CPU_LIB"):
        return Path(os.environ["DGRUN_CPU_LIB"])
    cc = find_compiler()
    if cc is None:
        raise BuildError(NO_COMPILER)
    out = default_cache_dir() / "cpu" / cache_key(cc)
    if not (out / LIB_NAME).is_file():
        build(out, cc, quiet=quiet)
    return out / LIB_NAME


def load(quiet: bool = True) -> tuple[Any, Any, Path]:
    """(ffi, lib, path) of the CPU kernel library. Raises BuildError.

    A library built ahead of time beside these sources (an install step ran `build.py --out` on this folder)
    is used when it was built from these very sources (it carries their hash), so an installed copy needs no
    compiler and an edited checkout never runs stale kernels; otherwise `library_path`.
    """
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(cdef())
    prebuilt = NATIVE_CPU / LIB_NAME
    if not os.environ.get("DGRUN_CPU_LIB") and prebuilt.is_file():
        try:
            lib = ffi.dlopen(str(prebuilt))
            if ffi.string(lib.dg_source_hash()).decode() == source_hash():
                return ffi, lib, prebuilt
        except (OSError, AttributeError):  # not loadable here, or older than dg_source_hash
            pass
    path = library_path(quiet)
    try:
        lib = ffi.dlopen(str(path))
    except OSError as e:
        raise BuildError(f"cannot load {path}: {e}") from None
    return ffi, lib, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output folder (default: the per-user cache)")
    args = parser.parse_args()
    try:
        path = build(args.out, quiet=False) if args.out else library_path(quiet=False)
    except BuildError as e:
        sys.exit(f"error: {e}")
    print(path)


if __name__ == "__main__":
    main()
