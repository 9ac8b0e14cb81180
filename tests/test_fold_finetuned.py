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
