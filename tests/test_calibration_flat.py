"""The flat (all sites at once) batch merge gives every site exactly what its own per-site merge gives."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from normact_onnx.calibration.flat import FlatFolder
from normact_onnx.calibration.insitu import Normalizer
from normact_onnx.calibration.run import calibration_session, empty_stats, fold, fold_probes, prepare, run_batch
from normact_onnx.calibration.stats import CalibrationStats
from normact_onnx.errors import NormactError

from .conftest import MODELS


def _both(name: str, per_channel: bool, normalize: Normalizer | None, batches: list[dict]):
    src = onnx.load(MODELS / name)
    inst = prepare(src, None, per_channel, normalize)
    sess = calibration_session(inst.model, None)
    ref, flat = empty_stats(inst, per_channel, "fp"), empty_stats(inst, per_channel, "fp")
    folder = FlatFolder(flat, inst, fold_probes)
    for i, feed in enumerate(batches):
        values = run_batch(sess, inst, feed, f"batch {i}")
        fold(ref, inst, values, f"batch {i}")
        folder.fold(values, f"batch {i}")
    flat_used = folder.state is not None  # the flat path held the state (not the per-site fallback)
    folder.flush()
    return inst, ref, flat, flat_used


def _same(ref: CalibrationStats, flat: CalibrationStats) -> None:
    assert ref.sites.keys() == flat.sites.keys()
    for key, a in ref.sites.items():
        b = flat.sites[key]
        for name in ("n", "mean", "m2"):
            np.testing.assert_array_equal(getattr(a.x, name), getattr(b.x, name), err_msg=f"{key} x.{name}")
            np.testing.assert_array_equal(getattr(a.f, name), getattr(b.f, name), err_msg=f"{key} f.{name}")
        np.testing.assert_array_equal(a.d2, b.d2, err_msg=key)
        assert (a.xf is None) == (b.xf is None)
        if a.xf is not None:
            np.testing.assert_array_equal(a.xf, b.xf, err_msg=key)
        assert (a.ema is None) == (b.ema is None)
        if a.ema is not None and b.ema is not None:
            assert a.ema.batches == b.ema.batches
            for name in ("rho", "rho_centered", "drho", "mu"):
                np.testing.assert_array_equal(getattr(a.ema, name), getattr(b.ema, name), err_msg=f"{key} {name}")


def _gaussian(shape: tuple[int, ...], n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)  # scales vary per batch, so the gated EMA both accepts and refuses
    return [{"x": (rng.standard_normal(shape) * rng.uniform(0.7, 1.4)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize(
    "per_channel, normalize",
    [
        (False, None),
        (True, None),
        (False, Normalizer()),
        (True, Normalizer(method="static", variant="ratio", ratio=0.5)),  # the x·f co-moment too
    ],
)
def test_flat_merge_equals_the_per_site_merge(per_channel, normalize):
    inst, ref, flat, flat_used = _both(
        "mobilenet_like.torchscript.onnx", per_channel, normalize, _gaussian((4, 3, 32, 32), 7)
    )
    assert len(inst.probes) >= 6 and flat_used
    _same(ref, flat)
    some = next(iter(flat.sites.values()))
    assert some.x.n[0] > 0 and some.ema is not None and some.ema.batches == 7


def test_sites_in_a_loop_keep_the_per_site_path_and_agree():
    inst, ref, flat, _ = _both("loop_body.torchscript.onnx", False, None, _gaussian((16, 16), 4))
    assert any(p.site.container.parent is not None for p in inst.probes)
    _same(ref, flat)


def test_a_batch_that_is_not_finite_is_refused_by_site_name():
    src = onnx.load(MODELS / "mobilenet_like.torchscript.onnx")
    inst = prepare(src, None, False)
    sess = calibration_session(inst.model, None)
    stats = empty_stats(inst, False, "fp")
    folder = FlatFolder(stats, inst, fold_probes)
    good, bad = _gaussian((2, 3, 32, 32), 2)
    bad["x"][0, 0, 0, 0] = np.nan
    folder.fold(run_batch(sess, inst, good, "batch 0"), "batch 0")
    with pytest.raises(NormactError, match=r"batch 1: site .* holds NaN or Inf"):
        folder.fold(run_batch(sess, inst, bad, "batch 1"), "batch 1")
