"""Build qgoft: CMake compiles the ops library and the pybind11 module against the installed torch.

    pip install --no-build-isolation .        # or -e . for development

Environment: QGOFT_CUDA=0/1 forces the CUDA kernels off/on (default: auto-detect, i.e. on with a CUDA
build of torch), TORCH_CUDA_ARCH_LIST selects the GPU architectures (default "8.0;9.0+PTX"),
QGOFT_CUDA_PTXAS_VERBOSE=1 prints the kernels' register use, QGOFT_BUILD_JOBS=N sets the parallel build
jobs, QGOFT_BUILD_TYPE=Debug|Release.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
OPS_LIBRARY = "libqgoft_ops.so"


def _require_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit(
            "qgoft: building needs PyTorch installed in the build environment.\n"
            "Install torch first (e.g. `pip install torch`), then build without isolation:\n"
            "    pip install --no-build-isolation .")
    return torch


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        torch = _require_torch()
        # Prefer the cmake / ninja installed next to this Python (pip install cmake ninja): pip does not
        # put the environment's bin directory on PATH, and the CUDA build with torch >= 2.14 needs
        # CMake >= 3.26, newer than many system packages.
        bin_dir = Path(sys.executable).parent
        cmake = str(bin_dir / "cmake") if (bin_dir / "cmake").exists() else shutil.which("cmake")
        if cmake is None:
            sys.exit("qgoft: cmake not found; `pip install cmake` or install it with your OS")
        ninja = str(bin_dir / "ninja") if (bin_dir / "ninja").exists() else shutil.which("ninja")
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = ext_path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)

        cuda = os.environ.get("QGOFT_CUDA", "AUTO").upper()
        cuda = {"0": "OFF", "1": "ON", "FALSE": "OFF", "TRUE": "ON"}.get(cuda, cuda)
        args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('QGOFT_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DQGOFT_PYTHON_INCLUDE_DIR={sysconfig.get_paths()['include']}",
            f"-DQGOFT_PYTHON_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"-DQGOFT_CUDA={cuda}",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ]
        if ninja and not (build_temp / "CMakeCache.txt").exists():
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if os.environ.get("QGOFT_CUDA_PTXAS_VERBOSE", "0") == "1":
            args.append("-DQGOFT_CUDA_PTXAS_VERBOSE=ON")
        jobs = os.environ.get("QGOFT_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call([cmake, "-S", str(ROOT), "-B", str(build_temp), *args])
        subprocess.check_call([cmake, "--build", str(build_temp), "--parallel", jobs])

        # Record what the binaries were built against: qgoft refuses (with a warning) to load them
        # under another torch and falls back to the reference implementation.
        (out_dir / "_build_meta.py").write_text(
            "# Written by setup.py at build time.\n"
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"CUDA_REQUESTED = {cuda!r}\n")
        if self.inplace or getattr(self, "editable_mode", False):
            # setuptools copies only the extension module itself into the source tree; the ops
            # library and the metadata sit beside it.
            src_dir = ROOT / "qgoft"
            if src_dir.resolve() != out_dir:
                for name in (OPS_LIBRARY, "_build_meta.py"):
                    shutil.copy2(out_dir / name, src_dir / name)

    def get_outputs(self):  # include the ops library and metadata in wheels / editable mappings
        outputs = super().get_outputs()
        extra = []
        for ext in self.extensions:
            out_dir = Path(self.get_ext_fullpath(ext.name)).parent
            extra += [str(out_dir / OPS_LIBRARY), str(out_dir / "_build_meta.py")]
        return outputs + extra


setup(
    ext_modules=[CMakeExtension("qgoft._C")],
    cmdclass={"build_ext": CMakeBuild},
)
