"""Fine-tuning real exported models through ONNX Runtime training (train environment only).

Each model overfits one small batch of its manifest recipe (tests/real_models) for a few steps: the
loss must fall, and the exported model must reproduce the training graph's outputs in a plain
inference session (in the regular environment too where .ci/run names it in NORMACT_MAIN_PYTHON).
The loss follows what the model ends with: Softmax → cross-entropy on the logits (per position for
[N, T, C] sequences), Sigmoid → bce on the logits, anything else → mse.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests import real_models as rm

try:
    import onnxruntime.training.api  # noqa: F401

    HAVE_TRAINING = True
except ImportError:
    HAVE_TRAINING = False
pytestmark = pytest.mark.skipif(not HAVE_TRAINING, reason="onnxruntime-training is not installed (train env only)")

# (model id, steps, learning rate, method): small enough for CI's 2 cores. "none" trains the pretrained
# model as it is (the graph preparation under test); ANAct on a model that was not rewritten with
# --preserve-function starts from the Gaussian λ, μ, far from the pretrained activations.
# BatchNormalization trains frozen at its running statistics (fine-tuning keeps the model's function), so
# nothing rescales a step for the layers in front of it: picodet's frozen BNs make its loss surface sharp, and
# AdamW at 1e-4 overshoots (measured 0.00981 → 0.00991 → 0.00997); at 1e-5 its first step, a sign step along
# the gradient, must lower the loss (0.00981 → 0.00978) unless the gradient is wrong.
REAL = [
    ("ppocrv4_det", 3, 1e-4, "none"),
    ("yolov8n_doclaynet", 3, 1e-4, "none"),
    ("picodet_layout_cdla", 3, 1e-5, "none"),
    ("ppocr_cls", 3, 1e-4, "none"),
    ("ppocrv4_rec", 3, 1e-4, "none"),
    ("ppocrv5_det_small", 3, 1e-4, "none"),
]


def _head(model: onnx.ModelProto) -> str:
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(model.graph.output[0].name)
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    return node.op_type if node is not None else ""


def _task(path: Path, feeds: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
    """A loss for the model's first output and labels the pretrained model gets wrong (so there is a loss to lower)."""
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    head = _head(model)
    if head in ("Softmax", "LogSoftmax") and out.ndim >= 2:
        while out.ndim > 2 and out.shape[-1] == 1:  # [N, C, 1, 1] classifiers: the classes are axis 1
            out = out[..., 0]
        return "cross-entropy", (out.argmax(-1) + 1) % out.shape[-1]
    if head == "Sigmoid":
        return "bce", (out < 0.5).astype(np.float32)
    return "mse", (out * 0.5 + 0.1).astype(np.float32)


@pytest.mark.parametrize(("model_id", "steps", "lr", "method"), REAL, ids=[f"{r[0]}-{r[3]}" for r in REAL])
def test_real_model_overfits_one_batch_and_exports(
    tmp_path: Path, model_id: str, steps: int, lr: float, method: str
) -> None:
    import onnxruntime as ort

    from normact_onnx.training import finetune

    e = rm.entry(model_id)
    path = rm.require_path(e, rm.model_path(e))
    feeds = rm.sample_batches(e, 1, 2)[0]
    loss, y = _task(path, feeds)
    n = len(y)
    res = finetune(
        path,
        {**feeds, "__y": y},
        labels="__y",
        loss=loss,
        batch_size=n,
        epochs=steps,
        lr=lr,
        method=method,
        output=tmp_path / "tuned.onnx",
        progress=False,
    )
    assert len(res.losses) == steps and all(np.isfinite(res.losses))
    assert min(res.losses[1:]) < res.losses[0], res.losses
    assert res.export_max_abs_diff is not None
    # the export keeps the model's own opset and runs in a plain inference session
    src, out = onnx.load(str(path), load_external_data=False), onnx.load(str(tmp_path / "tuned.onnx"))
    assert {o.domain: o.version for o in out.opset_import}.get("", 0) == {
        o.domain: o.version for o in src.opset_import
    }.get("", 0)
    check = np.load(res.workdir / "export_check.npz")
    expected = check["expected"]
    inputs = {k: check[k] for k in check.files if k != "expected"}
    got = ort.InferenceSession(str(tmp_path / "tuned.onnx"), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max())))
    main = os.environ.get("NORMACT_MAIN_PYTHON")
    if main:  # the regular environment (onnxruntime, not -training) loads and reproduces it too
        code = (
            "import sys, numpy as np, onnxruntime as ort; c = np.load(sys.argv[2]);"
            "x = {k: c[k] for k in c.files if k != 'expected'};"
            "g = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']).run(None, x)[0];"
            "e = c['expected']; d = float(np.abs(g - e).max()); print(d);"
            "sys.exit(0 if d <= 1e-4 * max(1.0, float(np.abs(e).max())) else 1)"
        )
        r = subprocess.run(
            [main, "-c", code, str(tmp_path / "tuned.onnx"), str(res.workdir / "export_check.npz")],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout + r.stderr


def test_op_without_gradient_fails_in_one_line_and_cleans_up(tmp_path: Path) -> None:
    """magika ends in a GlobalMaxPool, which ORT 1.19 cannot differentiate: exit 2, the node named, nothing left."""
    import sys

    e = rm.entry("magika")
    path = rm.require_path(e, rm.model_path(e))
    feeds = rm.sample_batches(e, 1, 2)[0]
    loss, y = _task(path, feeds)
    np.savez(tmp_path / "d.npz", **feeds, y=y)
    out = tmp_path / "m.tuned.onnx"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "normact_onnx.cli",
            "finetune",
            str(path),
            "--data",
            str(tmp_path / "d.npz"),
            "--loss",
            loss,
            "--batch-size",
            "2",
            "--method",
            "none",
            "-o",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "GlobalMaxPool" in lines[0] and "--freeze" in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]  # no m.tuned.train/, no m.tuned.onnx


# ---- the pretrained path: rewrite --preserve-function → finetune → fold, on MiniLM -----------------
ROOT = Path(__file__).resolve().parents[1]
_PREPARE_MINILM = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1] + "/models")
from minilm import export_minilm, write_distill_data
write_distill_data(export_minilm(sys.argv[2], exporter="torchscript"), sys.argv[3], 2)
d = dict(np.load(sys.argv[3]))
np.savez(sys.argv[3], **{**d, "y": (0.5 * d["y"]).astype(np.float32)})
"""


def minilm_and_preserved(d: Path, prepare: str) -> tuple[Path, Path, Path, str]:
    """MiniLM exported into ``d`` with its data (``prepare``, run in the regular environment with
    transformers: arguments ROOT, model, data) and its rewrite --preserve-function; the regular Python too."""
    main = os.environ.get("NORMACT_MAIN_PYTHON")
    if not main:
        pytest.skip("NORMACT_MAIN_PYTHON (the regular environment, with transformers) is not set")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    model, data, preserved = d / "minilm.onnx", d / "batch.npz", d / "minilm.preserved.onnx"
    r = subprocess.run([main, "-c", prepare, str(ROOT), str(model), str(data)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(
        [main, "-m", "normact_onnx.cli", "rewrite", str(model), "--preserve-function", "-o", str(preserved)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return model, data, preserved, main


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, str]:
    """MiniLM exported, a batch with regression targets, and its --preserve-function rewrite (regular env)."""
    return minilm_and_preserved(tmp_path_factory.mktemp("minilm"), _PREPARE_MINILM)


def test_preserved_model_finetunes_from_the_original_loss_then_folds(
    tmp_path: Path, minilm: tuple[Path, Path, Path, str]
) -> None:
    """rewrite --preserve-function → finetune → fold: the step-0 loss is the original model's."""
    from normact_onnx.training import finetune

    model, data, preserved, main = minilm
    common = {"loss": "mse", "batch_size": 2, "lr": 1e-4, "progress": False}
    plain = finetune(model, data, method="none", epochs=1, output=tmp_path / "plain.onnx", **common)
    tuned = finetune(preserved, data, epochs=3, output=tmp_path / "tuned.onnx", **common)
    assert len(tuned.sites) == 6 and all(s["method"] == "anact" for s in tuned.sites)  # the six FFN GELUs
    assert tuned.losses[0] == pytest.approx(plain.losses[0], rel=1e-4)
    assert min(tuned.losses[1:]) < tuned.losses[0], tuned.losses
    # fold the fine-tuned model in the regular environment; it must still reproduce the training graph
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    folded = tmp_path / "tuned.folded.onnx"
    r = subprocess.run(
        [main, "-m", "normact_onnx.cli", "fold", str(tmp_path / "tuned.onnx"), "-o", str(folded)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    check = np.load(tuned.workdir / "export_check.npz")
    code = (
        "import sys, numpy as np, onnxruntime as ort; c = np.load(sys.argv[2]);"
        "x = {k: c[k] for k in c.files if k != 'expected'};"
        "g = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']).run(None, x)[0];"
        "print(float(np.abs(g - c['expected']).max()))"
    )
    r = subprocess.run(
        [main, "-c", code, str(folded), str(tuned.workdir / "export_check.npz")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout) < 1e-3 * max(1.0, float(np.abs(check["expected"]).max()))
