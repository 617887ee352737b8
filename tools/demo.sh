#!/usr/bin/env bash
# Sets up ./.venv (torch, build tools, qgoft built from this checkout) and runs the main job: qGOFT
# fine-tuning of the real all-MiniLM-L6-v2 on Rotten Tomatoes snippets (examples/finetune_sentiment.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export PATH="$PWD/${QGOFT_VENV:-.venv}/bin:$PATH"
python examples/finetune_sentiment.py "$@"
