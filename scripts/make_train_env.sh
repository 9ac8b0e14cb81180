#!/usr/bin/env bash
# Build the fine-tuning environment (onnxruntime-training cannot share one with onnxruntime).
#
#   scripts/make_train_env.sh [VENV_DIR]        # default: train-env/ in the repository root
#
# onnxruntime-training-cpu 1.19.2 is the last release: CPU wheels for Python <= 3.11 only, so this
# needs python3.11 (PYTHON=... to choose another <= 3.11 interpreter). torch is pinned to the CPU
# build 2.13.0 through the [train] extra (a plain `torch` would pull the multi-GB CUDA build).
#
# The package is built from the checkout in its own CMake folder, build/train-<wheel tag>, CPU library only
# (onnxruntime-training-cpu has no CUDA provider): a `pip install .` running at the same time uses build/<wheel tag>,
# and two builds in one folder collide ("file INSTALL cannot find libnormact_cuda.so"). NORMACT_WHEEL=PATH installs
# a built wheel instead (scripts/build_release.sh; CI does this), with nothing compiled.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/train-env}"
PYTHON="${PYTHON:-python3.11}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] > (3, 11))' \
  || { echo "make_train_env: $PYTHON is newer than 3.11; onnxruntime-training-cpu 1.19.2 has no wheels for it" >&2; exit 2; }
"$PYTHON" -m venv "$VENV"
extras=(pytest pytest-xdist scipy scikit-learn)  # scipy, scikit-learn: the real-model sample batches; xdist: the tests on every core
if [ -n "${NORMACT_WHEEL:-}" ]; then
  "$VENV/bin/pip" install --quiet "$(realpath "$NORMACT_WHEEL")[train]" "${extras[@]}"
else
  "$VENV/bin/pip" install --quiet --config-settings=build-dir='build/train-{wheel_tag}' \
    --config-settings=cmake.define.NORMACT_CUDA=OFF "$ROOT[train]" "${extras[@]}"
fi
"$VENV/bin/python" -c 'import onnxruntime.training.api, normact_onnx.training; print("train env ready:", __import__("onnxruntime").__version__)'
