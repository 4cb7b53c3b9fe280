"""Build hook for `pip install .`: put dgrun's native parts into the package.

The cpu kernels' C sources are copied in (the cpu backend compiles them on first use, for the CPU it runs on);
the CUDA library is compiled here when nvcc is present.

Everything else about the package lives in pyproject.toml. Native parts are optional by design: a missing
compiler or a failed build prints a note and the install carries on, and the backend concerned then reports
itself unavailable with the command that builds it. Set DGRUN_BUILD_CUDA=0 to skip the CUDA build, and
DGRUN_CUDA_ARCH (e.g. "90" or "native") to build for fewer GPU architectures than the default five.
A wheel that carries the CUDA library is tagged `py3-none-<platform>` (e.g. linux_x86_64; `auditwheel repair` it
before publishing), one without it `py3-none-any`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent


def _load(script: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_dgrun_build_{script.parent.name}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _note(message: str) -> None:
    print(f"dgrun: {message}", file=sys.stderr)


@cache
def _cuda_build_wanted() -> ModuleType | None:
    """native/build.py when the CUDA library is to be built here (nvcc present, not turned off), else None."""
    script = ROOT / "native" / "build.py"
    if os.environ.get("DGRUN_BUILD_CUDA", "1") == "0" or not script.is_file():
        return None
    try:
        native = _load(script)
        found = native.find_nvcc()
    except Exception as e:  # noqa: BLE001 - asked from has_ext_modules too: it must never fail an install
        _note(f"cannot load native/build.py, installing without the cuda backend: {e}")
        return None
    if found is None:
        _note("nvcc not found: installing without the cuda backend (reinstall with nvcc on PATH)")
        return None
    return native


class BuildPyWithNative(build_py):
    """build_py, then the native libraries into the build tree (never failing the install)."""

    def run(self) -> None:
        super().run()
        self.copy_cpu_sources()
        self.build_cuda()

    def copy_cpu_sources(self) -> None:
        """Ship the cpu kernels' C sources in the package: the cpu backend compiles them on first use, per CPU."""
        source = ROOT / "native" / "cpu"
        if not source.is_dir():
            return
        target = Path(self.build_lib) / "dgrun" / "backends" / "_native_cpu"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.iterdir()):
            if path.suffix in (".py", ".c", ".h"):
                shutil.copy2(path, target / path.name)

    def build_cuda(self) -> None:
        native = _cuda_build_wanted()
        if native is None:
            return
        try:
            target = Path(self.build_lib) / "dgrun" / "backends" / "_native"
            _note(f"building libdgcuda.so into {target} (takes a minute or two)")
            native.build_cuda(target, jobs=os.cpu_count() or 2)
        except Exception as e:  # noqa: BLE001 - a failed optional build must not fail the install
            _note(f"the CUDA build failed, installing without the cuda backend: {e}")


class DistributionWithCuda(Distribution):
    """Not a pure-Python distribution when libdgcuda.so will be built: installed to platlib, and the wheel gets a
    platform tag. Decided before the build, from whether it will be attempted; a build that then fails leaves a
    platform-tagged wheel without the library (still correct, only narrower than needed)."""

    def has_ext_modules(self) -> bool:
        return super().has_ext_modules() or _cuda_build_wanted() is not None


class WheelForAnyPython3(bdist_wheel):
    """`py3-none-<platform>`, not `cp3XX-cp3XX-<platform>`: the library is loaded through cffi's ABI mode, so it
    does not depend on the Python version or its ABI."""

    def get_tag(self) -> tuple[str, str, str]:
        python, abi, platform = super().get_tag()
        return (python, abi, platform) if self.root_is_pure else ("py3", "none", platform)


setup(distclass=DistributionWithCuda, cmdclass={"build_py": BuildPyWithNative, "bdist_wheel": WheelForAnyPython3})
