"""fold after finetune's export of a preserved subgraph-form model, in the regular environment.

``finetune`` writes each trained site's S·(f − H) between the activation and the affine tail
``rewrite --preserve-function`` wrote (training/export.py); fold composes both with the site's record and
removes them together. The export step is the one the training environment runs (its graph code needs no
onnxruntime-training); the trained constants here are arbitrary, not a training result.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort

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
