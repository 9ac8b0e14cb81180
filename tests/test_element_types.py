"""float64 models rewrite into a form that runs; float16 --preserve-function is checked at float16's precision.

Issue 20: the Norm<Act> functions have no double, so a float64 model failed its own verification; a float16
preserve always failed (3.6e-4 against float32's 1e-4, "float noise 0").
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from normact_onnx.api import rewrite
from normact_onnx.verify import ULP_FACTOR, type_tolerance

from .conftest import MODELS, run_model, to_low_precision

MODEL = MODELS / "mlp_relu.dynamo.onnx"


def test_float64_model_rewrites_with_standard_ops_and_matches_float32(tmp_path):
    onnx.save(to_low_precision(onnx.load(MODEL), TensorProto.DOUBLE), tmp_path / "d.onnx")
    res = rewrite(tmp_path / "d.onnx", tmp_path / "d.out.onnx", details=True)  # verified in ORT
    assert [o.form for o in res.rewritten] == ["subgraph", "subgraph"]
    assert sum("float64" in n for n in res.notes) == 1  # said once
    ref = rewrite(MODEL, tmp_path / "f.out.onnx", details=True)  # float32: the catalogue's function form
    assert [o.form for o in ref.rewritten] == ["function", "function"]
    x = np.random.default_rng(0).standard_normal((5, 64))
    (y64,) = run_model(tmp_path / "d.out.onnx", {"x": x})
    (y32,) = run_model(tmp_path / "f.out.onnx", {"x": x.astype(np.float32)})
    assert y64.dtype == np.float64
    np.testing.assert_allclose(y64, y32, rtol=1e-4, atol=1e-5 * float(np.abs(y64).max()))


def test_float16_preserve_uses_the_types_tolerance(tmp_path):
    onnx.save(to_low_precision(onnx.load(MODEL)), tmp_path / "h.onnx")
    res = rewrite(tmp_path / "h.onnx", tmp_path / "h.out.onnx", preserve_function=True, details=True)
    tol = type_tolerance(np.dtype(np.float16), 1e-4)
    assert tol == ULP_FACTOR * float(np.finfo(np.float16).eps)
    assert len(res.rewritten) == 2 and res.whole_model["max_rel_to_scale"] <= tol
    assert type_tolerance(np.dtype(np.float32), 1e-4) == 1e-4  # float32 keeps its tolerance
    x = np.random.default_rng(1).standard_normal((7, 64)).astype(np.float16)
    (a,) = run_model(tmp_path / "h.onnx", {"x": x})
    (b,) = run_model(tmp_path / "h.out.onnx", {"x": x})
    scale = float(np.abs(a.astype(np.float64)).max())
    assert float(np.abs(a.astype(np.float64) - b).max()) <= tol * scale
