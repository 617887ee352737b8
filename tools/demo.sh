#!/usr/bin/env bash
# Sets up ./.venv (torch, build tools, qgoft built from this checkout) and runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export PATH="$PWD/${QGOFT_VENV:-.venv}/bin:$PATH"
python examples/train_toy.py "$@"
