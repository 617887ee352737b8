#!/usr/bin/env bash
# Memory-safety check of the CPU extension (run by .ci/run after the test suite; QGOFT_SKIP_SANITIZERS=1
# skips it there):
#   1. builds the CPU extension (libqgoft_ops.so + qgoft._C) with AddressSanitizer and
#      UndefinedBehaviorSanitizer (-fsanitize=address,undefined -fno-sanitize-recover=undefined: any UB is
#      fatal) into a separate build directory, and stages it with a copy of the Python package there
#      (the checkout's own qgoft/*.so are never touched),
#   2. checks that Python imports the staged, instrumented build (package path, loaded library, ASan
#      symbols),
#   3. runs the op tests under the sanitizers (default: tests/test_ops.py tests/nn/test_linear.py
#      tests/test_layouts.py tests/test_threads.py tests/test_bad_input.py, without its RSS measurement;
#      arguments replace that list) with the ASan and UBSan
#      runtimes preloaded into the (uninstrumented) Python, QGOFT_SANITIZER=1 (see tests/conftest.py) and
#      PYTHONMALLOC=malloc (every Python allocation visible to ASan / LeakSanitizer),
#   4. runs tools/sanitizer_leak_check.py under the same runtimes: every op (forward, backward, adjoint,
#      error paths, qgoft.nn.Linear steps) in a loop, with the ASan allocator's exact count of bytes in use
#      before and after; the heap must not grow with the number of calls,
#   5. fails on any ASan or UBSan report, on any failing test, on a failed heap check, and on any direct
#      leak that LeakSanitizer reports at exit whose allocation stack passes through qgoft's libraries.
#      Leaks of Python or torch alone (objects the interpreter never frees at exit) are listed, not
#      attributed to qgoft: a suppressions file cannot say "unless qgoft is on the stack", since every
#      qgoft allocation is reached through Python and libtorch frames (see tools/sanitizers.supp).
# Why both leak checks: LeakSanitizer only sees blocks that nothing points to at exit, and attributes them
# by a frame-pointer stack that Python and torch (built without frame pointers) may cut short; the heap
# accounting sees every byte but only for the calls it makes.
# ASan / LSan reports are written to $BUILD/logs (log_path); pytest runs with --capture=sys so that
# UBSan's reports (GCC's libubsan writes to fd 2 whatever log_path says) reach $BUILD/pytest.log.
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3; its torch is built against),
# CXX (default g++; its libasan / libubsan are preloaded), QGOFT_SANITIZER_BUILD_DIR (default
# build/sanitizers), QGOFT_BUILD_JOBS (default nproc), QGOFT_SANITIZER_LEAKS=0 turns leak detection off,
# QGOFT_SANITIZER_TIMEOUT (seconds for the test run, default 2400).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
CXX="${CXX:-g++}"
BUILD="${QGOFT_SANITIZER_BUILD_DIR:-build/sanitizers}"
case "$BUILD" in /*) ;; *) BUILD="$ROOT/$BUILD" ;; esac
JOBS="${QGOFT_BUILD_JOBS:-$(nproc)}"
LEAKS="${QGOFT_SANITIZER_LEAKS:-1}"
TIMEOUT="${QGOFT_SANITIZER_TIMEOUT:-2400}"
SUPP="$ROOT/tools/sanitizers.supp"
SELECT=()
if [ "$#" -gt 0 ]; then
  TESTS=("$@")
else
  TESTS=()
  for t in tests/test_ops.py tests/nn/test_linear.py tests/test_layouts.py tests/test_threads.py tests/test_bad_input.py; do
    [ -f "$t" ] && TESTS+=("$t")
  done
  # test_memory_stays_proportional measures peak RSS in a child process: under ASan (shadow memory,
  # quarantine of freed blocks, redzones) RSS says nothing about qgoft's allocations.
  SELECT=(-k "not test_memory_stays_proportional")
fi
start=$SECONDS

fail() { echo "check_sanitizers: FAILED: $*" >&2; exit 1; }
step() { echo "check_sanitizers: [$((SECONDS - start)) s] $*"; }

CXX_PATH="$(command -v "$CXX")" || fail "C++ compiler $CXX not found"
LIBASAN="$("$CXX" -print-file-name=libasan.so)"
LIBUBSAN="$("$CXX" -print-file-name=libubsan.so)"
[ -f "$LIBASAN" ] || fail "$CXX has no libasan.so (install the compiler's sanitizer runtime, e.g. libasan8)"
[ -f "$LIBUBSAN" ] || fail "$CXX has no libubsan.so (install e.g. libubsan1)"
LIBASAN="$(readlink -f "$LIBASAN")"
LIBUBSAN="$(readlink -f "$LIBUBSAN")"
VBIN="$(dirname "$PYTHON")"
CMAKE="$VBIN/cmake"; [ -x "$CMAKE" ] || CMAKE="$(command -v cmake)" || fail "cmake not found"
NINJA="$VBIN/ninja"; [ -x "$NINJA" ] || NINJA="$(command -v ninja || true)"

mkdir -p "$BUILD"
if command -v flock > /dev/null; then  # one check at a time per build directory (shared checkouts)
  exec 9> "$BUILD/.lock"
  flock 9
fi

# ---- 1. stage the Python package and build the instrumented extension into it ----
STAGE="$BUILD/pkg"
rm -rf "$STAGE"
mkdir -p "$STAGE/qgoft"
(cd qgoft && find . -name '*.py' -not -name '_build_meta.py' -not -path '*/__pycache__/*' -print0 |
  xargs -0 -I{} cp --parents {} "$STAGE/qgoft/")

SAN_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
TORCH_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
PY_INCLUDE="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
EXT_SUFFIX="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
GEN=()
if [ -n "$NINJA" ] && [ ! -f "$BUILD/cmake/CMakeCache.txt" ]; then GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$NINJA"); fi
step "configuring (build dir $BUILD/cmake, $CXX_PATH, flags: $SAN_FLAGS)"
# RelWithDebInfo: -O2 -g for the glue (the kernel sources carry their own -O3); sanitizers at -O2 keep
# every check (they are inserted before optimisation) and keep the test run fast enough for CI.
"$CMAKE" -S . -B "$BUILD/cmake" "${GEN[@]}" \
  -DCMAKE_CXX_COMPILER="$CXX_PATH" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="$SAN_FLAGS" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DQGOFT_CUDA=OFF \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$STAGE/qgoft" \
  -DQGOFT_PYTHON_INCLUDE_DIR="$PY_INCLUDE" -DQGOFT_PYTHON_EXT_SUFFIX="$EXT_SUFFIX" \
  -DPython3_EXECUTABLE="$PYTHON" > "$BUILD/configure.log" 2>&1 ||
  { cat "$BUILD/configure.log"; fail "cmake configure"; }
step "building with $JOBS jobs"
"$CMAKE" --build "$BUILD/cmake" --parallel "$JOBS" > "$BUILD/build.log" 2>&1 ||
  { tail -60 "$BUILD/build.log"; fail "build (full log: $BUILD/build.log)"; }
for lib in "$STAGE/qgoft/libqgoft_ops.so" "$STAGE/qgoft/_C$EXT_SUFFIX"; do
  [ -f "$lib" ] || fail "$lib was not built"
  # (nm's output captured first: with pipefail, grep -q closing the pipe early would fail the pipeline)
  undefined="$(nm -D --undefined-only "$lib")"
  grep -q "__asan_init\|__asan_report" <<< "$undefined" || fail "$lib is not instrumented by ASan"
  grep -q "__ubsan_handle" <<< "$undefined" || fail "$lib is not instrumented by UBSan"
done
step "built and staged in $STAGE"

# ---- 2. the sanitizer environment ----
LOGS="$BUILD/logs"
rm -rf "$LOGS"
mkdir -p "$LOGS"
# detect_odr_violation=0: both qgoft libraries instantiate the same inline globals of the torch headers.
# new_delete_type_size_mismatch / alloc_dealloc_mismatch: torch and Python are not instrumented, their
# allocator pairs are outside qgoft's control.
export ASAN_OPTIONS="detect_leaks=$LEAKS:halt_on_error=1:abort_on_error=0:exitcode=86:detect_odr_violation=0:\
alloc_dealloc_mismatch=0:new_delete_type_size_mismatch=0:detect_stack_use_after_return=0:\
check_initialization_order=1:strict_init_order=1:malloc_context_size=40:log_path=$LOGS/asan"
export LSAN_OPTIONS="suppressions=$SUPP:print_suppressions=0:max_leaks=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=87:suppressions=$SUPP"  # GCC's libubsan ignores log_path: its reports go to fd 2
export PYTHONMALLOC=malloc
export QGOFT_SANITIZER=1
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
# Only the Python processes get the runtimes (the uninstrumented python loads instrumented libraries, so
# libasan must come first in the initial library list); shell tools of this script stay unsanitized.
SAN_ENV=(env "LD_PRELOAD=$LIBASAN $LIBUBSAN${LD_PRELOAD:+ $LD_PRELOAD}")

step "checking that the instrumented build is the one imported"
# From $BUILD: the checkout's own qgoft/ must not shadow the staged package through sys.path[0] = cwd.
show_logs() { for f in "$LOGS"/*; do [ -f "$f" ] && { echo "==== $f"; head -60 "$f"; }; done; return 0; }
(cd "$BUILD" && "${SAN_ENV[@]}" ASAN_OPTIONS="$ASAN_OPTIONS:detect_leaks=0" "$PYTHON" - "$STAGE") <<'EOF' || { show_logs; fail "import check (logs: $LOGS)"; }
import sys
from pathlib import Path
import torch
import qgoft
stage = Path(sys.argv[1]).resolve()
assert Path(qgoft.__file__).resolve().is_relative_to(stage), f"imported {qgoft.__file__}, not {stage}"
assert qgoft.extension_loaded(), qgoft._extension.extension_error()
info = qgoft.build_info()
lib = Path(info["ops_library"]).resolve()
assert lib.is_relative_to(stage), f"ops library {lib} is not the staged one"
maps = Path("/proc/self/maps").read_text()
mapped = {line.split()[-1] for line in maps.splitlines() if "libqgoft_ops" in line or "qgoft/_C" in line}
assert mapped and all(Path(p).resolve().is_relative_to(stage) for p in mapped), mapped
assert "libasan" in maps and "libubsan" in maps, "sanitizer runtimes not loaded"
x = torch.randn(33, 13)
lay = qgoft.layouts.parallel(13)
y = qgoft.ops.givens_chain(x, torch.randn(lay.num_pairs), lay.pairs_tensor(), lay.layer_offsets_tensor())
assert y.shape == x.shape
print(f"check_sanitizers: imported {qgoft.__file__}; loaded {sorted(mapped)}; "
      f"ISA {info['cpu_isa_selected']} of {info['cpu_isas_supported']}")
EOF

# ---- 3. the tests ----
step "running ${TESTS[*]} under ASan + UBSan (leak detection: $LEAKS)"
ABS_TESTS=()
for t in "${TESTS[@]}"; do case "$t" in /*) ABS_TESTS+=("$t") ;; *) ABS_TESTS+=("$ROOT/$t") ;; esac; done
set +e
cd "$BUILD"  # see the import check: the checkout's qgoft/ must not be on sys.path
timeout --signal=TERM --kill-after=30 "$TIMEOUT" \
  "${SAN_ENV[@]}" "$PYTHON" -m pytest -q -p no:cacheprovider -x --capture=sys --rootdir="$ROOT" \
  --junitxml="$BUILD/junit.xml" "${SELECT[@]}" "${ABS_TESTS[@]}" \
  > "$BUILD/pytest.log" 2>&1
rc=$?
set -e
cd "$ROOT"
tail -15 "$BUILD/pytest.log"
step "pytest exited with $rc"
[ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || fail "the test run timed out after $TIMEOUT s"

# ---- 4. leak check by heap accounting (see tools/sanitizer_leak_check.py) ----
step "leak check: the ASan heap must not grow with the number of op calls"
set +e
(cd "$BUILD" && timeout --signal=TERM --kill-after=30 600 "${SAN_ENV[@]}" "$PYTHON" "$ROOT/tools/sanitizer_leak_check.py") \
  > "$BUILD/leak_check.log" 2>&1
leak_rc=$?
set -e
cat "$BUILD/leak_check.log"

# ---- 5. verdict ----
"$PYTHON" - "$LOGS" "$BUILD/junit.xml" "$rc" "$BUILD/pytest.log" "$leak_rc" "$BUILD/leak_check.log" <<'EOF'
import re, sys
from pathlib import Path
import xml.etree.ElementTree as ET

logs, junit, rc, pytest_log = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
leak_rc, leak_log = int(sys.argv[5]), Path(sys.argv[6])
QGOFT = re.compile(r"libqgoft_ops\.so|/qgoft/_C\.|csrc/")
errors, qgoft_leaks, other_leaks = [], [], []
for log in sorted(logs.iterdir()):
    text = log.read_text(errors="replace")
    if "ERROR: LeakSanitizer" in text and "ERROR: AddressSanitizer" not in text and "runtime error" not in text:
        # One block per leak: "Direct leak of N byte(s) in M object(s) allocated from:" + frames.
        for block in re.split(r"\n(?=(?:Direct|Indirect) leak of )", text):
            if not re.match(r"(?:Direct|Indirect) leak of ", block):
                continue
            block = block.split("\n\n")[0]
            # A direct leak (unreachable from anything) allocated with a qgoft frame on the stack is
            # qgoft's; an indirect one is reachable from some other leaked block (e.g. a tensor held by
            # a Python object that the interpreter never freed) and is attributed to that block's owner.
            direct = block.startswith("Direct")
            (qgoft_leaks if direct and QGOFT.search(block) else other_leaks).append(block)
    elif text.strip():
        errors.append((log.name, text))
# With --capture=sys, reports written to fd 2 (UBSan's always: GCC's libubsan ignores log_path) land here.
for path in (pytest_log, leak_log):
    text = path.read_text(errors="replace") if path.exists() else ""
    match = re.search(r"^.*(?:ERROR: AddressSanitizer|runtime error:).*$", text, re.M)
    if match:
        errors.append((path.name, text[match.start():]))
for name, text in errors:
    print(f"==== {name}\n{text[:20000]}")
if other_leaks:
    total = sum(int(re.match(r"\w+ leak of (\d+)", b).group(1)) for b in other_leaks)
    print(f"check_sanitizers: {len(other_leaks)} leak(s), {total} bytes, not attributed to qgoft (no qgoft "
          "frame in the allocation stack, or an indirect leak; the frame-pointer stacks may stop inside "
          "torch or Python, the heap-accounting check above covers that); first one:")
    print("\n".join(other_leaks[0].splitlines()[:12]))
for block in qgoft_leaks:
    print("==== leak attributed to qgoft\n" + block)
failed = None
if junit.exists():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    print(f"check_sanitizers: junit: {counts}")
    failed = counts["failures"] + counts["errors"] > 0 or counts["tests"] == 0
problems = []
if errors:
    problems.append(f"{len(errors)} sanitizer report(s) (ASan / UBSan)")
if qgoft_leaks:
    problems.append(f"{len(qgoft_leaks)} leak(s) with qgoft frames")
if failed is None:
    problems.append(f"no junit report (pytest died, exit code {rc})")
elif failed:
    problems.append("failing tests")
if rc not in (0, 86) or (rc == 86 and not (qgoft_leaks or other_leaks)):
    problems.append(f"pytest exit code {rc}")
if leak_rc not in (0, 86):
    problems.append(f"the heap-accounting leak check failed (exit code {leak_rc})")
if problems:
    sys.exit("check_sanitizers: FAILED: " + "; ".join(problems))
print("check_sanitizers: no ASan / UBSan errors, no leaks attributable to qgoft")
EOF
step "passed"
