"""One door to a method's constants (policy.method_constants), for the Python API and the CLI alike.

``rewrite(method="anact", stats=…)`` takes ANAct's factor options (``lambda_rule``, ``centered_rho``,
``aggregate``); options left out take what the calibration run recorded; ``calibrate`` writes the model the
same door gives; the CLI's ``rewrite --method anact`` writes the same model as the API with the same options.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from normact_onnx.api import calibrate, rewrite
from normact_onnx.errors import NormactError
from normact_onnx.methods.anact import site_factors
from normact_onnx.policy import MethodOptions, method_constants
from normact_onnx.provenance import read_records

from .conftest import tanh_sigmoid_mlp

WIDTH = 64


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
    """x → Tanh → MatMul → Sigmoid → MatMul → y: two hidden sites whose λ differ between the two rules."""
    rng = np.random.default_rng(3)
    model = tanh_sigmoid_mlp(WIDTH, rng)
    folder = tmp_path_factory.mktemp("methods")
    path = folder / "two.onnx"
    onnx.save(model, path)
    batches = [{"x": rng.standard_normal((256, WIDTH)).astype(np.float32)} for _ in range(6)]
    np.savez(folder / "data.npz", x=np.concatenate([b["x"] for b in batches]))
    return path, batches


def _constants(result) -> dict[str, float]:
    return {o.site.name: float(o.affine.scale) for o in result.rewritten}


def test_rewrite_takes_anact_factor_options(two_sites):
    path, batches = two_sites
    stats = calibrate(path, batches)  # recorded: lambda_rule anact, uncentred ρ, aggregate ema
    got = rewrite(path, method="anact", stats=stats, lambda_rule="xavier", centered_rho=True, aggregate="mean",
                  details=True)  # fmt: skip
    default = rewrite(path, method="anact", stats=stats, details=True)
    assert len(got.rewritten) == 2
    for o in got.rewritten:
        fac = site_factors(stats.sites[o.site.output], "xavier", True, "mean")
        assert float(o.affine.scale) == float(fac.lam[0]) and float(o.affine.shift) == float(fac.mu[0])
    assert _constants(got)["sigmoid"] != pytest.approx(_constants(default)["sigmoid"], rel=1e-3)
    for r in read_records(got.model):
        assert (r["lambda_rule"], r["centered_rho"], r["aggregate"]) == ("xavier", True, "mean")
    for r in read_records(default.model):
        assert (r["lambda_rule"], r["centered_rho"], r["aggregate"]) == ("anact", False, "ema")


def test_options_left_out_take_what_the_calibration_recorded(two_sites):
    path, batches = two_sites
    stats = calibrate(path, batches, lambda_rule="xavier", aggregate="mean")
    got = rewrite(path, method="anact", stats=stats, details=True)
    for o in got.rewritten:
        fac = site_factors(stats.sites[o.site.output], "xavier", False, "mean")
        assert float(o.affine.scale) == float(fac.lam[0])
    assert {r["lambda_rule"] for r in read_records(got.model)} == {"xavier"}


def test_calibrate_writes_what_the_door_gives(two_sites, tmp_path):
    path, batches = two_sites
    res = calibrate(path, batches, tmp_path / "cal.onnx", lambda_rule="xavier", centered_rho=True, aggregate="mean",
                    verify=False, details=True)  # fmt: skip
    constants, info = method_constants(MethodOptions("anact"), res.stats)
    assert info["lambda_rule"] == "xavier" and info["centered_rho"] is True and info["aggregate"] == "mean"
    for o in res.rewrite.rewritten:
        assert float(o.affine.scale) == float(constants(o.site).scale)
    records = read_records(onnx.load(tmp_path / "cal.onnx", load_external_data=False))
    assert [r["lambda_rule"] for r in records] == ["xavier", "xavier"]


def test_cli_and_api_write_the_same_model(two_sites, tmp_path, cli):
    path, batches = two_sites
    stats_file = tmp_path / "two.stats.json"
    calibrate(path, batches, stats_path=stats_file)
    api_out, cli_out = tmp_path / "api.onnx", tmp_path / "cli.onnx"
    rewrite(path, api_out, method="anact", stats=stats_file, lambda_rule="xavier", aggregate="mean")
    r = cli("rewrite", path, "--method", "anact", "--stats", stats_file, "--lambda-rule", "xavier",
            "--aggregate", "mean", "-o", cli_out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    a, b = onnx.load(api_out), onnx.load(cli_out)
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    meta = lambda m: {p.key: p.value for p in m.metadata_props}  # noqa: E731
    assert json.loads(meta(a)["normact.sites"]) == json.loads(meta(b)["normact.sites"])


def test_the_door_refuses_what_it_cannot_do(two_sites):
    path, _ = two_sites
    with pytest.raises(NormactError, match="needs calibration statistics"):
        method_constants(MethodOptions("anact"))
    with pytest.raises(NormactError, match="unknown method 'quantile'"):
        method_constants(MethodOptions("quantile"))
    with pytest.raises(NormactError, match="needs calibration statistics"):
        rewrite(path, method="anact")
    constants, info = method_constants(MethodOptions(variant="zeta-zero", q=2.0))
    assert info == {"method": "static", "variant": "zeta-zero", "q": 2.0}
    assert callable(constants)


def test_method_options_are_the_keywords_as_one_value(two_sites, tmp_path):
    """``method_options=`` writes what the loose method keywords write, for rewrite and calibrate alike."""
    path, batches = two_sites
    stats = calibrate(path, batches)
    loose = rewrite(path, method="anact", stats=stats, lambda_rule="xavier", aggregate="mean", details=True)
    bundled = rewrite(
        path, stats=stats, method_options=MethodOptions("anact", lambda_rule="xavier", aggregate="mean"), details=True
    )
    assert _constants(loose) == _constants(bundled)
    static = rewrite(path, method_options=MethodOptions(variant="zeta-zero", q=2.0), details=True)
    assert _constants(static) == _constants(rewrite(path, variant="zeta-zero", q=2.0, details=True))
    # calibrate: options left as None take calibrate's defaults (anact's factors, center-scale)
    by_value = calibrate(path, batches, method_options=MethodOptions("static"))
    by_keywords = calibrate(path, batches, method="static")
    assert by_value.settings == by_keywords.settings and by_value.settings["variant"] == "center-scale"
    with pytest.raises(NormactError, match="method_options= or as method/variant/q/ratio"):
        rewrite(path, q=2.0, method_options=MethodOptions())
    with pytest.raises(NormactError, match="method_options= or as method/variant"):
        calibrate(path, batches, method="static", method_options=MethodOptions("static"))


def test_factor_options_are_checked_once_at_one_door(two_sites):
    """An unknown aggregate or λ rule is refused by ``check_options`` before any work: api.py's old second
    ``aggregate not in AGGREGATES`` check after it could never fire, and is gone."""
    path, batches = two_sites
    with pytest.raises(NormactError, match=r"^unknown --aggregate 'median'; choose one of ema, mean$"):
        calibrate(path, batches, aggregate="median")
    with pytest.raises(NormactError, match=r"^unknown --lambda-rule 'he'; choose one of anact, xavier$"):
        calibrate(path, batches, lambda_rule="he")
    with pytest.raises(TypeError, match="calibrate\\(\\) got an unexpected keyword argument 'aggregates'"):
        calibrate(path, batches, aggregates="mean")  # type: ignore[call-overload]
