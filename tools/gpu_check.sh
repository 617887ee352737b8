#!/usr/bin/env bash
# The GPU check of qgoft's CUDA backend: ONE command on a CUDA machine, under 9 minutes on an H100. Every
# part runs under `timeout` (one hang loses that part only) and the whole run under a budget
# (QGOFT_GPU_CHECK_BUDGET seconds, default 530): a part that no longer fits is reported as not run.
#
#   bash tools/gpu_check.sh              # on the GPU machine; outputs under $OUT (else build/gpu-check/out)
#   bash tools/gpu_check.sh --dry-run    # without a GPU: runs every part that can run on a CPU (bash -n, the
#                                        # timing script on tiny CPU shapes, the sanitizer case list,
#                                        # bench/run.py --smoke, the summary) so a slip cannot waste GPU time
#
# Parts, in order (time box in seconds; outputs in the output folder):
#   (wheels)      every wheel in build/wheels (tools/gpu_wheels_prep.sh, carried) installed first  wheels.log
#   env       40  GPU, driver, python, torch, nvcc, cmake, compute-sanitizer            env.log
#   build    150  the extension from this tree for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0), in-tree like
#                 `pip install -e .`                                                  build.log
#   ptxas     60  registers, stack, SASS counts of every kernel of the built library
#                 (tools/cuda_resource_report.py --binary)                             ptxas.txt
#   load      30  the six ops have CUDA kernels; an identity chain is the identity      load.log
#   variants  60  every QGOFT_CUDA_VARIANT (table, reg) and the prefetching forward (table+prefetch:
#                 QGOFT_CUDA_FORWARD=prefetch, also bitwise against table's plain forward) and the one-row reg
#                 backward (reg+single: QGOFT_CUDA_BACKWARD=single, also bitwise against reg's default, the
#                 paired kernel without the scale's gradient) and the paired kernel's instantiations without the
#                 scale's gradient (reg+pair: QGOFT_CUDA_BACKWARD=pair, bitwise against reg's; reg+pair+nol2: the
#                 same with QGOFT_CUDA_PAIR_PREFETCH=off, its instantiation without the L2 prefetch) against base and the
#                 float64 reference, the backward on the forward's saved segment tops bitwise against its top
#                 pass (reg+prefetch+recompute: QGOFT_CUDA_TOPS=recompute), the fused XOR path against the general
#                 kernels
#                 (tools/gpu_variant_check.py)                                        variants.log
#   chain    180  bench/bench_gpu.py: chain kernels under reg with the plain forward, reg+prefetch (the
#                 default: the prefetching forward, forward rows and d > 4096 backward rows with gradients),
#                 reg+serial (QGOFT_CUDA_REDUCE=serial: backward rows with parameter gradients; and every
#                 backward variant split / serial at MiniLM's 2048 x 384 and 1536) and reg+prefetch+single (the
#                 one-row reg backward, bf16 backward rows with parameter gradients), reg+prefetch+pair (the
#                 paired kernel's instantiations without the scale's gradient: the same rows), reg+prefetch+pair+nol2
#                 (the same without the L2 prefetch of the pair after the next: bf16 d = 4096 goft and qgoft backward
#                 rows with gradients only) and reg+prefetch+recompute
#                 (the top pass instead of the forward's saved segment tops: d > 4096 backward rows with
#                 gradients; the LLaMA step) side by side (base is
#                 timed by the baseline part, table was slower than reg everywhere), butterfly
#                 and stack=2 (the stack on the general and the fused XOR kernels, QGOFT_CUDA_XOR; the fused
#                 backward under base, the stacked kernel, beside reg, the reg stacked backward, and the forwards
#                 under reg+prefetch, the stack's prefetching forward: --layout-variants base,reg,reg+prefetch),
#                 qgoft.nn.Linear vs frozen / PEFT
#                 LoRA r=8 / PEFT OFT, a LLaMA-shaped stack's training step vs LoRA (targets 1-4, half of 5)
#                                                                                     bench_gpu.md/.json
#   tests    120  tests/test_cuda.py and tests/test_determinism.py, QGOFT_REQUIRE_CUDA=1 (target 7)
#   sanitize 180  compute-sanitizer memcheck, racecheck, initcheck, synccheck, concurrently, on
#                 tools/gpu_sanitize_case.py: every path, variant, dtype and mask for memcheck and
#                 initcheck; every path and variant in float32 for racecheck and synccheck (the slow tools;
#                 their hazards do not depend on the dtype) (target 6)             sanitizer_*.log
#   layer     60  bench/run.py --quick --only layer --device cuda (with PEFT LoRA r=8, OFT) run/
#   model    120  bench/run.py --quick --only model --device cuda --model-batch 256 --model-seq 128 (a MiniLM
#                 step at a batch that fills the card; target 5) run/; the weights
#                 from build/minilm when it exists (carried; tools/gpu_minilm_prep.sh), as QGOFT_MINILM_PATH
#   baseline-build 90  after the speed targets' parts above (they come first), only when build/baseline/src
#                 exists (an earlier commit's sources, written and carried as bench/README.md, "Against an
#                 earlier commit", says): its ops library for sm_90 only, without the Python module, in
#                 build/gpu-check/baseline                                             baseline_build.log
#   baseline 150  tools/gpu_baseline_compare.py: this tree's chain and layout tables against that build's,
#                 alternating separate processes (4 per build)             baseline_compare.md/.json
#   extra         the checks listed in extra_checks() below, one line each
#   summary       targets 1-7, met / missed / not run with the numbers: targets.md, targets.json; with
#                 $OUT set (the lent GPU machine returns at most 8 files) every other file is packed into
#                 logs.tar.gz
# Exit status 0 when every part that ran passed (a missed speed target is not a failure of the check).
# Environment: PYTHON (default python3), QGOFT_BUILD_JOBS (default nproc), QGOFT_GPU_CHECK_SKIP="part ..."
# (e.g. "layer model"), QGOFT_GPU_CHECK_ONLY="part ..." (only these parts; env always runs; e.g.
# "build load baseline-build baseline"), QGOFT_GPU_CHECK_BUDGET (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
# The in-tree build is not pip-installed: `import qgoft` must find it from every script.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
START=$(date +%s)
BUDGET="${QGOFT_GPU_CHECK_BUDGET:-530}"
PYTHON="${PYTHON:-python3}"
JOBS="${QGOFT_BUILD_JOBS:-$(nproc)}"
OUTDIR="${OUT:-$ROOT/build/gpu-check/out}"
BUILD="$ROOT/build/gpu-check"
SKIP=" ${QGOFT_GPU_CHECK_SKIP:-} "
ONLY="${QGOFT_GPU_CHECK_ONLY:+ $QGOFT_GPU_CHECK_ONLY env }"
BASELINE_SRC="$ROOT/build/baseline"
mkdir -p "$OUTDIR" "$BUILD"
PARTS="$OUTDIR/parts.tsv"
: > "$PARTS"
FAILED=0
# The end of every run, also one stopped by an error of this script (an EXIT trap): the table of parts, the
# targets summary, the packing of the outputs; the exit status is FAILED's (1 when the script itself stopped early).
finish() {
  [ "${FINISHED:-0}" = 1 ] || { echo "gpu_check: the script stopped before its last part" >&2; FAILED=1; }
  echo
  echo "================ gpu_check ($(elapsed)s, outputs in $OUTDIR) ================"
  column -t -s $'\t' "$PARTS" 2>/dev/null || cat "$PARTS"
  "$PYTHON" tools/gpu_check_summary.py "$OUTDIR" || FAILED=1
  # The device machine returns at most 8 files from $OUT: keep the tables, pack every log into one archive.
  if [ -n "${OUT:-}" ]; then
    (cd "$OUTDIR" && shopt -s nullglob &&
     keep=" targets.md targets.json bench_gpu.md bench_gpu.json baseline_compare.md baseline_compare.json parts.tsv logs.tar.gz " &&
     pack=() && for f in * .[!.]*; do case "$keep" in *" $f "*) ;; *) pack+=("$f") ;; esac; done &&
     if [ ${#pack[@]} -gt 0 ]; then tar czf logs.tar.gz "${pack[@]}" && rm -rf "${pack[@]}"; fi)
    log "outputs: $(cd "$OUTDIR" && ls | tr '\n' ' ')(every log in logs.tar.gz)"
  fi
  if [ $FAILED = 0 ]; then echo "gpu_check: every part that ran passed"; else echo "gpu_check: SOME PARTS FAILED" >&2; fi
  exit $FAILED
}
trap finish EXIT
# Wheels carried in build/wheels (tools/gpu_wheels_prep.sh: packages the GPU machine lacks, e.g. torchao):
# installed into build/gpu-check/site for every part (a dry run leaves them alone).
if [ "$DRY" = 0 ] && compgen -G "$ROOT/build/wheels/*.whl" > /dev/null; then
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target "$BUILD/site" "$ROOT"/build/wheels/*.whl > "$OUTDIR/wheels.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$BUILD/site"
    echo "gpu_check: installed $(cd "$ROOT/build/wheels" && ls *.whl | tr '\n' ' ')into $BUILD/site"
  else
    echo "gpu_check: installing build/wheels failed (wheels.log); the parts run without them"
  fi
fi

elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "gpu_check [$(elapsed)s]: $*"; }
# record NAME STATUS SECONDS DETAIL   (STATUS: PASS, FAIL, TIMEOUT, SKIP)
record() {
  printf "%s\t%s\t%s\t%s\n" "$1" "$2" "$3" "$4" >> "$PARTS"
  printf "%-22s %-8s %5ss  %s\n" "$1" "$2" "$3" "$4"
  case "$2" in FAIL|TIMEOUT) FAILED=1 ;; esac
}
# box SECONDS: the time box of the next part, clipped to what is left of the budget (20 s kept for the
# summary); 0 (the part is not started) when less than half of its box is left.
box() {
  local left=$(( BUDGET - $(elapsed) - 20 ))
  if [ "$left" -le 5 ] || [ $(( 2 * left )) -lt "$1" ]; then echo 0
  elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
# part NAME SECONDS LOG COMMAND...: runs the command under its time box, output to LOG, and records it.
part() {
  local name="$1" full="$2" secs; secs="$(box "$2")"; local logf="$OUTDIR/$3"; shift 3
  case "$SKIP" in *" $name "*) record "$name" SKIP 0 "QGOFT_GPU_CHECK_SKIP"; return 0 ;; esac
  if [ -n "$ONLY" ]; then
    case "$ONLY" in *" $name "*) ;; *) record "$name" SKIP 0 "not in QGOFT_GPU_CHECK_ONLY"; return 0 ;; esac
  fi
  if [ "$secs" = 0 ]; then record "$name" SKIP 0 "not run: under half its ${full}s box left of the ${BUDGET}s budget"; return 0; fi
  log "$name (time box ${secs}s)"
  local t0; t0=$(elapsed)
  if declare -F "$1" > /dev/null; then  # a function of this script: through bash (exported below)
    timeout --kill-after=10 "$secs" bash -c "$1" > "$logf" 2>&1
  else
    timeout --kill-after=10 "$secs" "$@" > "$logf" 2>&1
  fi
  local rc=$?
  local last; last="$(grep -v '^\s*$' "$logf" | tail -1 | cut -c1-150)"
  if [ $rc = 0 ]; then record "$name" PASS "$(( $(elapsed) - t0 ))" "$last"
  elif [ $rc = 124 ] || [ $rc = 137 ]; then tail -5 "$logf"; record "$name" TIMEOUT "$(( $(elapsed) - t0 ))" "after ${secs}s; $last"
  else tail -15 "$logf"; record "$name" FAIL "$(( $(elapsed) - t0 ))" "rc=$rc; $last (${logf##*/})"
  fi
  return $rc
}
# dry NAME REASON: a GPU-only part in a dry run.
dry() { record "$1" SKIP 0 "dry run: $2"; }

# ------------------------------------------------------------------------------------------------
# Extra checks: one line per check, `part NAME SECONDS LOGFILE COMMAND...` (runs under the budget like
# the parts above, after them: what the budget leaves; its result is listed in the summary). GPU-only
# checks go inside the `if`.
# ------------------------------------------------------------------------------------------------
extra_checks() {
  if [ "$DRY" = 0 ]; then
    part quantized 150 quantized.log "$PYTHON" tools/gpu_quantized_check.py --device cuda
    part soak 120 soak.log "$PYTHON" tools/soak.py --device cuda --json "$OUTDIR/soak_cuda.json"
  fi
}

# ------------------------------------------------------------------------------------------------
env_report() {
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: none"
  "$PYTHON" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability %d.%d" % (p.major, p.minor), "SMs", p.multi_processor_count,
          "memory %.1f GiB" % (p.total_memory / 2**30))
for mod in ("pytest", "xdist", "peft", "transformers"):
    try:
        m = __import__(mod); print(mod, getattr(m, "__version__", "present"))
    except ImportError:
        print(mod, "MISSING")
EOF
  echo "nvcc: ${NVCC:-MISSING} $([ -n "$NVCC" ] && "$NVCC" --version | tail -1)"
  echo "cmake: ${CMAKE:-MISSING} ninja: ${NINJA:-MISSING} compute-sanitizer: ${SANITIZER:-MISSING}"
}

# cmake_build SOURCE BUILD_DIR LIBRARY_DIR CUDA(ON|OFF) TARGET|all [CMAKE_ARGS...]: a fresh Release build of a
# qgoft source tree against $PYTHON's torch, for sm_90 only, with $JOBS jobs; prints its seconds.
cmake_build() {
  local src="$1" dir="$2" lib="$3" cuda="$4" target="$5"; shift 5
  [ -n "$CMAKE" ] || { echo "cmake missing"; return 1; }
  [ "$cuda" = OFF ] || [ -n "$NVCC" ] || { echo "nvcc missing"; return 1; }
  local prefix gen=() tgt=() t0; t0=$(date +%s)
  prefix="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')" || return 1
  [ -n "$NINJA" ] && gen=(-G Ninja -DCMAKE_MAKE_PROGRAM="$NINJA")
  [ "$cuda" = ON ] && gen+=(-DCMAKE_CUDA_COMPILER="$NVCC")
  [ "$target" = all ] || tgt=(--target "$target")
  rm -rf "$dir"
  TORCH_CUDA_ARCH_LIST=9.0 "$CMAKE" -S "$src" -B "$dir" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$prefix" -DQGOFT_CUDA="$cuda" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$lib" \
    -DPython3_EXECUTABLE="$(command -v "$PYTHON")" "$@" || return 1
  "$CMAKE" --build "$dir" --parallel "$JOBS" "${tgt[@]}" || return 1
  echo "cmake_build: $src built in $(( $(date +%s) - t0 )) s with $JOBS jobs"
}

build_extension() {
  local inc suffix
  inc="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  suffix="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
  cmake_build "$ROOT" "$BUILD/cmake" "$ROOT/qgoft" ON all -DQGOFT_PYTHON_INCLUDE_DIR="$inc" \
    -DQGOFT_PYTHON_EXT_SUFFIX="$suffix" || return 1
  # CMake wrote qgoft/_build_meta.py (TORCH_ABI_FLOOR, CUDA_LIBRARY: without them the package does not load
  # libqgoft_cuda.so); the package must see the CUDA kernels it was just built with
  "$PYTHON" -c 'import qgoft, sys; i = qgoft.build_info(); print("build_info:", i)
sys.exit(0 if i.get("cuda_compiled") and i.get("cuda_loaded") else 1)' ||
    { echo "qgoft does not load the CUDA kernels just built (qgoft/_build_meta.py?)"; return 1; }
}

# The earlier commit's ops library (build/baseline/src, from tools/gpu_baseline_prep.sh): the library alone
# (its CPU and CUDA kernels, no Python module), into $BUILD/baseline/lib. CUDA OFF in a dry run (a CPU torch).
build_baseline() {
  echo "earlier commit: $(cat "$BASELINE_SRC/COMMIT" 2>/dev/null)"
  local cuda=ON; [ "$DRY" = 1 ] && cuda=OFF
  cmake_build "$BASELINE_SRC/src" "$BUILD/baseline" "$BUILD/baseline/lib" "$cuda" qgoft_ops -DQGOFT_BUILD_PYTHON=OFF
}

baseline_compare() {
  local dry=(); [ "$DRY" = 1 ] && dry=(--dry-run --pairs 2)
  "$PYTHON" tools/gpu_baseline_compare.py --baseline-lib "$BUILD/baseline/lib/libqgoft_ops.so" \
    --baseline-label "$(cat "$BASELINE_SRC/COMMIT" 2>/dev/null | cut -c1-100)" \
    --out "$OUTDIR" "${dry[@]}"
}

# The baseline parts when the earlier commit's sources were carried; else one line saying how to get them.
baseline_parts() {
  if [ ! -f "$BASELINE_SRC/src/CMakeLists.txt" ]; then
    record baseline SKIP 0 "no build/baseline/src: run bash tools/gpu_baseline_prep.sh COMMIT and carry build/baseline"
    return 0
  fi
  if part baseline-build 90 baseline_build.log build_baseline; then
    part baseline 150 baseline_compare.log baseline_compare
  else
    record baseline SKIP 0 "the earlier commit's build failed (baseline_build.log)"
  fi
}

load_check() {
  "$PYTHON" - <<'EOF'
import torch, qgoft
assert qgoft.extension_loaded(), qgoft._extension.extension_error()
info = qgoft.build_info()
print(info)
assert info["cuda_compiled"], "built without CUDA kernels"
for n in ("givens_chain", "givens_chain_with_tops", "givens_chain_backward", "quasi_givens_chain",
          "quasi_givens_chain_with_tops", "quasi_givens_chain_backward"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qgoft::{n}", "CUDA"), n
lay = qgoft.layouts.parallel(4096)
x = torch.randn(8, 4096, device="cuda")
y = torch.ops.qgoft.givens_chain(x, torch.zeros(4095, device="cuda"), lay.pairs_tensor("cuda"),
                                 lay.layer_offsets_tensor("cuda"), None)
torch.cuda.synchronize()
assert torch.equal(x, y), "identity chain is not the identity"
print("load check OK")
EOF
}

run_tests() {
  local xdist=() tests=(tests/test_cuda.py)
  "$PYTHON" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  [ -f tests/test_determinism.py ] && tests+=(tests/test_determinism.py)
  QGOFT_REQUIRE_CUDA=1 "$PYTHON" -m pytest "${tests[@]}" -q -rfE -p no:cacheprovider "${xdist[@]}" \
    --junitxml="$OUTDIR/tests.xml"
}

# The device-parameterised op tests (ops, bad input with CPU/CUDA error parity, determinism, fuzz, backends):
# their CUDA cases only.
run_op_tests() {
  local xdist=()
  "$PYTHON" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  QGOFT_REQUIRE_CUDA=1 "$PYTHON" -m pytest tests/test_ops.py tests/test_bad_input.py tests/test_determinism.py \
    tests/test_fuzz.py tests/test_backends.py -k cuda -q -rfE -p no:cacheprovider "${xdist[@]}" \
    --junitxml="$OUTDIR/op_tests.xml"
}

# The four compute-sanitizer tools at once (they share the GPU; each has its own log and exit status).
sanitize_all() {
  [ -n "$SANITIZER" ] || { echo "compute-sanitizer not found"; return 1; }
  local pids=() tool rc=0
  for tool in memcheck racecheck initcheck synccheck; do
    local extra=() subset=()
    [ "$tool" = racecheck ] && extra=(--racecheck-report all)
    case "$tool" in racecheck|synccheck) subset=(--float32-only) ;; esac
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" "${extra[@]}" --error-exitcode 97 \
      --print-limit 20 "$PYTHON" tools/gpu_sanitize_case.py "${subset[@]}" > "$OUTDIR/sanitizer_$tool.log" 2>&1 &
    pids+=("$!")
  done
  local i=0
  for tool in memcheck racecheck initcheck synccheck; do
    wait "${pids[$i]}"; local r=$?; i=$((i + 1))
    local summary; summary="$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUTDIR/sanitizer_$tool.log" | tail -1)"
    local done_line; done_line="$(grep -E "^sanitize case OK|^case [0-9]+/" "$OUTDIR/sanitizer_$tool.log" | tail -1)"
    echo "$tool: rc=$r; ${summary:-no summary}; ${done_line:-no case ran}"
    if [ $r != 0 ] || ! grep -q "^sanitize case OK" "$OUTDIR/sanitizer_$tool.log"; then rc=1; fi
  done
  return $rc
}

# ------------------------------------------------------------------------------------------------
PYBIN="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")"
NVCC="${CUDACXX:-}"
if [ -z "$NVCC" ]; then
  for c in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" /usr/local/cuda/bin/nvcc "$(command -v nvcc || true)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then NVCC="$c"; break; fi
  done
fi
CMAKE="$(command -v cmake || true)"; [ -x "$PYBIN/cmake" ] && CMAKE="$PYBIN/cmake"
NINJA="$(command -v ninja || true)"; [ -x "$PYBIN/ninja" ] && NINJA="$PYBIN/ninja"
SANITIZER="$(command -v compute-sanitizer || true)"
for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [ -z "$SANITIZER" ] && [ -x "$c" ] && SANITIZER="$c"
done
export NVCC CMAKE NINJA SANITIZER ROOT OUTDIR BUILD PYTHON JOBS DRY BASELINE_SRC
export -f env_report cmake_build build_extension build_baseline baseline_compare load_check run_tests run_op_tests \
  sanitize_all

part env 40 env.log env_report
cat "$OUTDIR/env.log"
GPU=0
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null && GPU=1
if [ "$DRY" = 1 ]; then
  log "dry run: GPU-only parts are skipped"
  part script 10 script.log bash -n "$0"
  dry build "needs the CUDA toolchain of the GPU machine"
  part ptxas 120 ptxas.txt "$PYTHON" tools/cuda_resource_report.py --sources csrc/cuda/chain_launch.cu
  dry load "needs a GPU"
  dry variants "needs a GPU"
  part chain 300 bench_gpu.log "$PYTHON" bench/bench_gpu.py --dry-run --layout-variants base,reg,reg+prefetch --out "$OUTDIR"
  dry tests "needs a GPU"
  dry op-tests "needs a GPU"
  part sanitize-list 30 sanitizer_list.log "$PYTHON" tools/gpu_sanitize_case.py --list
  dry sanitize "compute-sanitizer needs a GPU"
  part layer 120 run_layer.log "$PYTHON" bench/run.py --smoke --device cpu --only layer --out-dir "$OUTDIR/run" --no-readme
  dry model "bench/run.py's model part needs a GPU for target 5"
  baseline_parts
elif [ "$GPU" = 0 ]; then
  record gpu FAIL "$(elapsed)" "torch sees no GPU (use --dry-run on a machine without one)"
else
  part build 150 build.log build_extension
  part ptxas 60 ptxas.txt "$PYTHON" tools/cuda_resource_report.py --binary qgoft/libqgoft_cuda.so --out "$OUTDIR/ptxas.json"
  part load 30 load.log load_check
  part variants 60 variants.log "$PYTHON" tools/gpu_variant_check.py --variants table,reg,table+prefetch,reg+single,reg+pair,reg+pair+nol2,reg+prefetch+recompute
  part chain 180 bench_gpu.log "$PYTHON" bench/bench_gpu.py --rounds 11 --variants reg,reg+prefetch,reg+serial,reg+prefetch+single,reg+prefetch+pair,reg+prefetch+pair+nol2,reg+prefetch+recompute \
    --layout-variants base,reg,reg+prefetch --out "$OUTDIR"
  part tests 120 tests.log run_tests
  part sanitize 180 sanitize.log sanitize_all
  part layer 60 run_layer.log "$PYTHON" bench/run.py --quick --device cuda --only layer --out-dir "$OUTDIR/run" --no-readme
  if [ -z "${QGOFT_MINILM_PATH:-}" ] && [ -d "$ROOT/build/minilm" ]; then
    export QGOFT_MINILM_PATH="$ROOT/build/minilm"; log "model: the MiniLM weights of $QGOFT_MINILM_PATH"
  fi
  part model 120 run_model.log "$PYTHON" bench/run.py --quick --device cuda --only model --model-batch 256 --model-seq 128 --out-dir "$OUTDIR/run" --no-readme
  baseline_parts
  part op-tests 150 op_tests.log run_op_tests
fi
extra_checks
FINISHED=1
exit $FAILED
