#!/usr/bin/env bash
# Proves that plain `pip install .` (pip's build isolation ON) gives a library that loads and uses the
# fused kernels under every supported torch, not the reference fallback (docs/BUILD.md):
#   1. creates a fresh virtual environment with the first torch of QGOFT_ISO_TORCHES (default 2.13.0, CPU)
#      and the test tools (with the venv's own pip: pip >= 26.2 would ignore a machine's pip constraints
#      inside the build environment),
#   2. runs `pip install .` on a copy of this checkout (tracked and untracked, non-ignored files: no
#      build directory or binaries of the checkout); pip builds in an isolated environment with the torch
#      of pyproject.toml's build requirements (the newest allowed, not the installed one),
#   3. checks that the installed qgoft loaded its compiled ops (build_info: stable ABI, the torch it was
#      built against vs the running one),
#   4. runs the op tests (QGOFT_ISO_TESTS) against the installed package under that torch, then installs
#      each further torch of QGOFT_ISO_TORCHES into the same environment (qgoft untouched) and runs them
#      again.
# Environment: QGOFT_ISO_DIR (default build/isolated-install), QGOFT_ISO_TORCHES (default "2.13.0 2.14.1"),
# QGOFT_ISO_TESTS (default "tests/test_ops.py tests/test_backends.py tests/test_extension.py"),
# QGOFT_BUILD_JOBS, PYTHON (default python3). CI runs it with the defaults (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
DIR="${QGOFT_ISO_DIR:-build/isolated-install}"
case "$DIR" in /*) ;; *) DIR="$ROOT/$DIR" ;; esac
read -r -a TORCHES <<< "${QGOFT_ISO_TORCHES:-2.13.0 2.14.1}"
read -r -a TESTS <<< "${QGOFT_ISO_TESTS:-tests/test_ops.py tests/test_backends.py tests/test_extension.py}"
PYTHON="${PYTHON:-python3}"
export QGOFT_BUILD_JOBS="${QGOFT_BUILD_JOBS:-$(nproc)}"

fail() { echo "check_isolated_install: FAILED: $*" >&2; exit 1; }
step() { echo "check_isolated_install: $*"; }

rm -rf "$DIR"
mkdir -p "$DIR/src" "$DIR/run"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$DIR/src"
"$PYTHON" -m venv "$DIR/venv"
PY="$DIR/venv/bin/python"
"$PY" -m pip install -q "torch==${TORCHES[0]}" numpy pytest hypothesis
step "torch $("$PY" -c 'import torch; print(torch.__version__)') installed; pip install . (build isolation on)"
start=$(date +%s)
(cd "$DIR/src" && "$PY" -m pip install . > "$DIR/pip-install.log" 2>&1) ||
  { tail -40 "$DIR/pip-install.log"; fail "pip install . (log: $DIR/pip-install.log)"; }
grep -E "^qgoft: building against" "$DIR/pip-install.log" || true
step "pip install . took $(( $(date +%s) - start )) s"

for i in "${!TORCHES[@]}"; do
  if [ "$i" -gt 0 ]; then
    "$PY" -m pip install -q "torch==${TORCHES[$i]}"
  fi
  # From an empty directory: the checkout's qgoft/ must not shadow the installed package.
  (cd "$DIR/run" && "$PY" - "$DIR/venv" "$DIR/src") <<'EOF' || fail "the installed qgoft did not load its compiled ops"
import sys
from pathlib import Path
import torch
import qgoft
assert Path(qgoft.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), qgoft.__file__
info = qgoft.build_info()
assert info["extension_loaded"], info.get("extension_error")
assert info["abi"] == "stable", info
# Every package of the source tree was installed (a subpackage missing from the packaging config is not).
src = Path(sys.argv[2]) / "qgoft"
wanted = {str(p.parent.relative_to(src.parent)) for p in src.rglob("__init__.py")}
have = {str(p.parent.relative_to(Path(qgoft.__file__).parent.parent)) for p in Path(qgoft.__file__).parent.rglob("__init__.py")}
assert wanted <= have, f"packages missing from the installed qgoft: {sorted(wanted - have)}"
print(f"check_isolated_install: torch {torch.__version__} running, qgoft built against torch "
      f"{info['torch_version_built']} (stable ABI, torch >= {info['torch_abi_floor']}), CPU kernels "
      f"{info['cpu_isa_selected']}")
EOF
  step "op tests under torch ${TORCHES[$i]}: ${TESTS[*]}"
  log="$DIR/tests-${TORCHES[$i]}.log"
  (cd "$DIR/run" && "$PY" -m pytest -q -x -p no:cacheprovider --rootdir="$ROOT" "${TESTS[@]/#/$ROOT/}" \
    > "$log" 2>&1) || { tail -30 "$log"; fail "tests under torch ${TORCHES[$i]} (log: $log)"; }
  tail -1 "$log"
done
step "OK: one isolated build, op tests passed under torch ${TORCHES[*]}"
