"""fold after finetune's export of a preserved model, in the regular environment.

``finetune`` writes each trained site's S·(f − H) between the activation and the affine tail
``rewrite --preserve-function`` wrote (training/export.py); fold composes both with the site's record and
removes them together. The export step is the one the training environment runs (its graph code needs no
onnxruntime-training); the trained constants of the first test are arbitrary, not a training result.

The second test trains for real (the torch backend, CPU): ANAct moves every site to S·(f − H), preserve's
helpers follow S, H (docs/math.md §2.7), and fold gives back the original's graph with the trained weights.
The same on onnxruntime-training: tests/test_training_preserve.py (training environment).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests import real_models as rm


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_fold_absorbs_finetunes_tail_in_front_of_a_preserved_site() -> None:
    from normact_onnx.api import rewrite
    from normact_onnx.deploy import fold
    from normact_onnx.methods.static import Affine
    from normact_onnx.provenance import read_records
    from normact_onnx.training.export import update_tail_sites

    e = rm.entry("ppocr_cls")
    path = rm.require_path(e, rm.model_path(e))
    feeds = rm.sample_batches(e, 1, 2)[0]
    preserved = rewrite(path, preserve_function=True, verify=False)
    records = [r for r in read_records(preserved) if r.get("form") == "subgraph"]
    assert len(records) == 33
    # a gain and an offset per site, as a trained α, λ, μ leave them (S ≈ 1 ± 0.05, H ≈ ±0.05: far larger than 3 steps)
    rng = np.random.default_rng(0)
    constants = {
        r["act_output"]: Affine(float(1 + 0.05 * rng.standard_normal()), float(0.05 * rng.standard_normal()), 0.0)
        for r in records
    }
    tuned = onnx.ModelProto()
    tuned.CopyFrom(preserved)
    update_tail_sites(tuned, [SimpleNamespace(output=a, reference=(1.0, 0.0)) for a in constants], constants, set())
    assert sum("normact_finetune" in n.name for n in tuned.graph.node) >= 33
    want = _run(tuned, feeds)
    assert np.abs(want - _run(preserved, feeds)).max() > 1e-3 * np.abs(want).max()  # the tails change the function

    out = fold(tuned, data=[feeds], details=True)
    assert len(out.folded) == 33 and not out.kept, [o.reason for o in out.kept]
    assert not [n.name for n in out.model.graph.node if "normact_finetune" in n.name or n.domain == "ai.normact"]
    got = _run(out.model, feeds)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_fold_of_a_finetuned_anact_model_is_the_original_graph(tmp_path: Path) -> None:
    """ppocr_cls → finetune (pretrained path, ANAct, 3 AdamW steps on the torch backend) → fold: every site folds,
    no ``ai.normact`` node and no preserve helper (Pad, restore) is left, the node count is M's (≤ + 2 %), and the
    folded model computes the fine-tuned one (≤ 1e-5 of the output scale), which training moved away from M."""
    pytest.importorskip("torch")
    from normact_onnx.deploy import fold
    from normact_onnx.training import finetune
    from tests.test_training_real import _task

    e = rm.entry("ppocr_cls")
    path = rm.require_path(e, rm.model_path(e))
    feeds = rm.sample_batches(e, 1, 2)[0]
    loss, y = _task(path, feeds)
    tuned = tmp_path / "tuned.onnx"
    res = finetune(path, {**feeds, "__y": y}, labels="__y", loss=loss, batch_size=len(y), epochs=3, lr=1e-4,
                   output=tuned, method="anact", init="preserve", backend="torch", device="cpu", threads=1,
                   progress=False)  # fmt: skip
    hidden = sum(e["sites"]["hidden"].values())
    assert len(res.sites) == hidden and all(s["method"] == "anact" for s in res.sites)
    assert sum(len(s.get("helpers", [])) for s in res.sites) >= 20  # preserve's Pads and restores, followed
    alphas = np.array([s["alpha"] for s in res.sites])
    assert np.abs(alphas).max() > 1e-6  # α trained: S ≠ s₀, what the helpers had to follow

    out = fold(tuned, data=[feeds], details=True)
    assert len(out.folded) == hidden and not out.kept, [o.reason for o in out.kept]
    left = [n.name for n in out.model.graph.node if n.domain == "ai.normact" or "normact" in n.name]
    assert not left, left
    original = onnx.load(str(path))
    assert len(out.model.graph.node) <= 1.02 * len(original.graph.node)
    want = _run(onnx.load(str(tuned)), feeds)
    scale = float(np.abs(want).max())
    assert np.abs(want - _run(original, feeds)).max() > 1e-3 * scale  # training moved the function
    np.testing.assert_allclose(_run(out.model, feeds), want, rtol=0, atol=1e-5 * scale)


def test_half_a_restore_is_completed_by_the_export(tmp_path: Path) -> None:
    """A site preserved at h₀ = 0 has a restore ``Mul`` (1/s₀) and no ``Add`` in front of its gate; once trained it
    is S·(f − H) with H ≠ 0 in general, so the export writes the whole restore (1/S, then H) and fold removes it."""
    pytest.importorskip("torch")
    from onnx import TensorProto, helper, numpy_helper

    from normact_onnx.api import rewrite
    from normact_onnx.deploy import fold
    from normact_onnx.methods.static import Affine
    from normact_onnx.training import finetune

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), "w0"),
        numpy_helper.from_array((rng.standard_normal((8, 3)) / 3).astype(np.float32), "w1"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["m0"]),
        helper.make_node("Tanh", ["m0"], ["t0"]),
        helper.make_node("Mul", ["t0", "x"], ["g"]),  # a gate: it cannot absorb the inverse
        helper.make_node("MatMul", ["g", "w1"], ["y"]),
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", d]) for n, d in (("x", 8), ("y", 3))]
    m = helper.make_model(
        helper.make_graph(nodes, "gate", io[:1], io[1:], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    m.ir_version = 8
    preserved = tmp_path / "p.onnx"
    rewrite(
        m, preserved, preserve_function=True, constants=lambda s: Affine(2.0, 0.0, 0.0), all_sites=True, verify=False
    )
    assert [n.op_type for n in onnx.load(str(preserved)).graph.node if "normact_restore" in n.name] == ["Mul"]
    x = rng.standard_normal((32, 8)).astype(np.float32)
    y = (_run(m, {"x": x}) + 0.3).astype(np.float32)
    tuned = tmp_path / "t.onnx"
    torch_cpu = {"backend": "torch", "device": "cpu", "threads": 1, "progress": False}
    res = finetune(preserved, {"x": x, "y": y}, output=tuned, loss="mse", batch_size=32, epochs=5, lr=1e-2,
                   init="preserve", all_sites=True, **torch_cpu)  # fmt: skip
    assert [h["ops"] for h in res.sites[0]["helpers"]] == [["Mul"]]
    t = onnx.load(str(tuned))
    restore = [n.op_type for n in t.graph.node if "normact_restore" in n.name]
    assert restore == ["Mul", "Add"], restore
    out = fold(t, data=[{"x": x}], details=True)
    assert len(out.folded) == 1 and not [n.name for n in out.model.graph.node if "normact" in n.name]
    assert [n.op_type for n in out.model.graph.node] == [n.op_type for n in m.graph.node]
    want = _run(t, {"x": x})
    np.testing.assert_allclose(_run(out.model, {"x": x}), want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_exported_weights_hold_no_subnormal_floats():
    """The export zeroes subnormal float32/float64 trained weights (a slow CPU path, no measurable effect on
    outputs) and nothing else: normal values, zeros, the smallest normal float, float16 and integers keep their
    bits."""
    from normact_onnx.training.export import flush_subnormals

    for dtype in (np.float32, np.float64):
        tiny = np.finfo(dtype).tiny
        w = np.array([1.0, -tiny, tiny, tiny / 4, -tiny / 1000, 0.0, 3e-5], dtype)
        got = flush_subnormals(w)
        assert got.dtype == dtype and w[3] != 0  # the input is not changed in place
        np.testing.assert_array_equal(got, np.array([1.0, -tiny, tiny, 0, 0, 0, 3e-5], dtype))
    ints, half = np.arange(4, dtype=np.int64), np.array([3e-5, 1e-7], np.float16)  # float16 subnormals both
    assert flush_subnormals(ints) is ints and flush_subnormals(half) is half
