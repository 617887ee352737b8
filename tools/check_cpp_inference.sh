#!/usr/bin/env bash
# Checks inference from C++ without Python: builds examples/cpp_inference against the installed torch's
# libtorch and qgoft's ops library, saves a model with qgoft layers from Python (scripted and traced
# TorchScript, and an AOTInductor package), runs the C++ program on the saved input and compares its
# outputs with Python's (max abs difference <= 1e-5). Exits non-zero on any failure.
#
# Environment: PYTHON (default: python, else python3), CUDA_HOME (the CUDA toolkit, for a CUDA torch;
# default /usr/local/cuda when it exists), QGOFT_CPP_BUILD_DIR (default build/cpp_inference;
# reused between runs), QGOFT_CPP_WORK_DIR (default $QGOFT_CPP_BUILD_DIR/check), QGOFT_CHECK_AOTI=0 skips
# the AOTInductor package, QGOFT_BUILD_JOBS (default 2).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
BUILD_DIR="${QGOFT_CPP_BUILD_DIR:-$ROOT/build/cpp_inference}"
WORK_DIR="${QGOFT_CPP_WORK_DIR:-$BUILD_DIR/check}"
AOTI="${QGOFT_CHECK_AOTI:-1}"
EXAMPLE="$ROOT/examples/cpp_inference"
start=$SECONDS

mkdir -p "$BUILD_DIR"
if command -v flock > /dev/null; then  # one check at a time per build directory (shared checkouts)
  exec 9> "$BUILD_DIR/.lock"
  flock 9
fi
echo "== configure and build $EXAMPLE in $BUILD_DIR (in the background)"
(
  # Explicit locations (a reused build directory must follow the current torch and qgoft), asked in one
  # Python start from the example's folder, where export_model.py runs: the same qgoft (an installed
  # package, an editable install or PYTHONPATH), never the checkout's qgoft/ by accident of the working
  # directory. Third line: with a CUDA build of torch, the NVRTC its wheels install beside torch (empty
  # otherwise), for a toolkit without NVRTC (a minimal install).
  mapfile -t found < <(cd "$EXAMPLE" && "$PYTHON" -c '
import glob, os, torch, qgoft
print(torch.utils.cmake_prefix_path)
print(qgoft.ops_library_path())
nvrtc = []
if torch.version.cuda:
    site = os.path.dirname(os.path.dirname(torch.__file__))
    nvrtc = (sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
             + sorted(glob.glob(os.path.join(site, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))))
print((nvrtc + [""])[0])') &&
  [ "${#found[@]}" = 3 ] && [ -n "${found[0]}" ] && [ -n "${found[1]}" ] &&
  torch_prefix="${found[0]}" && ops_library="${found[1]}" && nvrtc="${found[2]}" &&
  # A CUDA build of torch makes find_package(Torch) look for the CUDA toolkit; CMake guesses its root from
  # the first nvcc on PATH, which can be a wrapper script outside the toolkit (/usr/local/bin/nvcc):
  # name the root when it is known (unused with a CPU torch).
  cuda_args=() &&
  cuda_root="${CUDA_HOME:-${CUDA_PATH:-}}" &&
  { [ -n "$cuda_root" ] || [ ! -x /usr/local/cuda/bin/nvcc ] || cuda_root=/usr/local/cuda; } &&
  { [ -z "$cuda_root" ] || cuda_args=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_root" -DCUDAToolkit_ROOT="$cuda_root"); } &&
  { [ -z "$nvrtc" ] || [ -z "$cuda_root" ] || ls "$cuda_root"/lib*/libnvrtc.so > /dev/null 2>&1 ||
    cuda_args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc"); } &&
  cmake -S "$EXAMPLE" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$torch_prefix" \
        -DQGOFT_OPS_LIBRARY="$ops_library" -DQGOFT_WITH_AOTI="$([ "$AOTI" = 1 ] && echo ON || echo OFF)" \
        ${cuda_args[@]+"${cuda_args[@]}"} &&
  cmake --build "$BUILD_DIR" --parallel "${QGOFT_BUILD_JOBS:-2}"
) > "$BUILD_DIR/build.log" 2>&1 &
build_pid=$!

echo "== save the model, its input and Python's output in $WORK_DIR"
rm -rf "$WORK_DIR"
save_args=(save "$WORK_DIR")
[ "$AOTI" = 1 ] && save_args+=(--aoti)
if ! "$PYTHON" "$EXAMPLE/export_model.py" "${save_args[@]}"; then
  wait "$build_pid" || true
  echo "FAIL: saving the model from Python failed" >&2
  exit 1
fi

echo "== saved ($((SECONDS - start)) s so far); waiting for the build"
if ! wait "$build_pid"; then
  cat "$BUILD_DIR/build.log"
  echo "FAIL: building the C++ example failed" >&2
  exit 1
fi
echo "== built $BUILD_DIR/qgoft_infer ($((SECONDS - start)) s so far)"

infer="$BUILD_DIR/qgoft_infer"
outputs=()
for model in model.pt model_traced.pt; do
  echo "== $infer $model"
  "$infer" "$WORK_DIR/$model" "$WORK_DIR/input.pt" "$WORK_DIR/cpp_$model"
  outputs+=("$WORK_DIR/cpp_$model")
done
if [ "$AOTI" = 1 ]; then
  echo "== $infer --aoti model.pt2"
  "$infer" --aoti "$WORK_DIR/model.pt2" "$WORK_DIR/input.pt" "$WORK_DIR/cpp_model.pt2"
  outputs+=("$WORK_DIR/cpp_model.pt2")
fi

echo "== compare with Python"
"$PYTHON" "$EXAMPLE/export_model.py" compare "$WORK_DIR/expected.pt" "${outputs[@]}" --tol 1e-5
echo "C++ inference check passed in $((SECONDS - start)) s"
