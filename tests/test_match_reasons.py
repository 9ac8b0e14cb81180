"""Why a decomposed activation was not found: the deepest point each form reached, and the reason there.

Each graph below is a real spelling exporters write, broken by one op, one constant or one extra reader;
``inspect --explain`` (and :func:`normact_onnx.passes.find.explain` under it) must name the activation,
the form, how far it matched and what differed, in one line per candidate.
"""

from __future__ import annotations

import json
import math

import onnx
import pytest
from onnx import helper

from normact_onnx.api import inspect
from normact_onnx.passes.find import explain

from . import real_models as rm
from .conftest import const, fvi, tiny_model


def _model(nodes, inits, opset=17):
    """y = nodes(x), then a Relu so the activation is a hidden one (not a graph output)."""
    nodes = [*nodes, helper.make_node("Relu", ["y"], ["z"], name="after")]
    return tiny_model(nodes, [fvi("x", [3, 5])], [fvi("z", [3, 5])], inits, opset=opset)


def _lines(model) -> list[str]:
    return [p.line() for p in explain(model).partial]


def _gelu_tanh(cubic: float):
    mul = helper.make_node
    nodes = [
        mul("Pow", ["x", "three"], ["cube"], name="cube"),
        mul("Mul", ["cube", "c"], ["scaled"], name="cubic_term"),
        mul("Add", ["x", "scaled"], ["inner"], name="inner"),
        mul("Mul", ["inner", "k"], ["arg"], name="arg"),
        mul("Tanh", ["arg"], ["t"], name="tanh"),
        mul("Add", ["t", "one"], ["one_plus"], name="one_plus"),
        mul("Mul", ["x", "one_plus"], ["xa"], name="x_times"),
        mul("Mul", ["xa", "half"], ["y"], name="gelu"),
    ]
    inits = [const("three", 3.0), const("c", cubic), const("k", math.sqrt(2 / math.pi))]
    return _model(nodes, [*inits, const("one", 1.0), const("half", 0.5)])


def test_gelu_tanh_with_a_wrong_cubic_constant_names_the_constant():
    assert [s["kind"] for s in inspect(_gelu_tanh(0.044715))] == ["gelu_tanh", "relu"]  # the spelling is real
    m = _gelu_tanh(0.05)
    assert "gelu_tanh" not in [s["kind"] for s in inspect(m)]
    (line,) = [x for x in _lines(m) if "at 'gelu'" in x]
    assert line == (
        "gelu_tanh tanh chain at 'gelu': 8 of 9 nodes; input 1 of Mul 'cubic_term' is the constant 0.05 "
        "(expected the constant 0.044715, rtol 1e-04) (both input orders tried)"
    )


def test_swish_with_beta_is_a_full_match_the_catalogue_refuses():
    nodes = [
        helper.make_node("Mul", ["x", "beta"], ["bx"], name="scale"),
        helper.make_node("Sigmoid", ["bx"], ["s"], name="gate"),
        helper.make_node("Mul", ["x", "s"], ["y"], name="swish"),
    ]
    m = _model(nodes, [const("beta", 1.702)])
    (sig,) = [s for s in inspect(m) if s["kind"] == "sigmoid"]
    assert sig["skipped"] == "x·Sigmoid(β·x) with β = 1.702: a Swish with β ≠ 1 is not in the catalogue"
    assert _lines(m) == [
        "silu x·Sigmoid(β·x) at 'swish': 3 of 3 nodes; "
        "x·Sigmoid(β·x) with β = 1.702: a Swish with β ≠ 1 is not in the catalogue"
    ]


def test_silu_whose_mul_multiplies_another_tensor_names_both_tensors():
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["s"], name="gate"),
        helper.make_node("Neg", ["x"], ["other"], name="neg"),
        helper.make_node("Mul", ["other", "s"], ["y"], name="product"),
    ]
    lines = _lines(_model(nodes, []))
    assert lines == ["silu x·Sigmoid(x) at 'product': 2 of 2 nodes; input 0 of Sigmoid 'gate' is 'x', not x = 'other'"]


def test_silu_whose_sigmoid_has_a_second_reader_is_a_fan_out_refusal():
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["s"], name="gate"),
        helper.make_node("Mul", ["x", "s"], ["p"], name="silu"),
        helper.make_node("Add", ["p", "s"], ["y"], name="reuse"),
    ]
    m = _model(nodes, [])
    assert "silu" not in [s["kind"] for s in inspect(m)]
    (line,) = [x for x in _lines(m) if "at 'silu'" in x]
    assert line == (
        "silu x·Sigmoid(x) at 'silu': 2 of 2 nodes; "
        "Sigmoid 'gate' also feeds Add 'reuse' (a pattern's inner values have one reader)"
    )


@pytest.mark.parametrize(
    ("lo", "hi", "why"),
    [
        (0.0, 5.0, "input 2 of Clip 'clip' is the constant 5 (expected the constant 6"),
        (-1.0, 6.0, "input 1 of Clip 'clip' is the constant -1 (expected the constant 0"),
    ],
)
def test_hard_swish_with_wrong_clip_bounds_names_the_bound(lo, hi, why):
    nodes = [
        helper.make_node("Add", ["x", "three"], ["shifted"], name="shift"),
        helper.make_node("Clip", ["shifted", "lo", "hi"], ["clipped"], name="clip"),
        helper.make_node("Div", ["clipped", "six"], ["gate"], name="div"),
        helper.make_node("Mul", ["x", "gate"], ["y"], name="hswish"),
    ]
    m = _model(nodes, [const("three", 3.0), const("lo", lo), const("hi", hi), const("six", 6.0)])
    assert "hard_swish" not in [s["kind"] for s in inspect(m)]
    (line,) = [x for x in _lines(m) if "at 'hswish'" in x]
    assert line.startswith("hard_swish Add→Clip→Div→Mul at 'hswish': 4 of 4 nodes; " + why)


def test_half_built_mish_names_the_op_found_instead():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="not_softplus"),
        helper.make_node("Tanh", ["r"], ["t"], name="tanh"),
        helper.make_node("Mul", ["x", "t"], ["y"], name="mish"),
    ]
    assert _lines(_model(nodes, [])) == [
        "mish x·Tanh(Softplus(x)) at 'mish': 2 of 3 nodes; input 0 of Tanh 'tanh' is Relu 'not_softplus', "
        "expected Softplus"
    ]


def test_found_sites_and_single_op_candidates_give_no_partial_lines():
    """A matched form, a plain Mul by a constant and a Relu: nothing is half-matched."""
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["s"], name="gate"),
        helper.make_node("Mul", ["x", "s"], ["a"], name="silu"),
        helper.make_node("Mul", ["a", "half"], ["y"], name="scale"),
    ]
    why = explain(_model(nodes, [const("half", 0.5)]))
    assert [s.kind for s in why.sites] == ["silu", "relu"] and why.partial == []


def test_inspect_explain_prints_the_reason_and_json_carries_it(cli, tmp_path):
    path = tmp_path / "gelu.onnx"
    onnx.save(_gelu_tanh(0.05), path)
    proc = cli("inspect", path, "--explain")
    assert proc.returncode == 0, proc.stderr
    assert "half-matched patterns" in proc.stdout
    assert (
        "gelu_tanh tanh chain at 'gelu': 8 of 9 nodes; input 1 of Mul 'cubic_term' is the constant 0.05" in proc.stdout
    )
    data = json.loads(cli("inspect", path, "--explain", "--json").stdout)
    (gelu,) = [p for p in data["partial"] if p["name"] == "gelu"]
    assert gelu["kind"] == "gelu_tanh" and gelu["matched"] == "8 of 9 nodes" and gelu["where"] == "cubic_term"
    assert {s["kind"] for s in data["sites"]} >= {"tanh", "relu"}
    plain = cli("inspect", path)
    assert "half-matched" not in plain.stdout and plain.returncode == 0


def test_rewrite_explain_prints_half_matched_patterns_and_writes_nothing(cli, tmp_path):
    """The dry run of rewrite shows the same half-match line as inspect; a real rewrite traces nothing."""
    path = tmp_path / "gelu.onnx"
    onnx.save(_gelu_tanh(0.05), path)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = cli("rewrite", path, "--explain")
    assert proc.returncode == 0, proc.stderr
    assert "gelu_tanh tanh chain at 'gelu': 8 of 9 nodes; input 1 of Mul 'cubic_term'" in proc.stdout
    assert "(dry run: nothing written)" in proc.stdout and sorted(p.name for p in tmp_path.iterdir()) == before
    from normact_onnx.api import rewrite

    assert rewrite(str(path), details=True, verify=False).partial == []


def test_inspect_explain_on_a_bad_file_is_one_line_and_exit_2(cli, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    proc = cli("inspect", bad, "--explain")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("item", rm.params(ids=["ppocrv4_rec"]))
def test_real_model_layer_norm_tail_is_a_near_miss_of_hard_swish(item):
    """PP-OCRv4's layer norms end in (x − mean) / σ · γ: the Mul·Div of a hard-swish, with a Sub for its Clip."""
    e, path = item
    path = rm.require_path(e, path)
    why = explain(onnx.load(str(path)), str(path.parent))
    groups = {first.pattern: [first, *more] for first, more in why.grouped()}
    norm_tail = "hard_swish Add→Clip→Div→Mul: 2 of 4 nodes; input 0 of Div '…' is Sub '…', expected Clip"
    assert len(groups[norm_tail]) == 5
    assert groups[norm_tail][0].line() == (
        "hard_swish Add→Clip→Div→Mul at 'p2o.Mul.178': 2 of 4 nodes; "
        "input 0 of Div 'p2o.Div.28' is Sub 'p2o.Sub.0', expected Clip"
    )
    assert len(why.sites) == 39  # tracing changes no site


@pytest.mark.parametrize("item", rm.params(ids=["silero_vad_ifless"]))
def test_real_model_lstm_cell_gates_are_silu_near_misses_inside_if_branches(item):
    e, path = item
    path = rm.require_path(e, path)
    why = explain(onnx.load(str(path)), str(path.parent))
    assert {p.graph for p in why.partial} == {"main/node_cond__1.then_branch", "main/node_cond__1.else_branch"}
    assert all(p.kind == "silu" and p.form == "x·Sigmoid(x)" and p.bound == 2 for p in why.partial)
    first = why.partial[0]
    assert first.line() == (
        "silu x·Sigmoid(x) at 'node_mul_168': 2 of 2 nodes; input 1 of Mul 'node_mul_168' is 'select_2', "
        "not x = 'unsafe_split_split_1' (both input orders tried)"
    )
