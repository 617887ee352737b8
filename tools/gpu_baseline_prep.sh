#!/usr/bin/env bash
# Prepares, on a machine WITH this repository's git history, the sources of an earlier commit for the GPU
# check's `baseline` part (tools/gpu_check.sh), which builds them on the GPU machine beside this tree and times
# both builds' chain kernels side by side (tools/gpu_baseline_compare.py). The GPU machine gets a copy of the
# working tree without .git, so the earlier sources travel as an ignored folder named in the device call's
# `carry` list:
#
#   bash tools/gpu_baseline_prep.sh aa2e294     # writes build/baseline/ (about 0.4 MB); then carry build/baseline
#
# build/baseline/src    `git archive COMMIT` of CMakeLists.txt, cmake/ and csrc/ (the ops library's sources;
#                       the Python package is not needed: the timing processes use this tree's layouts)
# build/baseline/COMMIT the earlier commit: short hash, date, subject
# (this tree's label is taken when the comparison runs: the folder may be carried again at later commits)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# = 1 ] || { echo "usage: bash tools/gpu_baseline_prep.sh COMMIT   (e.g. aa2e294)" >&2; exit 2; }
COMMIT="$(git rev-parse --verify "$1^{commit}")" || { echo "gpu_baseline_prep: no commit '$1' here" >&2; exit 1; }
for path in CMakeLists.txt cmake csrc/ops.cpp; do
  git cat-file -e "$COMMIT:$path" 2>/dev/null || { echo "gpu_baseline_prep: $1 has no $path" >&2; exit 1; }
done
DEST=build/baseline
rm -rf "$DEST"
mkdir -p "$DEST/src"
git archive "$COMMIT" CMakeLists.txt cmake csrc | tar -x -C "$DEST/src"
git log -1 --format='%h %cs %s' "$COMMIT" > "$DEST/COMMIT"
echo "gpu_baseline_prep: $DEST/src holds $(cut -c1-80 "$DEST/COMMIT") ($(du -sh "$DEST" | cut -f1));"
echo "  on the GPU machine: carry build/baseline, run bash tools/gpu_check.sh (its baseline part builds and times it)"
