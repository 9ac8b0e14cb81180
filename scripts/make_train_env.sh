#!/usr/bin/env bash
# Build the fine-tuning environment (onnxruntime-training cannot share one with onnxruntime).
#
#   scripts/make_train_env.sh [VENV_DIR]        # default: train-env/ in the repository root
#
# onnxruntime-training-cpu 1.19.2 is the last release: CPU wheels for Python <= 3.11 only, so this
# needs python3.11 (PYTHON=... to choose another <= 3.11 interpreter). torch is pinned to the CPU
# build 2.13.0 through the [train] extra (a plain `torch` would pull the multi-GB CUDA build).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/train-env}"
PYTHON="${PYTHON:-python3.11}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] > (3, 11))' \
  || { echo "make_train_env: $PYTHON is newer than 3.11; onnxruntime-training-cpu 1.19.2 has no wheels for it" >&2; exit 2; }
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet "$ROOT[train]" pytest scipy scikit-learn  # scipy, scikit-learn: the real-model sample batches
"$VENV/bin/python" -c 'import onnxruntime.training.api, normact_onnx.training; print("train env ready:", __import__("onnxruntime").__version__)'
