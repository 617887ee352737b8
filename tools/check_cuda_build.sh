#!/usr/bin/env bash
# Proves, on a machine WITHOUT a GPU, that qgoft's CUDA backend compiles, links, loads and registers its
# kernels (run by .ci/run after the test suite):
#   1. creates (or reuses) a separate virtual environment with the CUDA 13.0 build of torch
#      (default torch==2.14.1; its headers need C++20 and so CMake >= 3.26, installed from pip there),
#   2. builds the full extension with QGOFT_CUDA=ON (libqgoft_ops.so on the stable ABI, libqgoft_cuda.so,
#      qgoft._C, _build_meta.py) into a separate build directory and stages the package there (the
#      checkout's own build in qgoft/ is left untouched),
#   3. imports the staged package and checks through the dispatcher that the four ops have CPU and CUDA
#      kernels, and that qgoft.build_info() reports the CUDA kernels compiled and loaded,
#   4. runs tests/test_cuda.py, which must skip cleanly without a GPU (and runs for real with one),
#   5. builds the host emulation of the CUDA kernels (csrc/cuda/sim: the same kernel source and launch
#      planning, compiled with g++, CUDA threads emulated) and checks every kernel path against a float64
#      reference (QGOFT_CUDA_SIM=quick|full|off, default quick: ~1000 cases, ~1 minute on 2 cores).
# Needs nvcc (CUDA 13.0; CUDACXX, CUDA_HOME, PATH or /usr/local/cuda). Environment: QGOFT_CUDA_VENV
# (default .venv-cuda), QGOFT_CUDA_TORCH (default torch==2.14.1), QGOFT_CUDA_BUILD_DIR (default
# build/cuda-check), TORCH_CUDA_ARCH_LIST (default: the build's own, sm_80 + sm_90 + PTX),
# QGOFT_BUILD_JOBS, PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${QGOFT_CUDA_VENV:-.venv-cuda}"
TORCH_SPEC="${QGOFT_CUDA_TORCH:-torch==2.14.1}"
BUILD="${QGOFT_CUDA_BUILD_DIR:-build/cuda-check}"
case "$BUILD" in /*) ;; *) BUILD="$ROOT/$BUILD" ;; esac
PYTHON="${PYTHON:-python3}"
JOBS="${QGOFT_BUILD_JOBS:-$(nproc)}"

fail() { echo "check_cuda_build: FAILED: $*" >&2; exit 1; }
step() { echo "check_cuda_build: $*"; }

NVCC="${CUDACXX:-}"
if [ -z "$NVCC" ]; then
  for c in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" /usr/local/cuda/bin/nvcc "$(command -v nvcc || true)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then NVCC="$c"; break; fi
  done
fi
[ -n "$NVCC" ] && [ -x "$NVCC" ] || fail "nvcc not found (set CUDACXX or CUDA_HOME)"
step "nvcc: $NVCC ($("$NVCC" --version | tail -1))"

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$ROOT/$VENV/bin/python"
case "$VENV" in /*) PY="$VENV/bin/python" ;; esac
"$PY" -m pip install -q "$TORCH_SPEC" numpy pytest "setuptools>=77" wheel "cmake>=3.26" ninja
VBIN="$(dirname "$PY")"
"$PY" - <<'EOF' || fail "the venv's torch is not a CUDA build"
import torch
print(f"check_cuda_build: torch {torch.__version__}, CUDA {torch.version.cuda}")
assert torch.version.cuda, "torch.version.cuda is None"
EOF

STAGE="$BUILD/stage"
rm -rf "$STAGE"
mkdir -p "$STAGE/qgoft"
# the Python package without any binaries or build metadata of the checkout
(cd qgoft && find . -name '*.py' -not -name '_build_meta.py' -not -path '*/__pycache__/*' -print0 |
  xargs -0 -I{} cp --parents {} "$STAGE/qgoft/")

TORCH_PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
PY_INCLUDE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
EXT_SUFFIX="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
step "configuring (build dir $BUILD/cmake)"
start=$(date +%s)
"$VBIN/cmake" -S . -B "$BUILD/cmake" -G Ninja -DCMAKE_MAKE_PROGRAM="$VBIN/ninja" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DCMAKE_CUDA_COMPILER="$NVCC" \
  -DQGOFT_CUDA=ON -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$STAGE/qgoft" \
  -DQGOFT_PYTHON_INCLUDE_DIR="$PY_INCLUDE" -DQGOFT_PYTHON_EXT_SUFFIX="$EXT_SUFFIX" \
  -DPython3_EXECUTABLE="$PY" > "$BUILD/configure.log" 2>&1 || { cat "$BUILD/configure.log"; fail "cmake configure"; }
grep -E "qgoft:" "$BUILD/configure.log" || true
step "building with $JOBS jobs"
"$VBIN/cmake" --build "$BUILD/cmake" --parallel "$JOBS" > "$BUILD/build.log" 2>&1 ||
  { tail -100 "$BUILD/build.log"; fail "build (full log: $BUILD/build.log)"; }
if grep -iE "warning" "$BUILD/build.log" | grep -v "CMAKE_CUDA_ARCHITECTURES" > "$BUILD/warnings.log"; then
  step "compiler warnings (see $BUILD/warnings.log):"
  head -40 "$BUILD/warnings.log"
fi
step "built in $(( $(date +%s) - start )) s"
step "importing the staged package and checking the dispatcher"
(cd "$BUILD" && PYTHONPATH="$STAGE" "$PY" - "$STAGE") <<'EOF' || fail "import / registration check"
import sys
from pathlib import Path
import torch
import qgoft
stage = Path(sys.argv[1]).resolve()
assert Path(qgoft.__file__).resolve().is_relative_to(stage), f"imported {qgoft.__file__}, not the staged build"
assert qgoft.extension_loaded(), qgoft._extension.extension_error()
info = qgoft.build_info()
print("check_cuda_build: build_info:", info)
assert info["cuda_compiled"], "qgoft.build_info() says the CUDA kernels were not compiled"
assert info["cuda_loaded"], f"the CUDA kernels did not load: {info.get('cuda_error')}"
assert info["abi"] == "stable", info["abi"]
missing = []
for name in ("givens_chain", "givens_chain_with_tops", "givens_chain_backward", "quasi_givens_chain",
             "quasi_givens_chain_with_tops", "quasi_givens_chain_backward"):
    for key in ("CPU", "CUDA"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"qgoft::{name}", key):
            missing.append(f"qgoft::{name} [{key}]")
assert not missing, f"kernels not registered: {missing}"
print("check_cuda_build: CPU and CUDA kernels registered for the 6 ops; CUDA available here:",
      torch.cuda.is_available())
EOF

step "tests/test_cuda.py (skips without a GPU)"
PYTHONPATH="$STAGE" "$VBIN/pytest" -q -p no:cacheprovider tests/test_cuda.py -rs 2>&1 | tail -15
test "${PIPESTATUS[0]}" -eq 0 || fail "tests/test_cuda.py"
step "build, registration and import checks OK"
SIM_MODE="${QGOFT_CUDA_SIM:-quick}"
if [ "$SIM_MODE" != off ]; then
  step "host emulation of the CUDA kernels ($SIM_MODE); its last line is the closing count"
  CUDA_INC=""
  for c in "$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include" "${CUDA_HOME:+$CUDA_HOME/include}" \
           /usr/local/cuda/include; do
    if [ -n "$c" ] && [ -f "$c/cuda_runtime.h" ]; then CUDA_INC="$c"; break; fi
  done
  [ -n "$CUDA_INC" ] || fail "cuda_runtime.h not found (set CUDA_HOME)"
  g++ -std=c++20 -O2 -pthread -I"$CUDA_INC" -Icsrc/cuda csrc/cuda/sim/sim_test.cpp csrc/cuda/chain_plan.cpp \
    -o "$BUILD/cuda_sim_test" || fail "building the host emulation"
  "$BUILD/cuda_sim_test" "$SIM_MODE" || fail "host emulation of the CUDA kernels"
fi
