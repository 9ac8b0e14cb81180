"""The two fine-tuning backends against each other (the training environment: onnxruntime-training and torch).

Same model, same fixed data, same settings, 20 steps: the loss of every step agrees to 1e-4 relative and the two
exports agree to 1e-5 of the output scale. Both backends run the same training graph with the same optimizer
formula (onnxruntime-training's AdamW, adam_mode 1), so what is left is float32 summation order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.test_training import HAVE_TRAINING, _data, _tiny_onnx
from tests.test_training_preserve import _run, _tiny

pytestmark = pytest.mark.skipif(not HAVE_TRAINING, reason="onnxruntime-training is not installed (train env only)")
torch = pytest.importorskip("torch")

STEPS = 20


def _both(path: Path, data: dict[str, np.ndarray], tmp: Path, **settings) -> tuple[list, list, np.ndarray, np.ndarray]:
    from normact_onnx.training import finetune

    runs = {}
    for backend in ("ort", "torch"):
        runs[backend] = finetune(
            path, data, output=tmp / f"{backend}.onnx", backend=backend, max_steps=STEPS, progress=False, **settings
        )
    x = {k: v for k, v in data.items() if k not in ("y", "__y")}
    return (
        runs["ort"].losses,
        runs["torch"].losses,
        _run(tmp / "ort.onnx", x),
        _run(tmp / "torch.onnx", x),
    )


CASES = [
    # (id, optimizer, lr, method): ANAct from the Gaussian start, AdamW and SGD; the model as it is
    ("anact-adamw", "adamw", 1e-3, "anact"),
    ("anact-sgd", "sgd", 0.05, "anact"),
    ("none-adamw", "adamw", 1e-3, "none"),
]


@pytest.mark.parametrize(("optimizer", "lr", "method"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_backends_take_the_same_steps(tmp_path: Path, optimizer: str, lr: float, method: str) -> None:
    path = tmp_path / "tiny.onnx"
    _tiny_onnx(path)
    x, y = _data(320)
    ort_losses, torch_losses, a, b = _both(
        path, {"x": x, "y": y}, tmp_path, optimizer=optimizer, lr=lr, method=method, batch_size=16, init="normalize"
    )
    assert len(ort_losses) == len(torch_losses) == STEPS
    np.testing.assert_allclose(torch_losses, ort_losses, rtol=1e-4)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * max(1.0, float(np.abs(a).max())))


def test_backends_agree_on_the_pretrained_path(tmp_path: Path) -> None:
    """The preserved (compensated) path: same step-1 loss (the model's own), same curve, same export."""
    path = tmp_path / "tiny.onnx"
    _tiny(path, 3.0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 8)).astype(np.float32) / 3
    y = (_run(path, {"x": x}) + 0.1).astype(np.float32)
    ort_losses, torch_losses, a, b = _both(
        path, {"x": x, "y": y}, tmp_path, loss="mse", lr=1e-3, batch_size=16, epochs=STEPS
    )
    np.testing.assert_allclose(torch_losses, ort_losses, rtol=1e-4)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * max(1.0, float(np.abs(a).max())))
