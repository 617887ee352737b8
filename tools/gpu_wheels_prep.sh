#!/usr/bin/env bash
# Prepares, on a machine with network access to a package index, the Python wheels the GPU check needs and
# the GPU machine lacks (it has torch, transformers, peft, pytest; no network). They travel as the ignored
# folder build/wheels, named in the device call's `carry` list; tools/gpu_check.sh installs every wheel
# it finds there into build/gpu-check/site (pip --target, no index, no dependencies) before its parts run.
#
#   bash tools/gpu_wheels_prep.sh                         # torchao==0.18.0 (the version CI tests)
#   bash tools/gpu_wheels_prep.sh bitsandbytes==0.50.2    # other packages instead (NAME==VERSION ...)
#
# Wheels for the GPU machine's Python 3.12 on x86-64 manylinux. A device call carries 64 MiB at most (the
# working tree and every carried folder together): torchao 0.18.0 is 3.4 MB, bitsandbytes 0.50.2 43 MB,
# so the two quantization packages and the bf16 MiniLM weights (tools/gpu_minilm_prep.sh) do not fit one
# call together. The script prints the folder's size.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ $# -gt 0 ] || set -- torchao==0.18.0
DEST=build/wheels
rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  platforms+=(--platform "$p")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" "$@"
ls -la "$DEST"/*.whl
echo "gpu_wheels_prep: $DEST holds $(ls "$DEST"/*.whl | wc -l) wheel(s), $(du -sh "$DEST" | cut -f1) (a device call carries 64 MiB in all);"
echo "  on the GPU machine: carry build/wheels, run bash tools/gpu_check.sh (it installs them first)"
