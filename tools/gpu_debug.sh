#!/usr/bin/env bash
# Debugging aid for the CUDA glue on a GPU machine (run from the repository root; no network; python3 with
# a CUDA build of torch). About 1-3 minutes:
#   1. the in-tree build (tools/gpu_check.sh with every part but the build skipped) unless
#      QGOFT_GPU_DEBUG_NO_BUILD=1 and qgoft/libqgoft_ops.so exists;
#   2. an invalid-layout call on CUDA tensors (must raise RuntimeError) and a few other TORCH_CHECK
#      failures, under python's faulthandler, then the same under `cuda-gdb -batch -ex run -ex bt`
#      (native backtrace if it crashes);
#   3. tests/test_cuda.py with pytest-xdist -n 8 into $OUT/test_cuda.log, plus a compact summary
#      (counts of distinct failure messages).
# Output under $OUT (default build/gpu-debug).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
OUTDIR="${OUT:-$ROOT/build/gpu-debug}"
mkdir -p "$OUTDIR"
START=$(date +%s)
say() { echo "gpu_debug [$(( $(date +%s) - START ))s]: $*"; }

if [ "${QGOFT_GPU_DEBUG_NO_BUILD:-0}" != "1" ] || ! ls qgoft/libqgoft_ops.so >/dev/null 2>&1; then
  say "build (tools/gpu_check.sh, every part but the build skipped)"
  OUT="$OUTDIR/check" QGOFT_GPU_CHECK_SKIP="ptxas load chain tests sanitize layer model" timeout 300 bash tools/gpu_check.sh \
    > "$OUTDIR/gpu_check_build.log" 2>&1
  echo "gpu_check.sh exit $?"; tail -5 "$OUTDIR/gpu_check_build.log"
fi

say "libstdc++ symbols defined inside qgoft/libqgoft_ops.so (should be none) and the link line"
{
  readelf -d qgoft/libqgoft_ops.so | grep -E "NEEDED|SYMBOLIC|FLAGS"
  echo "defined std:: locale/stream symbols:"
  nm -C --defined-only qgoft/libqgoft_ops.so | grep -E "_M_insert|num_put|codecvt|locale::|basic_ostream|ios_base" | head -20
  echo "count of defined std:: symbols: $(nm -C --defined-only qgoft/libqgoft_ops.so | grep -c ' std::')"
  NINJA_BIN="$(dirname "$(command -v "$PYTHON")")/ninja"; [ -x "$NINJA_BIN" ] || NINJA_BIN=ninja
  "$NINJA_BIN" -C build/gpu-check/cmake -t commands qgoft_ops 2>/dev/null | grep -E " -o [^ ]*libqgoft_ops.so" | tr ' ' '\n' | grep -vE "\.o$" | tr '\n' ' '; echo
  grep -E "CMAKE_(CXX|SHARED_LINKER|EXE_LINKER)_FLAGS:|TORCH_CXX_FLAGS|CMAKE_CXX_STANDARD|CMAKE_CXX_COMPILER:" build/gpu-check/cmake/CMakeCache.txt
} > "$OUTDIR/link_diag.log" 2>&1
cat "$OUTDIR/link_diag.log" | cut -c1-600

CASE="$OUTDIR/invalid_case.py"
cat > "$CASE" <<'PY'
import faulthandler, sys, traceback
faulthandler.enable(all_threads=False)
import torch
import qgoft  # noqa: F401  (loads the ops library)
print("torch", torch.__version__, "qgoft", qgoft.build_info().get("ops_library"), flush=True)
D = "cuda"
I32 = torch.int32
ops = torch.ops.qgoft

def attempt(name, fn):
    print(f"--- {name}", flush=True)
    try:
        fn()
        print("    NO EXCEPTION (unexpected)", flush=True)
    except RuntimeError as e:
        print("    RuntimeError OK:", str(e).splitlines()[0][:200], flush=True)
    except Exception:
        traceback.print_exc()

x = torch.randn(5, 4, device=D)
pairs = torch.tensor([[0, 1], [2, 4]], dtype=I32, device=D)   # pair 1 out of range
offs = torch.tensor([0, 2], dtype=I32, device=D)
good_pairs = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]], dtype=I32, device=D)
good_offs = torch.tensor([0, 2, 4], dtype=I32, device=D)
which = sys.argv[1] if len(sys.argv) > 1 else "all"
cases = [
    ("device mismatch (no integers in the message)",
     lambda: ops.givens_chain(x, torch.zeros(2), pairs, offs, None)),
    ("bad x dtype (no integers in the message)",
     lambda: ops.givens_chain(x.int(), torch.zeros(4, device=D), good_pairs, good_offs, None)),
    ("angles shape (integers, before any layout read)",
     lambda: ops.givens_chain(x, torch.zeros(7, device=D), good_pairs, good_offs, None)),
    ("empty layer_offsets (sizes in the message, before the host copy)",
     lambda: ops.givens_chain(x, torch.zeros(2, device=D), pairs, torch.zeros(0, dtype=I32, device=D), None)),
    ("invalid pair (after the host copy)",
     lambda: ops.givens_chain(x, torch.zeros(2, device=D), pairs, offs, None)),
    ("invalid pair, backward",
     lambda: ops.quasi_givens_chain_backward(x, x, torch.zeros(2, 2, 2, device=D), pairs, offs, None,
                                             [True, True, False])),
]
for i, (name, fn) in enumerate(cases):
    if which in ("all", str(i)):
        attempt(name, fn)
y = ops.givens_chain(x, torch.zeros(4, device=D), good_pairs, good_offs, None)
torch.cuda.synchronize()
print("valid call after the errors OK:", bool(torch.allclose(y, x)), flush=True)
PY

say "invalid-layout cases under faulthandler"
timeout 60 "$PYTHON" -X faulthandler "$CASE" 2>&1 | tee "$OUTDIR/invalid_case.log"
echo "exit ${PIPESTATUS[0]}"

CUDAGDB="$(command -v cuda-gdb || true)"
[ -z "$CUDAGDB" ] && [ -x /usr/local/cuda/bin/cuda-gdb ] && CUDAGDB=/usr/local/cuda/bin/cuda-gdb
if [ -n "$CUDAGDB" ]; then
  say "same under $CUDAGDB (backtrace of the first fault, if any)"
  PYEXE="$("$PYTHON" -c 'import sys; print(sys.executable)')"
  timeout 120 "$CUDAGDB" -q -batch -ex "set pagination off" -ex "set confirm off" \
    -ex "handle SIGPIPE nostop noprint" -ex run -ex bt -ex "info sharedlibrary qgoft" \
    --args "$PYEXE" "$CASE" > "$OUTDIR/cuda_gdb.log" 2>&1
  echo "cuda-gdb exit $?"
  grep -v "^\[New Thread\|^\[Thread .* exited\|^\[Detaching" "$OUTDIR/cuda_gdb.log" | tail -60
else
  say "cuda-gdb not found; skipped"
fi

if [ "${QGOFT_GPU_DEBUG_NO_TESTS:-0}" = "1" ]; then say "tests skipped (QGOFT_GPU_DEBUG_NO_TESTS=1)"; exit 0; fi
say "tests/test_cuda.py (-n 8) -> $OUTDIR/test_cuda.log"
QGOFT_REQUIRE_CUDA=1 timeout 240 "$PYTHON" -m pytest tests/test_cuda.py -q -n 8 --tb=short -p no:cacheprovider \
  > "$OUTDIR/test_cuda.log" 2>&1
echo "pytest exit $?"
tail -1 "$OUTDIR/test_cuda.log"
say "distinct failure messages (count, message):"
{
  grep -E "^E +[A-Za-z_.]*(Error|Exception)" "$OUTDIR/test_cuda.log" | sed -E 's/^E +//' | cut -c1-160
  grep -E "Fatal Python error|crashed while running" "$OUTDIR/test_cuda.log" | sed -E "s/'gw[0-9]+'/'gw*'/; s/\[.*//" | cut -c1-160
} | sort | uniq -c | sort -rn | head -25
grep -E "poisoning (not confirmed|counter)" "$OUTDIR/test_cuda.log" | head -3
say "done"
