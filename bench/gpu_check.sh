#!/usr/bin/env bash
# ONE command that validates qgoft's CUDA backend on a CUDA machine (issue 4). Run from the repository
# root; needs python3 with a CUDA build of torch, nvcc, cmake and ninja; no network.
#
#   bash bench/gpu_check.sh            # everything below, about 5-7 minutes on 16 cores + one H100
#
# Steps (each one's log, and a summary, are written under $OUT when it is set, else build/gpu-check/out):
#   1. environment: GPU, driver, python, torch, nvcc, cmake, compute-sanitizer
#   2. build: the full extension from this working tree with the CUDA kernels, for this GPU's
#      architecture only (TORCH_CUDA_ARCH_LIST), in-tree (qgoft/libqgoft_ops.so, qgoft/_C*.so,
#      qgoft/_build_meta.py, like `pip install -e .`); ptxas register / spill report of every kernel
#   3. load check: the four ops have CUDA kernels registered in the dispatcher
#   4. tests/test_cuda.py (QGOFT_REQUIRE_CUDA=1: failing, not skipping, if the backend is unusable)
#   5. compute-sanitizer memcheck, racecheck (and initcheck if time allows) on small cases of every
#      kernel path (bench/gpu_sanitize_case.py), with PyTorch's caching allocator off
#   6. bench/bench_gpu.py: the timing table of issue 4
# Exit status: 0 when every step passed; the summary lists each step's result either way.
# Environment: QGOFT_GPU_CHECK_SKIP="build tests sanitize bench" (any subset), PYTHON (default python3),
# QGOFT_BUILD_JOBS (default nproc).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
# The in-tree build is not pip-installed: make `import qgoft` find it from the scripts under bench/.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
PYTHON="${PYTHON:-python3}"
JOBS="${QGOFT_BUILD_JOBS:-$(nproc)}"
OUTDIR="${OUT:-$ROOT/build/gpu-check/out}"
BUILD="$ROOT/build/gpu-check"
SKIP=" ${QGOFT_GPU_CHECK_SKIP:-} "
mkdir -p "$OUTDIR" "$BUILD"
SUMMARY="$OUTDIR/gpu_check_summary.txt"
: > "$SUMMARY"
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "gpu_check [$(elapsed)s]: $*" | tee -a "$SUMMARY"; }
result() {  # name status seconds detail
  printf "%-28s %-6s %5ss  %s\n" "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"
  if [ "$2" = "FAIL" ]; then FAILED=1; fi
}
skipped() { case "$SKIP" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# ------------------------------------------------------------------------------------------------
log "1/6 environment"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi failed"
  "$PYTHON" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability %d.%d" % (p.major, p.minor), "SMs", p.multi_processor_count,
          "memory %.1f GiB" % (p.total_memory / 2**30))
try:
    import pytest; print("pytest", pytest.__version__)
except ImportError:
    print("pytest MISSING")
EOF
} > "$OUTDIR/env.log" 2>&1
cat "$OUTDIR/env.log"
NVCC="${CUDACXX:-}"
if [ -z "$NVCC" ]; then
  SITE_NVCC="$("$PYTHON" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "bin", "nvcc"))' 2>/dev/null || true)"
  for c in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" /usr/local/cuda/bin/nvcc "$(command -v nvcc || true)" "$SITE_NVCC"; do
    if [ -n "$c" ] && [ -x "$c" ]; then NVCC="$c"; break; fi
  done
fi
PYBIN="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")"
CMAKE="$(command -v cmake || true)"; [ -x "$PYBIN/cmake" ] && CMAKE="$PYBIN/cmake"
NINJA="$(command -v ninja || true)"; [ -x "$PYBIN/ninja" ] && NINJA="$PYBIN/ninja"
SANITIZER="$(command -v compute-sanitizer || true)"
for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [ -z "$SANITIZER" ] && [ -x "$c" ] && SANITIZER="$c"
done
log "nvcc=${NVCC:-MISSING} ($([ -n "$NVCC" ] && "$NVCC" --version | tail -1)) cmake=${CMAKE:-MISSING} ($([ -n "$CMAKE" ] && "$CMAKE" --version | head -1)) ninja=${NINJA:-MISSING} compute-sanitizer=${SANITIZER:-MISSING}"
ARCH="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || true)"
if [ -z "$ARCH" ]; then
  result "environment" FAIL "$(elapsed)" "no CUDA device visible to torch"
  echo "gpu_check: FAILED: torch sees no GPU" >&2
  exit 1
fi
result "environment" PASS "$(elapsed)" "GPU capability $ARCH"

# ------------------------------------------------------------------------------------------------
if ! skipped build; then
  log "2/6 build (TORCH_CUDA_ARCH_LIST=$ARCH, $JOBS jobs)"
  t0=$(elapsed)
  ok=1
  if [ -z "$NVCC" ] || [ -z "$CMAKE" ]; then
    ok=0; echo "nvcc or cmake missing" > "$OUTDIR/build.log"
  else
    TORCH_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
    PY_INCLUDE="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    EXT_SUFFIX="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
    GEN=(); [ -n "$NINJA" ] && GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$NINJA")
    rm -rf "$BUILD/cmake"
    { TORCH_CUDA_ARCH_LIST="$ARCH" "$CMAKE" -S "$ROOT" -B "$BUILD/cmake" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DCMAKE_CUDA_COMPILER="$NVCC" -DQGOFT_CUDA=ON \
        -DQGOFT_CUDA_PTXAS_VERBOSE=ON -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$ROOT/qgoft" \
        -DQGOFT_PYTHON_INCLUDE_DIR="$PY_INCLUDE" -DQGOFT_PYTHON_EXT_SUFFIX="$EXT_SUFFIX" \
        -DPython3_EXECUTABLE="$(command -v "$PYTHON")" &&
      "$CMAKE" --build "$BUILD/cmake" --parallel "$JOBS"; } > "$OUTDIR/build.log" 2>&1 || ok=0
    "$PYTHON" - "$ROOT/qgoft/_build_meta.py" <<'EOF'
import sys, torch
with open(sys.argv[1], "w") as f:
    f.write("# Written by bench/gpu_check.sh.\n"
            f"TORCH_VERSION = {torch.__version__!r}\nCUDA_REQUESTED = 'ON'\n")
EOF
  fi
  # ptxas summary: registers, spills, shared memory of every kernel of ours
  "$PYTHON" - "$OUTDIR/build.log" > "$OUTDIR/ptxas.txt" 2>/dev/null <<'EOF' || true
import re, sys
name, spill = None, ""
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'", line)
    if m:
        name, spill = m.group(1), ""
        continue
    if name and "qgoft" in name:
        if "spill" in line:
            spill = re.sub(r"\s+", " ", line.strip())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            pretty = re.sub(r"_ZN5qgoft4cuda6detail\d+", "", name)
            print(f"{m.group(1):>4} regs  {spill:<60}  {pretty}")
            name = None
EOF
  if [ "$ok" = 1 ]; then
    result "build" PASS "$(( $(elapsed) - t0 ))" "log: build.log, registers: ptxas.txt"
    cat "$OUTDIR/ptxas.txt"
  else
    tail -60 "$OUTDIR/build.log"
    result "build" FAIL "$(( $(elapsed) - t0 ))" "see build.log (last lines above)"
  fi
fi

# ------------------------------------------------------------------------------------------------
log "3/6 load check"
t0=$(elapsed)
if "$PYTHON" - > "$OUTDIR/load.log" 2>&1 <<'EOF'
import torch, qgoft
assert qgoft.extension_loaded(), qgoft._extension.extension_error()
info = qgoft.build_info()
print(info)
assert info["cuda_compiled"], "built without CUDA kernels"
for n in ("givens_chain", "givens_chain_backward", "quasi_givens_chain", "quasi_givens_chain_backward"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qgoft::{n}", "CUDA"), n
lay = qgoft.layouts.parallel(4096)
x = torch.randn(8, 4096, device="cuda")
y = torch.ops.qgoft.givens_chain(x, torch.zeros(4095, device="cuda"), lay.pairs_tensor("cuda"),
                                 lay.layer_offsets_tensor("cuda"), None)
torch.cuda.synchronize()
assert torch.equal(x, y), "identity chain is not the identity"
print("load check OK")
EOF
then result "load check" PASS "$(( $(elapsed) - t0 ))" "CUDA kernels registered and running"
else cat "$OUTDIR/load.log"; result "load check" FAIL "$(( $(elapsed) - t0 ))" "see load.log"
fi

# ------------------------------------------------------------------------------------------------
if ! skipped tests; then
  log "4/6 tests/test_cuda.py"
  t0=$(elapsed)
  XDIST=(); "$PYTHON" -c "import xdist" 2>/dev/null && XDIST=(-n 4)
  TIMEOUT=(); "$PYTHON" -c "import pytest_timeout" 2>/dev/null && TIMEOUT=(--timeout 300)
  QGOFT_REQUIRE_CUDA=1 timeout 330 "$PYTHON" -m pytest tests/test_cuda.py -q -rfE -p no:cacheprovider \
      "${XDIST[@]}" "${TIMEOUT[@]}" --junitxml="$OUTDIR/test_cuda.xml" > "$OUTDIR/test_cuda.log" 2>&1
  rc=$?
  tail -40 "$OUTDIR/test_cuda.log"
  line="$(grep -E "passed|failed|error" "$OUTDIR/test_cuda.log" | tail -1)"
  if [ $rc = 0 ]; then result "tests/test_cuda.py" PASS "$(( $(elapsed) - t0 ))" "$line"
  else result "tests/test_cuda.py" FAIL "$(( $(elapsed) - t0 ))" "rc=$rc $line (test_cuda.log, test_cuda.xml)"
  fi
  t0=$(elapsed); if timeout 240 "$PYTHON" tools/gpu_quantized_check.py > "$OUTDIR/quantized.log" 2>&1; then result "quantized bases" PASS "$(( $(elapsed) - t0 ))" "$(grep -c ^PASS "$OUTDIR/quantized.log") passed, $(grep -c ^SKIP "$OUTDIR/quantized.log") skipped (quantized.log)"; else result "quantized bases" FAIL "$(( $(elapsed) - t0 ))" "see quantized.log"; fi
fi

# ------------------------------------------------------------------------------------------------
if ! skipped sanitize; then
  log "5/6 compute-sanitizer"
  if [ -z "$SANITIZER" ]; then
    result "compute-sanitizer" FAIL 0 "compute-sanitizer not found"
  else
    for tool in memcheck racecheck initcheck; do
      if [ "$tool" = initcheck ] && [ "$(elapsed)" -gt 330 ]; then
        result "sanitizer $tool" SKIP 0 "skipped to stay within the time budget"
        continue
      fi
      t0=$(elapsed)
      extra=(); [ "$tool" = racecheck ] && extra=(--racecheck-report all)
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 170 "$SANITIZER" --tool "$tool" "${extra[@]}" --error-exitcode 97 \
          --print-limit 20 "$PYTHON" bench/gpu_sanitize_case.py > "$OUTDIR/sanitizer_$tool.log" 2>&1
      rc=$?
      errors="$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Hazard|Invalid|Uninitialized" "$OUTDIR/sanitizer_$tool.log" | tail -3 | tr '\n' ' ')"
      if [ $rc = 0 ] && grep -q "sanitize case OK" "$OUTDIR/sanitizer_$tool.log"; then
        result "sanitizer $tool" PASS "$(( $(elapsed) - t0 ))" "$errors"
      else
        tail -30 "$OUTDIR/sanitizer_$tool.log"
        result "sanitizer $tool" FAIL "$(( $(elapsed) - t0 ))" "rc=$rc $errors (sanitizer_$tool.log)"
      fi
    done
  fi
fi

# ------------------------------------------------------------------------------------------------
if ! skipped bench; then
  log "6/6 bench/bench_gpu.py"
  t0=$(elapsed)
  ROUNDS=25; [ "$(elapsed)" -gt 360 ] && ROUNDS=7
  if timeout 150 "$PYTHON" bench/bench_gpu.py --rounds "$ROUNDS" --out "$OUTDIR" > "$OUTDIR/bench.log" 2>&1; then
    cat "$OUTDIR/bench.log"
    result "bench_gpu.py" PASS "$(( $(elapsed) - t0 ))" "table: bench_gpu.md (targets: see its last table)"
  else
    tail -30 "$OUTDIR/bench.log"
    result "bench_gpu.py" FAIL "$(( $(elapsed) - t0 ))" "see bench.log"
  fi
fi

echo
echo "================ gpu_check summary ($(elapsed)s, outputs in $OUTDIR) ================"
grep -E "^(environment|build|load check|tests|sanitizer|compute-sanitizer|bench)" "$SUMMARY"
if [ $FAILED = 0 ]; then echo "gpu_check: ALL STEPS PASSED"; else echo "gpu_check: SOME STEPS FAILED" >&2; fi
exit $FAILED
