"""Build hook for `pip install .`: put dgrun's native parts into the package.

The cpu kernels' C sources are copied in (the cpu backend compiles them on first use, for the CPU it runs on);
the CUDA library is compiled here when nvcc is present.

Everything else about the package lives in pyproject.toml. Native parts are optional by design: a missing
compiler or a failed build prints a note and the install carries on, and the backend concerned then reports
itself unavailable with the command that builds it. Set DGRUN_BUILD_CUDA=0 to skip the CUDA build, and
DGRUN_CUDA_ARCH (e.g. "90" or "native") to build for fewer GPU architectures than the default five.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load(script: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_dgrun_build_{script.parent.name}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _note(message: str) -> None:
    print(f"dgrun: {message}", file=sys.stderr)


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
        script = ROOT / "native" / "build.py"
        if os.environ.get("DGRUN_BUILD_CUDA", "1") == "0" or not script.is_file():
            return
        try:
            native = _load(script)
            if native.find_nvcc() is None:
                _note("nvcc not found: installing without the cuda backend (reinstall with nvcc on PATH)")
                return
            target = Path(self.build_lib) / "dgrun" / "backends" / "_native"
            _note(f"building libdgcuda.so into {target} (takes a minute or two)")
            native.build_cuda(target, jobs=os.cpu_count() or 2)
        except Exception as e:  # noqa: BLE001 - a failed optional build must not fail the install
            _note(f"the CUDA build failed, installing without the cuda backend: {e}")


setup(cmdclass={"build_py": BuildPyWithNative})
