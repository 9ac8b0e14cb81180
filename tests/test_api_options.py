"""The option bundles (``SiteSelection``, ``OutputOptions``, ``DataOptions``) and reasons as values at the API.

``rewrite``, ``calibrate`` and ``fold`` take the site selection, the writing options and (``calibrate``, ``fold``)
the data source either as their documented keywords or as one value each (what the CLI passes); both give the
same model, and both at once is refused rather than one silently winning. The selection is frozen all the way
down, so a Ray worker or a later call sees the rule it was given. A site without constants carries its reason as
a :class:`Refusal`.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import onnx
import pytest

from normact_onnx import fold
from normact_onnx.api import calibrate, rewrite
from normact_onnx.calibration.stats import CalibrationStats
from normact_onnx.data.options import DataOptions
from normact_onnx.errors import NormactError
from normact_onnx.methods.static import Affine
from normact_onnx.outcome import Refusal
from normact_onnx.passes.find import find_sites
from normact_onnx.policy import anact_constants, select, static_constants
from normact_onnx.selection import SiteSelection
from normact_onnx.writer import OutputOptions

from .conftest import tanh_sigmoid_mlp

WIDTH = 32


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
    """x → Tanh → MatMul → Sigmoid → MatMul → y, saved, with six batches of samples."""
    rng = np.random.default_rng(5)
    model = tanh_sigmoid_mlp(WIDTH, rng)
    path = tmp_path_factory.mktemp("options") / "two.onnx"
    onnx.save(model, path)
    batches = [{"x": rng.standard_normal((64, WIDTH)).astype(np.float32)} for _ in range(6)]
    return path, batches


def _nodes(path) -> list[bytes]:
    return [n.SerializeToString() for n in onnx.load(path).graph.node]


def test_bundles_write_the_same_model_as_the_keywords(two_sites, tmp_path):
    path, _ = two_sites
    loose = rewrite(path, tmp_path / "loose.onnx", include="tanh,sigmoid", exclude=["sigmoid"], nodes="^t",
                    form="subgraph", details=True)  # fmt: skip
    bundled = rewrite(
        path,
        tmp_path / "bundled.onnx",
        selection=SiteSelection.parse("tanh,sigmoid", ["sigmoid"], "^t"),
        output_options=OutputOptions(form="subgraph"),
        details=True,
    )
    assert (
        [(o.site.name, o.action, o.reason) for o in bundled.outcomes]
        == [(o.site.name, o.action, o.reason) for o in loose.outcomes]
        == [("tanh", "rewritten", ""), ("sigmoid", "skipped", "kind sigmoid in --exclude")]
    )
    assert _nodes(tmp_path / "bundled.onnx") == _nodes(tmp_path / "loose.onnx")
    assert not any(n.domain for n in onnx.load(tmp_path / "bundled.onnx").graph.node)  # subgraph: standard ops
    # write_unchanged=False in the bundle: nothing selected, nothing written
    none = rewrite(path, tmp_path / "none.onnx", selection=SiteSelection(nodes="nothing-matches"),
                   output_options=OutputOptions(write_unchanged=False), details=True)  # fmt: skip
    assert none.path is None and not (tmp_path / "none.onnx").exists()


def test_calibrate_takes_the_bundles_down_to_its_rewrite(two_sites, tmp_path):
    path, batches = two_sites
    res = calibrate(path, batches, tmp_path / "cal.onnx", selection=SiteSelection.parse(exclude="tanh"),
                    output_options=OutputOptions(verify=False), details=True)  # fmt: skip
    assert res.rewrite is not None and res.rewrite.verification == []  # verify=False reached the writer
    assert [(o.site.name, o.action) for o in res.rewrite.outcomes] == [("tanh", "skipped"), ("sigmoid", "rewritten")]
    assert res.stats.settings["normalized_in_situ"] == ["s"]  # the in-situ run normalized the same selection
    assert isinstance(calibrate(path, batches), CalibrationStats)  # details=False: the statistics


def test_both_ways_at_once_are_refused(two_sites, tmp_path):
    path, batches = two_sites
    with pytest.raises(NormactError, match="selection= or as include/exclude/nodes/all_sites, not both"):
        rewrite(path, include="tanh", selection=SiteSelection())
    with pytest.raises(NormactError, match="output_options= or as form/verify/in_place/write_unchanged, not both"):
        rewrite(path, verify=False, output_options=OutputOptions())
    with pytest.raises(NormactError, match="selection= or as include"):
        calibrate(path, batches, all_sites=True, selection=SiteSelection())
    normalized = rewrite(path, tmp_path / "n.onnx")
    with pytest.raises(NormactError, match="output_options= or as verify/in_place/write_unchanged, not both"):
        fold(normalized, in_place=True, output_options=OutputOptions())
    out = fold(normalized, tmp_path / "f.onnx", output_options=OutputOptions(verify=False), details=True)
    assert out.check is None and out.path == tmp_path / "f.onnx"  # no self-check without verify


def test_a_keyword_no_function_takes_is_a_type_error(two_sites):
    """The keywords are declared once (a TypedDict per function), not spelled out in the signature: a misspelt one
    is still refused as Python refuses it for a written-out signature, before any work."""
    path, batches = two_sites
    with pytest.raises(TypeError, match=r"^rewrite\(\) got an unexpected keyword argument 'include_kinds'$"):
        rewrite(path, include_kinds="tanh")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"^calibrate\(\) got an unexpected keyword argument 'batch'$"):
        calibrate(path, batches, batch=2)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"^fold\(\) got an unexpected keyword argument 'form'$"):
        fold(path, form="subgraph")  # type: ignore[call-overload]


def test_data_options_read_the_same_batches_as_the_keywords(two_sites, tmp_path):
    path, batches = two_sites
    loose = calibrate(path, batches, tmp_path / "loose.onnx", batches=4, batch_size=32, details=True)
    bundled = calibrate(path, output=tmp_path / "bundled.onnx", data_options=DataOptions(batches, 4, 32), details=True)
    assert loose.stats.batches == bundled.stats.batches == 4  # 4 of the 12 half-batches: both stopped there
    assert loose.stats.as_dict()["sites"] == bundled.stats.as_dict()["sites"]
    assert _nodes(tmp_path / "bundled.onnx") == _nodes(tmp_path / "loose.onnx")
    synthetic = calibrate(path, data_options=DataOptions(synthetic=True, batches=3, seed=7))
    assert synthetic.batches == 3 and synthetic.sources[0].startswith("synthetic N(0,1) x=1x32")
    # fold's self-check: the same inputs either way (a list of feed dicts is read whole)
    normalized = rewrite(path, tmp_path / "n.onnx")
    by_keywords = fold(normalized, tmp_path / "k.onnx", data=batches, details=True)
    by_bundle = fold(normalized, tmp_path / "b.onnx", data_options=DataOptions(batches), details=True)
    assert by_keywords.check is not None and by_bundle.check is not None
    assert by_bundle.check == by_keywords.check and by_bundle.check["batches"] == len(batches)
    default = fold(normalized, data_options=DataOptions(synthetic=True), details=True)
    assert default.check is not None and default.check["batches"] == 2  # None: the self-check's two batches
    three = fold(normalized, data_options=DataOptions(synthetic=True, batches=3, shapes=["x=5x32"]), details=True)
    assert three.check is not None and three.check["batches"] == 3 and three.check["synthetic"]


def test_data_both_ways_at_once_is_refused(two_sites, tmp_path):
    path, batches = two_sites
    with pytest.raises(NormactError, match="data_options= or as data/batches/batch_size/synthetic/shapes/values/seed/"):
        calibrate(path, batches, data_options=DataOptions(batches))
    with pytest.raises(NormactError, match="data_options= or as data/batches"):
        calibrate(path, seed=1, data_options=DataOptions(synthetic=True))
    normalized = rewrite(path, tmp_path / "n.onnx")
    with pytest.raises(NormactError, match="self-check inputs as data_options= or as data/synthetic/shapes/values/"):
        fold(normalized, batches=3, data_options=DataOptions(synthetic=True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        DataOptions().seed = 1  # type: ignore[misc]


def test_site_selection_is_a_frozen_value():
    kinds = {"tanh"}
    sel = SiteSelection(include=kinds, nodes="^t")
    kinds.add("sigmoid")  # the caller's set changing later does not change the rule
    assert sel.include == frozenset({"tanh"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        sel.all_sites = True  # type: ignore[misc]
    again = pickle.loads(pickle.dumps(sel))  # what a Ray worker receives
    assert again == sel and again.pattern is not None and again.pattern.pattern == "^t"
    with pytest.raises(NormactError, match="--nodes: bad regular expression"):
        SiteSelection(nodes="(")


def test_reasons_are_refusals(two_sites):
    path, batches = two_sites
    m = onnx.load(path)
    tanh, sigmoid = find_sites(m)
    stats = calibrate(path, batches, selection=SiteSelection.parse(include="tanh"))
    del stats.sites[sigmoid.output]
    got = anact_constants(stats)(sigmoid)
    assert isinstance(got, Refusal) and str(got).startswith("no statistics:")
    assert isinstance(anact_constants(stats)(tanh), Affine)
    # static at a q whose moments do not exist for the site: refused with the reason, not raised
    refused = static_constants(q=1.0, variant="ratio", ratio=-5.0)(tanh)
    assert isinstance(refused, Refusal) and refused.reason
    outcomes = select([tanh, sigmoid], SiteSelection(), anact_constants(stats))
    assert [(o.action, o.reason) for o in outcomes] == [("rewritten", ""), ("skipped", str(got))]
    # a caller's own callback may still give its reason as a plain string (as before Refusal existed)
    legacy = select([tanh], SiteSelection(), lambda s: "mine to keep")  # type: ignore[arg-type, return-value]
    assert [(o.action, o.reason) for o in legacy] == [("skipped", "mine to keep")]
