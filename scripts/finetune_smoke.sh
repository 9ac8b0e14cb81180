#!/usr/bin/env bash
# CI smoke test of fine-tuning: train env runs `normact-onnx finetune` on a bundled model for a few steps,
# then the regular environment loads the exported model and reproduces the training graph's last outputs.
#
#   scripts/finetune_smoke.sh TRAIN_PYTHON MAIN_PYTHON
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TRAIN_PY="$1"; MAIN_PY="$2"
WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
"$MAIN_PY" - "$WORK" <<'PY'
import sys, numpy as np
rng = np.random.default_rng(0); w = rng.standard_normal((64, 10))
for name, n in (("train", 512), ("val", 128)):
    x = rng.standard_normal((n, 64)).astype(np.float32)
    np.savez(f"{sys.argv[1]}/{name}.npz", x=x, y=(x @ w).argmax(1))
PY
"$TRAIN_PY" -m normact_onnx.cli finetune "$ROOT/models/mlp_relu.torchscript.onnx" --data "$WORK/train.npz" \
  --val "$WORK/val.npz" --epochs 2 --batch-size 64 --lr 3e-3 -o "$WORK/tuned.onnx" --quiet
"$MAIN_PY" - "$WORK" <<'PY'
import sys, numpy as np, onnxruntime as ort
work = sys.argv[1]
check = np.load(f"{work}/tuned.train/export_check.npz")
got = ort.InferenceSession(f"{work}/tuned.onnx", providers=["CPUExecutionProvider"]).run(None, {"x": check["x"]})[0]
np.testing.assert_allclose(got, check["expected"], rtol=1e-4, atol=1e-5)
print(f"finetune smoke: export reproduces the training graph in onnxruntime {ort.__version__} "
      f"(max |diff| {np.abs(got - check['expected']).max():.2g})")
PY
