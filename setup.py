"""Build qgoft: CMake compiles the ops library, the CUDA kernels (with a CUDA build of torch) and the
pybind11 module (docs/BUILD.md).

    pip install .                             # the ops library loads under every torch >= 2.10
    pip install --no-build-isolation -e .     # development: build against the torch you run

The ops library (schemas, CPU kernels) is written against PyTorch's stable ABI: it loads under every torch
from 2.10 on, whichever torch pip's isolated build environment holds. The CUDA kernels use torch's
version-specific C++ API and must be built against the installed torch: when they would be built and the
build environment's torch is another release (an isolated build), or torch is older than 2.10, the build
stops with the command that works.

Environment: QGOFT_CUDA=0/1 forces the CUDA kernels off/on (default: on when the installed torch is a
CUDA build), TORCH_CUDA_ARCH_LIST selects the GPU architectures (default "8.0;9.0+PTX"),
QGOFT_CUDA_PTXAS_VERBOSE=1 prints the kernels' register use, QGOFT_BUILD_JOBS=N sets the parallel build
jobs, QGOFT_BUILD_TYPE=Debug|Release.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# Built next to qgoft/_C*.so; libqgoft_cuda.so only with the CUDA kernels.
EXTRA_OUTPUTS = ("libqgoft_ops.so", "libqgoft_cuda.so", "_build_meta.py")
# The stable-ABI version the ops library targets (also in CMakeLists.txt and pyproject.toml).
TORCH_ABI_FLOOR = (2, 10)

_PROBE = ("import json, torch; print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda, "
          "'file': torch.__file__}))")


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _fail(message: str) -> None:
    sys.exit("\nqgoft: " + message.replace("\n", "\nqgoft: ") + "\n")


def _build_torch():
    try:
        import torch
    except ImportError:
        _fail("building needs PyTorch in the build environment: `pip install .` provides it; with\n"
              "--no-build-isolation install torch>=2.10 first.")
    return torch


def _installed_torch() -> dict | None:
    """The torch of the environment being installed into, which the built library will run with. Under
    pip's build isolation it is hidden from this process (PYTHONPATH points the interpreter at the isolated
    environment), so ask the same interpreter without it. None when that environment has no torch."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                              timeout=300, cwd=str(Path.home()))
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _want_cuda(target: dict) -> bool:
    cuda = os.environ.get("QGOFT_CUDA", "AUTO").upper()
    if cuda in ("0", "OFF", "FALSE", "NO"):
        return False
    if cuda in ("1", "ON", "TRUE", "YES"):
        return True
    if cuda != "AUTO":
        _fail(f"QGOFT_CUDA must be AUTO, ON or OFF (or 0 / 1), got {os.environ['QGOFT_CUDA']!r}")
    return bool(target["cuda"])


def _check_torch(torch, target: dict, cuda: bool) -> None:
    """Stops the build where its result could not serve the installed torch."""
    floor = ".".join(map(str, TORCH_ABI_FLOOR))
    if _release(target["version"]) < TORCH_ABI_FLOOR:
        _fail(f"torch {target['version']} is installed; qgoft needs torch>={floor} (the stable ABI its ops\n"
              f"library uses). Upgrade it, then install qgoft:\n"
              f"    pip install 'torch>={floor}' && pip install .")
    if _release(torch.__version__) < TORCH_ABI_FLOOR:
        _fail(f"the build environment has torch {torch.__version__}; qgoft builds against torch>={floor}:\n"
              f"    pip install 'torch>={floor}' && pip install --no-build-isolation .")
    if not cuda:
        return
    if torch.version.cuda is None:
        _fail(f"the CUDA kernels were requested but the build environment's torch {torch.__version__} is a\n"
              "CPU-only build. Build against the installed CUDA torch, or the CPU kernels only:\n"
              "    pip install --no-build-isolation .\n"
              "    QGOFT_CUDA=0 pip install .")
    if torch.__version__ != target["version"]:
        _fail(f"the CUDA kernels use torch's version-specific C++ API, so they must be built against the\n"
              f"installed torch {target['version']}, but this (isolated) build environment has torch\n"
              f"{torch.__version__}. Build against the installed torch (needs setuptools, cmake and ninja\n"
              f"installed), or install the CPU kernels only:\n"
              f"    pip install 'setuptools>=77' wheel cmake ninja && pip install --no-build-isolation .\n"
              f"    QGOFT_CUDA=0 pip install .")


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        torch = _build_torch()
        target = _installed_torch() or {"version": torch.__version__, "cuda": torch.version.cuda,
                                        "file": torch.__file__}
        cuda = _want_cuda(target)
        _check_torch(torch, target, cuda)
        # Prefer the cmake / ninja installed next to this Python (pip install cmake ninja): pip does not
        # put the environment's bin directory on PATH, and the CUDA build with torch >= 2.14 needs
        # CMake >= 3.26, newer than many system packages.
        bin_dir = Path(sys.executable).parent
        cmake = str(bin_dir / "cmake") if (bin_dir / "cmake").exists() else shutil.which("cmake")
        if cmake is None:
            _fail("cmake not found; `pip install cmake` or install it with your OS")
        ninja = str(bin_dir / "ninja") if (bin_dir / "ninja").exists() else shutil.which("ninja")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        print(f"qgoft: building against torch {torch.__version__} ({Path(torch.__file__).parent}) for the "
              f"installed torch {target['version']}; CUDA kernels: {'ON' if cuda else 'OFF'}")
        args = [
            f"-DQGOFT_TORCH_DIR={Path(torch.__file__).resolve().parent}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('QGOFT_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DQGOFT_PYTHON_INCLUDE_DIR={sysconfig.get_paths()['include']}",
            f"-DQGOFT_PYTHON_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"-DQGOFT_CUDA={'ON' if cuda else 'OFF'}",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ]
        if ninja and not (build_temp / "CMakeCache.txt").exists():
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if os.environ.get("QGOFT_CUDA_PTXAS_VERBOSE", "0") == "1":
            args.append("-DQGOFT_CUDA_PTXAS_VERBOSE=ON")
        jobs = os.environ.get("QGOFT_BUILD_JOBS", str(os.cpu_count() or 1))
        # A library of an earlier build with other options must not be picked up beside the new ones.
        for name in EXTRA_OUTPUTS:
            (out_dir / name).unlink(missing_ok=True)
        subprocess.check_call([cmake, "-S", str(ROOT), "-B", str(build_temp), *args])
        subprocess.check_call([cmake, "--build", str(build_temp), "--parallel", jobs])

    def _extra_outputs(self, ext: Extension, in_source: bool) -> list[Path]:
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent
        return [out_dir / name for name in EXTRA_OUTPUTS]

    def copy_extensions_to_source(self) -> None:
        # `build_ext --inplace` builds into build/ and copies only the extension module itself into the
        # source tree; the libraries and the metadata sit beside it.
        super().copy_extensions_to_source()
        for ext in self.extensions:
            build_dir = Path(self.build_lib) / Path(*ext.name.split(".")[:-1])
            src_dir = ROOT / Path(*ext.name.split(".")[:-1])
            for name in EXTRA_OUTPUTS:
                (src_dir / name).unlink(missing_ok=True)
                if (build_dir / name).exists():
                    shutil.copy2(build_dir / name, src_dir / name)

    def get_outputs(self):  # include the libraries and metadata in wheels / editable mappings
        outputs = super().get_outputs()
        for ext in self.extensions:
            outputs += [str(p) for p in self._extra_outputs(ext, False) if p.exists()]
        return outputs


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import the checks
    setup(
        ext_modules=[CMakeExtension("qgoft._C")],
        cmdclass={"build_ext": CMakeBuild},
    )
