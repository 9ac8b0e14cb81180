"""What is a site: numerical guards are not, output heads are skipped, Swish(β) is told apart; whole-model checks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from normact_onnx.api import inspect, rewrite
from normact_onnx.errors import NormactError

from .conftest import const, fvi, run_model, tiny_model


def _layernorm_with_clamped_variance() -> onnx.ModelProto:
    """LayerNorm as JAX/TF exporters write it: var = E x² − (E x)², clamped by Max(0, ·), + eps, Rsqrt-like."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("ReduceMean", ["h"], ["mu"], axes=[-1]),
        helper.make_node("Mul", ["h", "h"], ["h2"]),
        helper.make_node("ReduceMean", ["h2"], ["m2"], axes=[-1]),
        helper.make_node("Mul", ["mu", "mu"], ["mu2"]),
        helper.make_node("Sub", ["m2", "mu2"], ["var0"]),
        helper.make_node("Max", ["var0", "zero"], ["var"]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Sub", ["h", "mu"], ["hc"]),
        helper.make_node("Div", ["hc", "sd"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    rng = np.random.default_rng(0)
    inits = [const("w", rng.standard_normal((8, 8))), const("w2", rng.standard_normal((8, 4)))]
    inits += [const("zero", 0.0), const("eps", 1e-6)]
    return tiny_model(nodes, [fvi("x", ["N", 8])], [fvi("y", ["N", 4])], inits, opset=17)


def test_a_clamp_of_a_variance_is_a_guard_not_a_site():
    m = _layernorm_with_clamped_variance()
    assert [s["kind"] for s in inspect(m)] == ["relu"]  # the Relu after the norm; not the Max guard
    res = rewrite(m, dry_run=True, details=True)
    (miss,) = [x for x in res.misses if x["op"] == "Max"]
    assert "numerical guard" in miss["why"]
    out = rewrite(m, preserve_function=True)
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_allclose(run_model(out, {"x": x})[0], run_model(m, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_whole_model_check_refuses_a_rewrite_that_makes_nan(tmp_path):
    """A Relu feeding Pow(·, 1.5): normalized it goes negative, the output NaN; nothing is written."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Pow", ["r", "p"], ["q"]),
        helper.make_node("MatMul", ["q", "w"], ["y"]),
    ]
    w = const("w", np.eye(8))
    m = tiny_model(nodes, [fvi("x", ["N", 8])], [fvi("y", ["N", 8])], [const("p", 1.5), w])
    with pytest.raises(NormactError, match=r"NaN/Inf .* where the original's is finite"):
        rewrite(m, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    rewrite(m, tmp_path / "out.onnx", verify=False)  # the user can still have it, unverified


def test_cli_rewrite_failing_whole_model_check_is_one_line_exit_2(tmp_path, cli):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Log", ["r"], ["l"])]
    nodes.append(helper.make_node("Mul", ["l", "r"], ["y"]))  # Log not only a denominator: a site, not a guard
    m = tiny_model(nodes, [fvi("x", ["N", 8])], [fvi("y", ["N", 8])])
    onnx.save(m, tmp_path / "m.onnx")
    r = cli("rewrite", tmp_path / "m.onnx")
    assert r.returncode == 2 and "verification failed" in r.stderr and "(verified" not in r.stdout
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.normact.onnx").exists()


def test_output_heads_are_skipped_like_graph_outputs():
    """A detector's box Sigmoid, reshaped, scaled by a constant and concatenated into the output."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["p"]),
        helper.make_node("Mul", ["p", "two"], ["p2"]),
        helper.make_node("Reshape", ["p2", "shape"], ["flat"]),
        helper.make_node("Concat", ["flat", "flat"], ["y"], axis=1),
    ]
    rng = np.random.default_rng(0)
    inits = [const("w", rng.standard_normal((4, 3, 1, 1))), const("w2", rng.standard_normal((2, 4, 1, 1)))]
    inits += [const("two", 2.0), onnx.numpy_helper.from_array(np.array([1, -1], np.int64), "shape")]
    m = tiny_model(nodes, [fvi("x", [1, 3, 4, 4])], [fvi("y", [1, 64])], inits)
    sites = {s["kind"]: s for s in inspect(m)}
    assert sites["relu"]["skipped"] is None
    assert "output head" in sites["sigmoid"]["skipped"] and "Mul → Reshape → Concat" in sites["sigmoid"]["skipped"]
    res = rewrite(m, details=True)
    assert [o.site.kind for o in res.rewritten] == ["relu"]


@pytest.mark.parametrize(("beta", "kind"), [(1.0, "silu"), (1.702, "sigmoid")])
def test_swish_with_beta(beta, kind):
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Mul", ["h", "beta"], ["bh"]),
        helper.make_node("Sigmoid", ["bh"], ["s"]),
        helper.make_node("Mul", ["h", "s"], ["a"]),
        helper.make_node("MatMul", ["a", "w"], ["y"]),
    ]
    w = const("w", np.random.default_rng(0).standard_normal((4, 4)))
    m = tiny_model(nodes, [fvi("x", ["N", 4])], [fvi("y", ["N", 4])], [w, const("beta", beta)])
    (site,) = inspect(m)
    assert site["kind"] == kind
    if kind == "silu":
        assert site["skipped"] is None and site["written_as"] == "pattern x·Sigmoid(1·x)"
    else:
        assert "Swish with β ≠ 1" in site["skipped"] and "1.702" in site["skipped"]


def _ms_model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    m = tiny_model(nodes, inputs, outputs, inits, opset=17)
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return m


def _fused_cases():
    rng = np.random.default_rng(0)
    w = const("w", rng.standard_normal((4, 3, 3, 3)) * 0.5)
    b = const("b", rng.standard_normal(4))
    conv = helper.make_node(
        "FusedConv", ["x", "w", "b", "z"], ["h"], domain="com.microsoft", activation="Relu", pads=[1, 1, 1, 1]
    )
    nxt = helper.make_node("Conv", ["h", "w2"], ["y"])
    img = ([fvi("x", [2, 3, 5, 5]), fvi("z", [2, 4, 5, 5])], [fvi("y", [2, 2, 5, 5])])
    yield "FusedConv(Relu)+Z", "relu", [conv, nxt], *img, [w, b, const("w2", rng.standard_normal((2, 4, 1, 1)))]
    gemm = helper.make_node(
        "FusedGemm", ["v", "g", "c"], ["h"], domain="com.microsoft", activation="LeakyRelu", activation_alpha=0.1
    )
    mm = helper.make_node("MatMul", ["h", "g2"], ["y"])
    inits = [const("g", rng.standard_normal((4, 6))), const("c", rng.standard_normal(6))]
    inits.append(const("g2", rng.standard_normal((6, 3))))
    yield "FusedGemm(LeakyRelu)", "leaky_relu", [gemm, mm], [fvi("v", [2, 4])], [fvi("y", [2, 3])], inits
    for op in ("BiasGelu", "FastGelu"):
        fused = helper.make_node(op, ["v", "bias"], ["h"], domain="com.microsoft")
        inits = [const("bias", rng.standard_normal(4)), const("g2", rng.standard_normal((4, 3)))]
        yield (
            op,
            "gelu" if op == "BiasGelu" else "gelu_tanh",
            [fused, mm],
            [fvi("v", [2, 4])],
            [fvi("y", [2, 3])],
            inits,
        )


@pytest.mark.parametrize("case", list(_fused_cases()), ids=lambda c: c[0])
def test_onnx_runtime_fused_ops_are_split_where_a_site_is_rewritten(case):
    _, kind, nodes, inputs, outputs, inits = case
    m = _ms_model(nodes, inputs, outputs, inits)
    (site,) = inspect(m)
    assert site["kind"].startswith(kind.split("_")[0]) and site["written_as"].startswith("fused ")
    rng = np.random.default_rng(1)
    feeds = {
        i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
        for i in inputs
    }
    untouched = rewrite(m, exclude=[site["kind"]])
    assert [n.op_type for n in untouched.graph.node] == [n.op_type for n in m.graph.node]  # left fused
    for form in ("function", "subgraph"):
        out = rewrite(m, preserve_function=True, form=form)
        fused = nodes[0]
        assert not any(n.op_type == fused.op_type and list(n.input) == list(fused.input) for n in out.graph.node)
        np.testing.assert_allclose(run_model(out, feeds)[0], run_model(m, feeds)[0], rtol=1e-4, atol=1e-4)


def test_quick_gelu_is_a_near_miss_with_the_reason():
    nodes = [helper.make_node("QuickGelu", ["v"], ["h"], domain="com.microsoft", alpha=1.702)]
    nodes.append(helper.make_node("MatMul", ["h", "g"], ["y"]))
    m = _ms_model(nodes, [fvi("v", [2, 4])], [fvi("y", [2, 4])], [const("g", np.eye(4))])
    res = rewrite(m, dry_run=True, details=True)
    assert not res.outcomes
    (miss,) = res.misses
    assert miss["op"] == "QuickGelu" and "Swish with β ≠ 1" in miss["why"]


def test_calibration_measures_the_pre_activation_inside_a_fused_op():
    from normact_onnx.api import calibrate
    from normact_onnx.calibration import collect
    from normact_onnx.data.options import DataOptions

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("BiasGelu", ["v", "bias"], ["h"], domain="com.microsoft")]
    nodes.append(helper.make_node("MatMul", ["h", "g"], ["y"]))
    bias = rng.standard_normal(4) + 3.0
    inits = [const("bias", bias), const("g", rng.standard_normal((4, 3)))]
    m = _ms_model(nodes, [fvi("v", ["N", 4])], [fvi("y", ["N", 3])], inits)
    stats = collect(m, DataOptions(synthetic=True, batches=4, batch_size=256))
    (site,) = stats.sites.values()
    assert abs(float(np.mean(site.x.mean)) - float(bias.mean())) < 0.1  # v ~ N(0, 1), plus the fused bias
    assert calibrate(m, synthetic=True, batches=2) is not None


def _refused_op_cases():
    """Activation ops the catalogue reads and refuses, with the reason a user sees (one site's worth each)."""
    head = helper.make_node("MatMul", ["h", "g"], ["y"])
    io = ([fvi("v", [2, 4])], [fvi("y", [2, 4])])
    g = const("g", np.eye(4))
    yield "Clip", [helper.make_node("Clip", ["v"], ["h"]), head], *io, [g], "Clip without bounds is the identity"
    clip = helper.make_node("Clip", ["v", "lo", "hi"], ["h"])
    inverted = [g, const("lo", 1.0), const("hi", 0.0)]
    yield "Clip", [clip, head], *io, inverted, "Clip bounds are empty or inverted"
    per_channel = [g, const("lo", [0.0, 0.0, 0.0, 0.0]), const("hi", 6.0)]
    yield "Clip", [clip, head], *io, per_channel, "Clip bounds are not constant scalars"
    prelu = helper.make_node("PRelu", ["v", "slope"], ["h"])
    yield "PRelu", [prelu, head], [*io[0], fvi("slope", [4])], io[1], [g], "PRelu slope is not a constant"
    gemm = helper.make_node("FusedGemm", ["v", "g", "c"], ["h"], domain="com.microsoft", activation="Softsign")
    yield (
        "FusedGemm",
        [gemm, head],
        *io,
        [g, const("c", np.zeros(4))],
        "FusedGemm activation 'Softsign' is not split (only Relu, Sigmoid, Tanh, LeakyRelu, HardSigmoid)",
    )


@pytest.mark.parametrize("case", list(_refused_op_cases()), ids=lambda c: c[-1])
def test_an_activation_op_the_catalogue_refuses_is_a_near_miss_with_its_reason(case):
    op, nodes, inputs, outputs, inits, why = case
    res = rewrite(_ms_model(nodes, inputs, outputs, inits), dry_run=True, details=True)
    assert not res.outcomes
    (miss,) = res.misses
    assert miss["op"] == op and miss["why"] == why
