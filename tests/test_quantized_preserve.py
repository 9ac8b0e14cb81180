"""--preserve-function on dynamic-int8 models (onnxruntime quantize_dynamic): refused with why and what to do.

Issue 20: the refusal gave no reason and no way out. A site read by a quantizer (DynamicQuantizeLinear in front
of MatMulInteger/ConvInteger) cannot take its inverse exactly: written in front, the inverse restores the value
up to float rounding, and the quantizer turns that rounding into whole steps. Such sites are refused, naming
the consumer; a quantizer further downstream (after a LayerNorm) shows in the whole-model check, whose failure
now says so. The way out named in both: preserve the float model, then quantize it (checked here).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from normact_onnx.api import rewrite
from normact_onnx.errors import NormactError

from . import real_models as rm
from .conftest import MODELS, run_model

quantization = pytest.importorskip("onnxruntime.quantization")
WAY_OUT = "preserve the float model's function first, then quantize it; or rewrite without --preserve-function"


def _quantize(src, out, per_channel: bool = False):
    quantization.quantize_dynamic(str(src), str(out), per_channel=per_channel)
    assert any(n.op_type == "DynamicQuantizeLinear" for n in onnx.load(str(out)).graph.node)
    return out


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_site_read_by_a_quantizer_is_refused_naming_it(tmp_path, cli, per_channel):
    q = _quantize(MODELS / "mlp_relu.dynamo.onnx", tmp_path / "q.onnx", per_channel)
    r = cli("rewrite", q, "--preserve-function", "-o", tmp_path / "p.onnx")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "consumer DynamicQuantizeLinear 'relu_QuantizeLinear' quantizes the value" in r.stderr
    assert WAY_OUT in r.stderr and not (tmp_path / "p.onnx").exists()
    r = cli("rewrite", q, "-o", tmp_path / "n.onnx")  # the way out without preserving: normalized as usual
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("item", rm.params(["ppocr_cls"]))
def test_a_quantized_cnn_preserves_the_sites_no_quantizer_reads(item, tmp_path):
    e, path = item
    q = _quantize(rm.require_path(e, path), tmp_path / "q.onnx")
    res = rewrite(q, tmp_path / "p.onnx", preserve_function=True, details=True)  # whole model checked
    refused = [o for o in res.outcomes if o.refused]
    assert refused and all("ConvInteger" in o.reason or "DynamicQuantizeLinear" in o.reason for o in refused)
    assert all(WAY_OUT in o.reason for o in refused)
    assert len(res.rewritten) >= 4 and res.whole_model["max_rel_to_scale"] <= 1e-4


@pytest.mark.parametrize("item", rm.params(["magika"]))
def test_a_quantizer_downstream_is_named_when_the_check_fails_and_the_way_out_works(item, tmp_path):
    """magika: each GELU feeds a LayerNorm, whose output is quantized for a MatMulInteger."""
    e, path = item
    path = rm.require_path(e, path)
    q = _quantize(path, tmp_path / "q.onnx")
    with pytest.raises(NormactError, match="verification failed") as err:
        rewrite(q, tmp_path / "p.onnx", preserve_function=True)
    assert "the model quantizes values downstream of the sites (DynamicQuantizeLinear '" in str(err.value)
    assert WAY_OUT in str(err.value) and not (tmp_path / "p.onnx").exists()
    # the way out: preserve the float model, then quantize the result: as close to the float model as the
    # quantized original is (quantization's error, not the rewrite's), same top class
    rewrite(path, tmp_path / "fp.onnx", preserve_function=True)
    _quantize(tmp_path / "fp.onnx", tmp_path / "fpq.onnx")
    for feeds in rm.sample_batches(e["id"], 2, 2):
        (f,), (qo,), (pq,) = (run_model(m, feeds) for m in (path, q, tmp_path / "fpq.onnx"))
        assert float(np.abs(pq - f).max()) <= 1.5 * float(np.abs(qo - f).max()) + 1e-3
        assert np.array_equal(pq.argmax(-1), f.argmax(-1))
